"""Exact evaluation of `where` predicates over index ranges, without enumerating N x N points.

A predicate is split into *components*: groups of its top-level `and` clauses that share index
variables (a 2-D neighborhood `nbhd(px,..) and nbhd(py,..)` has two). A component is counted
row by row: every variable but one *key* variable is enumerated (vectorized with torch), and
along the key the predicate is piecewise constant between *breakpoints*. An affine comparison
`a*k + r(row) op 0` can change truth only at `k = -r/a`, `nbhd` (dilation 1) only at its
window's start and end, and a clause that sees the key only through `(k + r) // c` (block
masks, `Sel[.., m // 64]`) only at multiples of c; so evaluating the predicate once per segment
gives the exact present set of every row. Clauses the breakpoints cannot describe (`k % d`,
dilation) fall back to evaluating every key of every row, in chunks, up to DENSE_LIMIT points.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import TYPE_CHECKING

import sympy

from einsum_ir.builtins import PREDICATES
from einsum_ir.errors import TensorValuesNeeded
from einsum_ir.functions import torch_function, torch_operator
from einsum_ir.graph import einsum_reads, is_carried_read, topological_einsums
from einsum_ir.ir import (
    COMPARISON_OPS, Access, Binary, Call, Cascade, Expr, Index, Name, Num, Unary, index_vars, substitute,
    walk,
)

if TYPE_CHECKING:  # torch is imported by the functions that evaluate rows: the structure
    import torch   # (conjuncts, components, effective predicates) serves torch-free callers

DENSE_LIMIT = 1 << 25  # points the dense fallback may evaluate, in chunks of CHUNK points
CHUNK = 1 << 22
ROW_LIMIT = 1 << 25  # rows x segments one evaluation by segments may hold


class PredicateError(ValueError):
    """A predicate that cannot be evaluated exactly within the limits; the message says why."""


# ---------------------------------------------------------------------------- structure


def conjuncts(pred: Expr | None) -> list[Expr]:
    """The top-level `and` clauses of a predicate."""
    if pred is None:
        return []
    if isinstance(pred, Binary) and pred.op == "and":
        return conjuncts(pred.lhs) + conjuncts(pred.rhs)
    return [pred]


@dataclass(frozen=True)
class Part:
    """A split rank's part: `m1` is `m // M0` (outer), `m0` is `m % M0`."""

    whole: str  # the whole rank's index variable, e.g. "m"
    inner: str  # the inner extent's name, e.g. "M0"
    outer: bool


@dataclass(frozen=True)
class Component:
    """Clauses of a predicate that share index variables (split parts read as their whole)."""

    vars: tuple[str, ...]
    clauses: tuple[Expr, ...]


def components(pred: Expr | None, parts: dict[str, Part]) -> list[Component]:
    """Group clauses into connected components of shared index variables."""
    groups: list[tuple[set[str], list[Expr]]] = []
    for clause in conjuncts(pred):
        vs = whole_vars(clause, parts)
        merged = [g for g in groups if g[0] & vs]
        for g in merged:
            groups.remove(g)
            vs |= g[0]
        groups.append((vs, [x for g in merged for x in g[1]] + [clause]))
    return [Component(tuple(sorted(vs)), tuple(cl)) for vs, cl in groups]


def whole_vars(expr: Expr, parts: dict[str, Part]) -> set[str]:
    return {parts[v].whole if v in parts else v for v in index_vars(expr)}


# ---------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class RowBound:
    """A per-row tensor spliced into an expression (the bounds of an nbhd window)."""

    value: torch.Tensor


@dataclass
class Env:
    """What an evaluation reads: index values, scalars (dims, params, tiles), parts, tensors."""

    index: dict[str, torch.Tensor]
    scalars: dict[str, int | float]
    parts: dict[str, Part]
    tensors: dict[str, torch.Tensor]

    def with_index(self, **values: torch.Tensor) -> "Env":
        return Env({**self.index, **values}, self.scalars, self.parts, self.tensors)


def evaluate(expr: Expr | RowBound, env: Env) -> torch.Tensor:
    """An index expression or predicate, broadcast over the env's index tensors."""
    import torch

    if isinstance(expr, RowBound):
        return expr.value
    if isinstance(expr, Num):
        return torch.tensor(expr.value)
    if isinstance(expr, Name):
        return torch.tensor(env.scalars[expr.name])
    if isinstance(expr, Index):
        if expr.name in env.index:
            return env.index[expr.name]
        part = env.parts[expr.name]
        tile, m = int(env.scalars[part.inner]), env.index[part.whole]
        return m // tile if part.outer else m % tile
    if isinstance(expr, Unary):
        v = evaluate(expr.operand, env)
        return ~_truth(v) if expr.op == "not" else -v
    if isinstance(expr, Binary):
        a, b = evaluate(expr.lhs, env), evaluate(expr.rhs, env)
        if expr.op == "and":
            return _truth(a) & _truth(b)
        if expr.op == "or":
            return _truth(a) | _truth(b)
        out = torch_operator(expr.op)(a, b)
        return out & _inside(expr, env) if expr.op in COMPARISON_OPS else out
    if isinstance(expr, Access):
        return _access(expr, env)
    if expr.fn in PREDICATES:
        return _truth(evaluate(PREDICATES[expr.fn].expand(expr.args), env))
    return torch_function(expr.fn)(*[evaluate(a, env) for a in expr.args])


def _truth(v: torch.Tensor) -> torch.Tensor:
    import torch

    return v if v.dtype == torch.bool else v != 0


def _access(a: Access, env: Env) -> torch.Tensor:
    import torch

    if a.tensor not in env.tensors:
        raise TensorValuesNeeded(f"the predicate reads tensor {a.tensor}, so the mask depends on its "
                                 f"values; pass it with the shapes, e.g. shapes={{'{a.tensor}': tensor}}",
                                 a.tensor)
    t = env.tensors[a.tensor]
    idx, inside = _indices(a, env)
    values = t[tuple(i.clamp(0, max(t.shape[k] - 1, 0)) for k, i in enumerate(idx))]
    # A boolean tensor is a predicate, false where the read is outside it; an integer one is a
    # value (`m < Len[b]`), and the comparison that reads it is false there (`_inside`).
    return _truth(values) & inside if t.dtype == torch.bool else values


def _indices(a: Access, env: Env) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The read's index tensors and where they lie inside the tensor."""
    import torch

    t = env.tensors[a.tensor]
    idx = torch.broadcast_tensors(*[evaluate(i, env).long() for i in a.indices])
    inside = torch.ones(idx[0].shape, dtype=torch.bool)
    for k, i in enumerate(idx):
        inside &= (i >= 0) & (i < t.shape[k])
    return list(idx), inside


def _inside(expr: Expr, env: Env):
    """Where every value read of an integer tensor in `expr` lies inside it (True if none): a
    comparison with an absent operand is false, as in the interpreter."""
    import torch

    inside = True
    for node in walk(expr):
        if isinstance(node, Access) and node.tensor in env.tensors and env.tensors[node.tensor].dtype != torch.bool:
            inside = inside & _indices(node, env)[1]
    return inside


# ---------------------------------------------------------------------------- breakpoints


def to_sympy(expr: Expr | RowBound, env: Env) -> sympy.Expr:
    """An index expression in sympy; split parts are written through their whole index."""
    if isinstance(expr, RowBound):
        return sympy.Symbol("_row", integer=True)  # constant along the key
    if isinstance(expr, Num):
        return sympy.nsimplify(expr.value)
    if isinstance(expr, Name):
        return sympy.sympify(env.scalars[expr.name])
    if isinstance(expr, Index):
        if expr.name in env.parts:
            part = env.parts[expr.name]
            m, tile = sympy.Symbol(part.whole, integer=True), sympy.sympify(env.scalars[part.inner])
            return sympy.floor(m / tile) if part.outer else m - tile * sympy.floor(m / tile)
        return sympy.Symbol(expr.name, integer=True)
    if isinstance(expr, Unary) and expr.op == "-":
        return -to_sympy(expr.operand, env)
    if isinstance(expr, Binary) and expr.op in ("+", "-", "*", "//", "%"):
        a, b = to_sympy(expr.lhs, env), to_sympy(expr.rhs, env)
        return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
                "//": lambda: sympy.floor(a / b), "%": lambda: sympy.Mod(a, b)}[expr.op]()
    if isinstance(expr, Call) and expr.fn in ("min", "max"):
        args = [to_sympy(x, env) for x in expr.args]
        return sympy.Min(*args) if expr.fn == "min" else sympy.Max(*args)
    return sympy.Function("opaque")(*sorted(sympy.Symbol(v, integer=True) for v in index_vars(expr)))


def _coefficient(e: sympy.Expr, k: str) -> int | None:
    """`a` when `e = a*k + (terms free of k)` with integer `a` (0 when k is absent), else None."""
    ks = sympy.Symbol(k, integer=True)
    if ks not in e.free_symbols:
        return 0
    a = sympy.simplify(sympy.diff(e, ks))
    if a.free_symbols or not a.is_integer or ks in sympy.simplify(e - a * ks).free_symbols:
        return None
    return int(a)


def breakpoints(clauses: tuple[Expr, ...], k: str, extent: int, env: Env) -> list[torch.Tensor] | None:
    import torch

    """Per-row key values around which some clause may change truth, or None when a clause
    is not piecewise constant in the key (then the caller evaluates every key).

    Each tensor is rows x n (or broadcasts to it). An affine clause flips only around one key;
    a clause that uses the key only through `(k + r) // c` (or a split part m1, m0 read as
    m // M0) is constant between multiples of c. Between consecutive breakpoints every clause
    is constant, so one evaluation per segment decides the whole segment.
    """
    at_zero = env.with_index(**{k: torch.tensor(0)})
    ks = sympy.Symbol(k, integer=True)
    out: list[torch.Tensor] = []

    def floors(expr: Expr) -> bool:
        for node in walk(expr):
            if isinstance(node, Index) and env.parts.get(node.name, Part("", "", False)).whole == k:
                offset, c = torch.tensor(0), int(env.scalars[env.parts[node.name].inner])
            elif isinstance(node, Binary) and node.op == "//" and k in whole_vars(node.lhs, env.parts):
                if whole_vars(node.rhs, env.parts) or _coefficient(to_sympy(node.lhs, env), k) != 1:
                    return False
                offset, c = evaluate(node.lhs, at_zero).long(), int(evaluate(node.rhs, env))
            else:
                continue
            first = torch.remainder(-offset, c).reshape(-1, 1)  # first k with (k + offset) % c == 0
            out.append(first + c * torch.arange(-(-extent // c) + 1).view(1, -1))
        return True

    def piecewise(diff: Expr | RowBound) -> bool:
        e = to_sympy(diff, env)
        stripped = e.replace(lambda x: isinstance(x, sympy.floor) and ks in x.free_symbols,
                             lambda x: sympy.Dummy(integer=True))
        if stripped != e:  # the key appears inside floors: constant between their steps
            return ks not in stripped.free_symbols and floors(diff)
        a = _coefficient(e, k)
        if a:  # sign(a*k + r) can flip only at k* = -r/a: isolate floor(k*) as its own segment
            kstar = torch.div(-evaluate(diff, at_zero).long(), a, rounding_mode="floor")
            out.extend([kstar, kstar + 1])
        return a is not None

    for clause in clauses:
        for node in walk(clause):
            if isinstance(node, Binary) and node.op in COMPARISON_OPS:
                if not piecewise(Binary("-", node.lhs, node.rhs)):
                    return None
            elif isinstance(node, Call) and node.fn in PREDICATES:
                if not _interval_breakpoints(node, k, env, piecewise):
                    return None
            elif isinstance(node, Access):
                if not all(piecewise(i) for i in node.indices if k in whole_vars(i, env.parts)):
                    return None
            elif isinstance(node, Call) and node.fn not in ("min", "max"):
                return None
    return out


def _interval_breakpoints(node: Call, k: str, env: Env, piecewise) -> bool:
    """A builtin that is a key interval `lo(q) <= k < hi(q)` flips only at its two ends."""
    interval = PREDICATES[node.fn].key_interval(node.args)
    if interval is None or interval.key != k or k in whole_vars(Index(interval.query), env.parts):
        return False
    lo, hi = (RowBound(evaluate(x, env).long()) for x in (interval.lo, interval.hi))
    return piecewise(Binary("-", Index(k), lo)) and piecewise(Binary("-", Index(k), hi))


# ---------------------------------------------------------------------------- counting


def cumulative(clauses: tuple[Expr, ...], k: str, extent: int, env: Env, edges: torch.Tensor) -> torch.Tensor:
    """For every row of `env` (its index tensors broadcast to rows x 1) and every edge x:
    the number of keys `0 <= k < x` where all clauses hold. Shape: rows x len(edges)."""
    import torch

    rows = torch.broadcast_shapes(*[t.shape for t in env.index.values()])[0] if env.index else 1
    bps = breakpoints(clauses, k, extent, env)
    if bps is None:
        return _dense_cumulative(clauses, k, extent, env, edges, rows)
    segments = 2 + sum(1 if b.dim() == 0 else b.shape[-1] for b in bps)
    if rows * segments > ROW_LIMIT:
        raise PredicateError(f"counting the predicate row by row would hold {rows:.3g} rows x {segments} "
                             f"segments (limit {ROW_LIMIT:.3g}); it reads a tensor or is not "
                             f"index arithmetic, so it has no closed form here")
    cuts = [torch.zeros(rows, 1, dtype=torch.long), torch.full((rows, 1), extent)]
    cuts += [(b.reshape(1, 1) if b.dim() == 0 else b).long().expand(rows, -1) for b in bps]
    cuts = torch.cat(cuts, dim=1).clamp(0, extent).sort(dim=1).values
    lo, hi = cuts[:, :-1].contiguous(), cuts[:, 1:]
    sample = env.with_index(**{k: lo.clamp(max=extent - 1)})
    truth = torch.ones(lo.shape, dtype=torch.bool)
    for clause in clauses:
        truth &= _truth(evaluate(clause, sample)).expand(lo.shape)
    length = (hi - lo) * truth
    before = torch.cat([torch.zeros(rows, 1, dtype=torch.long), length.cumsum(1)], dim=1)  # present keys < lo
    # The segment holding each edge x (lo <= x), then the part of it below x.
    at = edges.view(1, -1).expand(rows, -1).contiguous()
    seg = (torch.searchsorted(lo, at, right=True) - 1).clamp(0, lo.shape[1] - 1)
    inside = (at - lo.gather(1, seg)).clamp(min=0)
    return before.gather(1, seg) + torch.minimum(inside, length.gather(1, seg))


def _dense_cumulative(clauses, k, extent, env, edges, rows) -> torch.Tensor:
    import torch

    if rows * extent > DENSE_LIMIT:
        raise PredicateError(f"the predicate is not piecewise affine along {k} (e.g. it uses //, %, "
                             f"dilation or a tensor read) and evaluating it point by point would "
                             f"take {rows * extent:.3g} points (limit {DENSE_LIMIT:.3g})")
    keys = torch.arange(extent)
    out = []
    step = max(1, CHUNK // max(extent, 1))
    for r0 in range(0, rows, step):
        sub = env.with_index(**{n: (t.expand(rows, 1)[r0:r0 + step] if t.dim() else t)
                               for n, t in env.index.items()})
        sub = sub.with_index(**{k: keys.view(1, -1)})
        truth = torch.ones(min(step, rows - r0), extent, dtype=torch.bool)
        for clause in clauses:
            truth &= _truth(evaluate(clause, sub)).expand(truth.shape)
        cum = torch.cat([torch.zeros(truth.shape[0], 1, dtype=torch.long), truth.long().cumsum(1)], dim=1)
        out.append(cum[:, edges.clamp(0, extent)])
    return torch.cat(out)


def grid(extents: dict[str, int]) -> dict[str, torch.Tensor]:
    """Every combination of the named indices, flattened to rows (each a rows x 1 tensor)."""
    import torch

    names = list(extents)
    if not names:
        return {}
    rows = math.prod(extents.values())
    if rows > ROW_LIMIT:
        raise PredicateError(f"evaluating the predicate row by row would take {rows:.3g} rows of "
                             f"{', '.join(names)} (limit {ROW_LIMIT:.3g}); use smaller shapes")
    mesh = torch.meshgrid(*[torch.arange(extents[n]) for n in names], indexing="ij")
    return {n: m.reshape(-1, 1) for n, m in zip(names, mesh)}


# ---------------------------------------------------------------------------- propagation


def effective_predicates(c: Cascade) -> dict[str, Expr | None]:
    """Each Einsum's predicate joined with the absence it inherits (DESIGN section 2: a map is
    absent wherever an operand is). A tensor's absent points are described by the clauses over
    its own indices; a reduction's output is taken as present (it is absent only where every
    reduced point is, e.g. a fully masked row)."""
    masks: dict[str, list[Expr]] = {}
    out: dict[str, Expr | None] = {}
    for e in topological_einsums(c):
        clauses = conjuncts(e.where)
        for a in einsum_reads(e):
            if masks.get(a.tensor) and not is_carried_read(c, a):
                writer = c.einsum(a.tensor)
                mapping = {idx.name: a.indices[k] for k, idx in enumerate(writer.target.indices)}
                clauses += [substitute(cl, mapping) for cl in masks[a.tensor]]
        clauses = list(dict.fromkeys(clauses))
        out[e.name] = reduce(lambda x, y: Binary("and", x, y), clauses) if clauses else None
        plain = all(isinstance(i, Index) for i in e.target.indices)
        lhs = set(e.lhs_vars)
        masks[e.name] = [cl for cl in clauses if plain and set(index_vars(cl)) <= lhs]
    return out
