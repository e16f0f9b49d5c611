"""Exact evaluation of `where` predicates over index ranges, without enumerating N x N points.

A predicate is split into *components*: groups of its top-level `and` clauses that share index
variables (a 2-D neighborhood `nbhd(px,..) and nbhd(py,..)` has two). Index arithmetic alone is
counted in closed form (cost_model.lattice). A component whose tensor reads see every index
only through block indices (`Sel[b,h,p // 64,m // 64]`) is counted block by block
(`box_count`): the reads are constant on each box of blocks, and the index arithmetic beside
them is counted in closed form once per class of boxes it cannot tell apart. Any other
component is counted row by row: every variable but one *key* variable is enumerated
(vectorized with numpy), and
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
from einsum_ir.functions import torch_function
from einsum_ir.printer import print_expr
from einsum_ir.graph import einsum_reads, is_carried_read, topological_einsums
from einsum_ir.ir import (
    COMPARISON_OPS, Access, Binary, Call, Cascade, Expr, Index, Name, Num, Unary, conjuncts, index_vars,
    substitute, walk,
)

if TYPE_CHECKING:  # numpy is imported by the functions that evaluate rows: the structure
    import numpy   # (conjuncts, components, effective predicates) serves callers that count none

DENSE_LIMIT = 1 << 25  # points the dense fallback may evaluate, in chunks of CHUNK points
CHUNK = 1 << 22
ROW_LIMIT = 1 << 25  # rows x segments one evaluation by segments may hold
BOX_LIMIT = 1 << 24  # boxes one count by blocks may evaluate
CLASS_LIMIT = 1 << 10  # classes of boxes whose index arithmetic a count by blocks counts in closed form


class PredicateError(ValueError):
    """A predicate that cannot be evaluated exactly within the limits; the message says why."""


# ---------------------------------------------------------------------------- structure


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

    value: numpy.ndarray


@dataclass
class Env:
    """What an evaluation reads: index values, scalars (dims, params, tiles), parts, tensors."""

    index: dict[str, numpy.ndarray]
    scalars: dict[str, int | float]
    parts: dict[str, Part]
    tensors: dict[str, numpy.ndarray]

    def with_index(self, **values: numpy.ndarray) -> "Env":
        return Env({**self.index, **values}, self.scalars, self.parts, self.tensors)


def evaluate(expr: Expr | RowBound, env: Env) -> numpy.ndarray:
    """An index expression or predicate, broadcast over the env's index arrays."""
    import numpy as np

    if isinstance(expr, RowBound):
        return expr.value
    if isinstance(expr, Num):
        return np.asarray(expr.value)
    if isinstance(expr, Name):
        return np.asarray(env.scalars[expr.name])
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
        if expr.op in ("//", "%") and np.any(b == 0):
            raise PredicateError(f"{print_expr(expr)} divides by zero at these shapes")
        out = NUMPY_OPERATORS[expr.op](a, b)
        return out & _inside(expr, env) if expr.op in COMPARISON_OPS else out
    if isinstance(expr, Access):
        return _access(expr, env)
    if expr.fn in PREDICATES:
        return _truth(evaluate(PREDICATES[expr.fn].expand(expr.args), env))
    args = [evaluate(a, env) for a in expr.args]
    if expr.fn in NUMPY_FUNCTIONS:
        return NUMPY_FUNCTIONS[expr.fn](*args)
    import torch  # another function of the table: its torch semantics, on these values

    return torch_function(expr.fn)(*map(torch.from_numpy, map(np.ascontiguousarray, args))).numpy()


NUMPY_OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
                   "/": lambda a, b: a / b, "//": lambda a, b: a // b, "%": lambda a, b: a % b,
                   "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
                   ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
# Index math in numpy (// and % floor, as in the spec); other functions go through torch.
NUMPY_FUNCTIONS = {"min": lambda a, b: __import__("numpy").minimum(a, b),
                   "max": lambda a, b: __import__("numpy").maximum(a, b),
                   "abs": lambda a: abs(a)}


def _truth(v: numpy.ndarray) -> numpy.ndarray:
    return v if v.dtype == bool else v != 0


def as_array(value) -> numpy.ndarray:
    """A tensor's values as a numpy array (a torch tensor is copied off its device)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value
    t = value.detach().cpu()
    return (t.double() if t.is_floating_point() else t).numpy()


def _access(a: Access, env: Env) -> numpy.ndarray:
    import numpy as np

    if a.tensor not in env.tensors:
        raise TensorValuesNeeded(f"the predicate reads tensor {a.tensor}, so the mask depends on its "
                                 f"values; pass it with the shapes, e.g. shapes={{'{a.tensor}': tensor}}",
                                 a.tensor)
    t = env.tensors[a.tensor]
    idx, inside = _indices(a, env)
    if t.size == 0:  # every read lies outside an empty tensor
        values = np.zeros(inside.shape, dtype=t.dtype)
    else:
        values = t[tuple(idx) if inside.all() else tuple(np.clip(i, 0, t.shape[k] - 1) for k, i in enumerate(idx))]
    # A boolean tensor is a predicate, false where the read is outside it; an integer one is a
    # value (`m < Len[b]`), and the comparison that reads it is false there (`_inside`).
    return _truth(values) & inside if t.dtype == bool else values


def _indices(a: Access, env: Env) -> tuple[list[numpy.ndarray], numpy.ndarray]:
    """The read's index arrays and where they lie inside the tensor."""
    import numpy as np

    t = env.tensors[a.tensor]
    idx = np.broadcast_arrays(*[np.asarray(evaluate(i, env)).astype(np.int64) for i in a.indices])
    inside = np.ones(idx[0].shape, dtype=bool)
    for k, i in enumerate(idx):
        inside &= (i >= 0) & (i < t.shape[k])
    return list(idx), inside


def _inside(expr: Expr, env: Env):
    """Where every value read of an integer tensor in `expr` lies inside it (True if none): a
    comparison with an absent operand is false, as in the interpreter."""
    inside = True
    for node in walk(expr):
        if isinstance(node, Access) and node.tensor in env.tensors and env.tensors[node.tensor].dtype != bool:
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
    # ordered by name: sorting the symbols themselves would compare them as sympy relations
    return sympy.Function("opaque")(*(sympy.Symbol(v, integer=True) for v in sorted(index_vars(expr))))


def _coefficient(e: sympy.Expr, k: str) -> int | None:
    """`a` when `e = a*k + (terms free of k)` with integer `a` (0 when k is absent), else None."""
    ks = sympy.Symbol(k, integer=True)
    if ks not in e.free_symbols:
        return 0
    a = sympy.simplify(sympy.diff(e, ks))
    if a.free_symbols or not a.is_integer or ks in sympy.simplify(e - a * ks).free_symbols:
        return None
    return int(a)


def breakpoints(clauses: tuple[Expr, ...], k: str, extent: int, env: Env) -> list[numpy.ndarray] | None:
    """Per-row key values around which some clause may change truth, or None when a clause
    is not piecewise constant in the key (then the caller evaluates every key).

    Each array is rows x n (or broadcasts to it). An affine clause flips only around one key;
    a clause that uses the key only through `(k + r) // c` (or a split part m1, m0 read as
    m // M0) is constant between multiples of c. Between consecutive breakpoints every clause
    is constant, so one evaluation per segment decides the whole segment.
    """
    import numpy as np

    at_zero = env.with_index(**{k: np.asarray(0)})
    ks = sympy.Symbol(k, integer=True)
    out: list[numpy.ndarray] = []

    def piecewise(diff: Expr | RowBound) -> bool:
        e = to_sympy(diff, env)
        stripped = e.replace(lambda x: isinstance(x, sympy.floor) and ks in x.free_symbols,
                             lambda x: sympy.Dummy(integer=True))
        if stripped != e:  # the key appears inside floors: constant between their steps
            return ks not in stripped.free_symbols and _floor_cuts(diff, k, extent, env, out)
        a = _coefficient(e, k)
        if a:  # sign(a*k + r) can flip only at k* = -r/a: isolate floor(k*) as its own segment
            kstar = np.floor_divide(-np.asarray(evaluate(diff, at_zero)).astype(np.int64), a)
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


def _floor_cuts(expr: Expr | RowBound, k: str, extent: int, env: Env, out: list) -> bool:
    """Append to `out` the keys where a floor of `expr` over the key steps (`(k + r) // c`, or a
    split part of k: its tile); False when one is not of that form (a coefficient other than 1
    on the key, or a divisor that reads an index)."""
    import numpy as np

    at_zero = env.with_index(**{k: np.asarray(0)})
    for node in walk(expr) if not isinstance(expr, RowBound) else ():
        if isinstance(node, Index) and env.parts.get(node.name, Part("", "", False)).whole == k:
            offset, c = np.asarray(0), int(env.scalars[env.parts[node.name].inner])
        elif isinstance(node, Binary) and node.op == "//" and k in whole_vars(node.lhs, env.parts):
            if whole_vars(node.rhs, env.parts) or _coefficient(to_sympy(node.lhs, env), k) != 1:
                return False
            offset, c = np.asarray(evaluate(node.lhs, at_zero)).astype(np.int64), int(evaluate(node.rhs, env))
            if c <= 0:
                return False
        else:
            continue
        first = np.remainder(-offset, c).reshape(-1, 1)  # first k with (k + offset) % c == 0
        out.append(first + c * np.arange(-(-extent // c) + 1).reshape(1, -1))
    return True


def _interval_breakpoints(node: Call, k: str, env: Env, piecewise) -> bool:
    """A builtin that is a key interval `lo(q) <= k < hi(q)` flips only at its two ends."""
    import numpy as np

    interval = PREDICATES[node.fn].key_interval(node.args)
    if interval is None or interval.key != k or k in whole_vars(Index(interval.query), env.parts):
        return False
    lo, hi = (RowBound(np.asarray(evaluate(x, env)).astype(np.int64)) for x in (interval.lo, interval.hi))
    return piecewise(Binary("-", Index(k), lo)) and piecewise(Binary("-", Index(k), hi))


# ---------------------------------------------------------------------------- counting


def cumulative(clauses: tuple[Expr, ...], k: str, extent: int, env: Env, edges: numpy.ndarray) -> numpy.ndarray:
    """For every row of `env` (its index arrays broadcast to rows x 1) and every edge x:
    the number of keys `0 <= k < x` where all clauses hold. Shape: rows x len(edges)."""
    import numpy as np

    rows = np.broadcast_shapes(*[np.shape(t) for t in env.index.values()])[0] if env.index else 1
    edges = np.asarray(edges, dtype=np.int64)
    bps = breakpoints(clauses, k, extent, env)
    if bps is None:
        return _dense_cumulative(clauses, k, extent, env, edges, rows)
    segments = 2 + sum(1 if np.ndim(b) == 0 else np.shape(b)[-1] for b in bps)
    if rows * segments > ROW_LIMIT:
        raise PredicateError(f"counting the predicate row by row would hold {rows:.3g} rows x {segments} "
                             f"segments (limit {ROW_LIMIT:.3g}); it reads a tensor or is not "
                             f"index arithmetic, so it has no closed form here")
    cuts = [np.zeros((rows, 1), dtype=np.int64), np.full((rows, 1), extent, dtype=np.int64)]
    cuts += [np.broadcast_to(np.asarray(b, dtype=np.int64).reshape(1, 1) if np.ndim(b) == 0 else b,
                             (rows, np.shape(b)[-1] if np.ndim(b) else 1)) for b in bps]
    cuts = np.sort(np.clip(np.concatenate(cuts, axis=1), 0, extent), axis=1)
    lo, hi = cuts[:, :-1], cuts[:, 1:]
    sample = env.with_index(**{k: np.minimum(lo, extent - 1)})
    truth = np.ones(lo.shape, dtype=bool)
    for clause in clauses:
        truth &= np.broadcast_to(_truth(evaluate(clause, sample)), lo.shape)
    length = (hi - lo) * truth
    before = np.concatenate([np.zeros((rows, 1), dtype=np.int64), length.cumsum(1)], axis=1)  # present keys < lo
    # The segment holding each edge x (lo <= x), then the part of it below x.
    at = np.broadcast_to(edges.reshape(1, -1), (rows, edges.size))
    seg = np.clip(_searchsorted_rows(lo, at, extent) - 1, 0, lo.shape[1] - 1)
    inside = np.maximum(at - np.take_along_axis(lo, seg, 1), 0)
    return np.take_along_axis(before, seg, 1) + np.minimum(inside, np.take_along_axis(length, seg, 1))


def _searchsorted_rows(lo: numpy.ndarray, at: numpy.ndarray, extent: int) -> numpy.ndarray:
    """For each row r and column j: how many of lo[r] (sorted, in [0, extent]) are <= at[r, j].
    One flat search with the rows offset apart, in chunks of rows whose offsets fit in int64."""
    import numpy as np

    rows, width = lo.shape
    span = extent + 2
    at = np.clip(at, 0, extent + 1)
    step = max(1, ((1 << 62) // span) - 1)
    out = np.empty(at.shape, dtype=np.int64)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        offset = (np.arange(n, dtype=np.int64) * span).reshape(-1, 1)
        found = np.searchsorted((lo[r0:r0 + n] + offset).ravel(), (at[r0:r0 + n] + offset).ravel(), side="right")
        out[r0:r0 + n] = found.reshape(n, -1) - np.arange(n, dtype=np.int64).reshape(-1, 1) * width
    return out


def _dense_cumulative(clauses, k, extent, env, edges, rows) -> numpy.ndarray:
    import numpy as np

    if rows * extent > DENSE_LIMIT:
        raise PredicateError(f"the predicate is not piecewise affine along {k} (e.g. it uses //, %, "
                             f"dilation or a tensor read) and evaluating it point by point would "
                             f"take {rows * extent:.3g} points (limit {DENSE_LIMIT:.3g})")
    keys = np.arange(extent)
    out = []
    step = max(1, CHUNK // max(extent, 1))
    for r0 in range(0, rows, step):
        sub = env.with_index(**{n: (np.broadcast_to(t, (rows, 1))[r0:r0 + step] if np.ndim(t) else t)
                               for n, t in env.index.items()})
        sub = sub.with_index(**{k: keys.reshape(1, -1)})
        truth = np.ones((min(step, rows - r0), extent), dtype=bool)
        for clause in clauses:
            truth &= np.broadcast_to(_truth(evaluate(clause, sub)), truth.shape)
        cum = np.concatenate([np.zeros((truth.shape[0], 1), dtype=np.int64), truth.cumsum(1)], axis=1)
        out.append(cum[:, np.clip(edges, 0, extent)])
    return np.concatenate(out)


def grid(extents: dict[str, int]) -> dict[str, numpy.ndarray]:
    """Every combination of the named indices, flattened to rows (each a rows x 1 array)."""
    import numpy as np

    names = list(extents)
    if not names:
        return {}
    rows = math.prod(extents.values())
    if rows > ROW_LIMIT:
        raise PredicateError(f"evaluating the predicate row by row would take {rows:.3g} rows of "
                             f"{', '.join(names)} (limit {ROW_LIMIT:.3g}); use smaller shapes")
    mesh = np.meshgrid(*[np.arange(extents[n]) for n in names], indexing="ij")
    return {n: m.reshape(-1, 1) for n, m in zip(names, mesh)}


# ---------------------------------------------------------------------------- counting by blocks


def box_count(clauses: tuple[Expr, ...], variables: tuple[str, ...], extents: dict[str, int],
              scalars: dict[str, int], parts: dict[str, Part], tensors: dict) -> int | None:
    """The points of prod_v [0, extents[v]) where every clause holds, counted box by box, or
    None when the clauses are not of the form this counts (the caller counts row by row).

    The form: every clause that reads a tensor sees the index variables only inside the read's
    indices, each index over one variable and either a block index of it (`p // BS`, a split
    part) or anything over it (then every value is its own block). Cutting each variable at its
    blocks' edges makes boxes on which every read, so every such clause, is constant: one
    evaluation per box, with no row enumerated (P x M / BS^2 boxes for `Sel[.., p // BS, m // BS]`,
    not P x M / BS rows). The index arithmetic beside them (`m <= p`) is counted on each box in
    closed form: a box on which each affine comparison holds everywhere or nowhere from its
    corner, the others (the diagonal band of `m <= p`) with cost_model.lattice once per class of
    boxes it cannot tell apart (one size, each comparison in one state and at one offset: the
    count is invariant under that translation). Exact, with Python integers for the total."""
    import numpy as np

    from einsum_ir.cost_model import lattice

    reads = [cl for cl in clauses if any(isinstance(n, Access) for n in walk(cl))]
    arith = [cl for cl in clauses if not any(isinstance(n, Access) for n in walk(cl))]
    env = Env({}, scalars, parts, tensors)
    cuts: dict[str, list] = {v: [np.array([0, extents[v]], dtype=np.int64)] for v in variables}
    if not reads or not all(_block_cuts(cl, extents, env, cuts) for cl in reads):
        return None
    if any(isinstance(n, Index) and n.name in parts for cl in arith for n in walk(cl)):
        return None  # a split part of an arithmetic clause does not move with its whole's box
    lo, size = {}, {}
    for v in variables:
        edges = np.unique(np.clip(np.concatenate([c.ravel() for c in cuts[v]]), 0, extents[v]))
        lo[v], size[v] = edges[:-1], np.diff(edges)
    shape = [len(lo[v]) for v in variables]
    if 0 in shape:
        return 0
    if math.prod(shape) > BOX_LIMIT:
        return None
    axis = {v: k for k, v in enumerate(variables)}
    along = lambda v, x: x.reshape([-1 if k == axis[v] else 1 for k in range(len(variables))])  # noqa: E731
    boxes = env.with_index(**{v: along(v, lo[v]) for v in variables})
    truth = np.ones(shape, dtype=bool)
    for clause in reads:
        truth &= np.broadcast_to(_truth(evaluate(clause, boxes)), shape)
    # Present points per box = truth x (the arithmetic's count on the box's own variables) x the
    # sizes along the others: weigh each box of the arithmetic's variables by the rest.
    own = sorted({v for cl in arith for v in whole_vars(cl, parts)}, key=axis.get)
    dtype = np.int64 if math.prod(extents.values()) < 1 << 62 else object  # past int64: Python integers
    weight = truth
    for v in (v for v in variables if v not in own and len(lo[v]) > 1):
        weight = (weight.sum(axis=axis[v], keepdims=True, dtype=dtype) if (size[v] == 1).all()
                  else (weight * along(v, size[v].astype(dtype))).sum(axis=axis[v], keepdims=True))
    for v in (v for v in variables if v not in own and len(lo[v]) == 1 and size[v][0] != 1):
        weight = weight * dtype(size[v][0]) if dtype is np.int64 else weight * int(size[v][0])
    shape = [len(lo[v]) for v in own]
    weight = weight.reshape(shape)
    if not own:
        return int(np.sum(weight, dtype=dtype))
    forms = _affine_forms(arith, own, env)
    if forms is None and math.prod(shape) > CLASS_LIMIT:
        return None  # not affine: every box would be a class of its own
    # A box on which every comparison holds everywhere or nowhere (not `partial`): the clauses'
    # truth at its corner holds on all of it. In slices of the first variable's boxes.
    partial, whole = np.empty(shape, dtype=bool), np.empty(shape, dtype=bool)
    step = max(1, (1 << 18) // max(1, math.prod(shape[1:])))
    for r0 in range(0, shape[0], step):
        cut = {v: lo[v][r0:r0 + step] if i == 0 else lo[v] for i, v in enumerate(own)}
        corner = {v: x.reshape([-1 if k == i else 1 for k in range(len(own))]) for i, (v, x) in enumerate(cut.items())}
        sizes = {v: (size[v][r0:r0 + step] if i == 0 else size[v]).reshape(corner[v].shape) for i, v in enumerate(own)}
        part = np.full([len(cut[v]) for v in own], forms is None)
        for always, never, _ in _states(forms or [], corner, sizes):
            part |= ~(always | never)
        partial[r0:r0 + step] = part
        holds = ~part
        for clause in arith:
            holds &= np.broadcast_to(_truth(evaluate(clause, env.with_index(**corner))), part.shape)
        whole[r0:r0 + step] = holds
    whole &= weight != 0
    at = np.nonzero(whole.ravel())[0]
    point = dict(zip(own, np.unravel_index(at, shape)))
    volume = math.prod(size[v][point[v]].astype(dtype) for v in own)
    total = int(np.sum(weight.ravel()[at] * volume))
    # The others, once per class of boxes the arithmetic cannot tell apart.
    at = np.nonzero((partial & (weight != 0)).ravel())[0]
    if not len(at):
        return total
    point = dict(zip(own, np.unravel_index(at, shape)))
    box_lo, box_size = {v: lo[v][point[v]] for v in own}, {v: size[v][point[v]] for v in own}
    key = [box_size[v] for v in own]
    if forms is None:
        key += [box_lo[v] for v in own]
    for always, never, s in _states(forms or [], box_lo, box_size):
        split = ~(always | never)
        key += [np.where(always, 1, np.where(never, 2, 0)), np.where(split, s, 0)]
    classes, first, inverse = np.unique(np.stack(key, axis=1), axis=0, return_index=True, return_inverse=True)
    if len(classes) > CLASS_LIMIT:
        return None
    per_class = np.zeros(len(classes), dtype=dtype)
    np.add.at(per_class, inverse.ravel(), weight.ravel()[at])
    for c, k in enumerate(first):
        offset = {v: Binary("+", Index(v), Num(int(box_lo[v][k]))) for v in own}
        try:
            n = lattice.count(tuple(substitute(cl, offset) for cl in arith), tuple(own),
                              {v: int(box_size[v][k]) for v in own}, scalars, parts)
        except lattice.Unsupported:
            return None
        total += int(per_class[c]) * n
    return total


def _block_cuts(clause: Expr, extents: dict[str, int], env: Env, cuts: dict[str, list]) -> bool:
    """Add to `cuts` the edges of the blocks on which the tensor reads of `clause` are constant;
    False when the clause is not of box form (see `box_count`)."""
    import numpy as np

    def outside(e: Expr):  # nodes not inside a read's indices
        yield e
        if not isinstance(e, Access):
            for child in (e.operand,) if isinstance(e, Unary) else (
                    (e.lhs, e.rhs) if isinstance(e, Binary) else getattr(e, "args", ())):
                yield from outside(child)

    if any(isinstance(n, Index) for n in outside(clause)):
        return False
    for a in (n for n in walk(clause) if isinstance(n, Access)):
        for i in a.indices:
            if any(isinstance(n, Access) for n in walk(i)):
                return False  # an indirect read: the inner read's values decide the outer index
            vs = whole_vars(i, env.parts)
            if len(vs) > 1:
                return False
            if not vs:
                continue
            (v,) = vs
            e, vsym = to_sympy(i, env), sympy.Symbol(v, integer=True)
            stripped = e.replace(lambda x: isinstance(x, sympy.floor) and vsym in x.free_symbols,
                                 lambda x: sympy.Dummy(integer=True))
            steps: list = []
            if stripped != e and vsym not in stripped.free_symbols and _floor_cuts(i, v, extents[v], env, steps):
                cuts[v] += steps
            elif extents[v] <= BOX_LIMIT:  # any other index over v: every value its own block
                cuts[v].append(np.arange(extents[v] + 1, dtype=np.int64))
            else:
                return False
    return True


def _affine_forms(arith: list[Expr], own: list[str], env: Env) -> list[tuple[str, list[int], int]] | None:
    """Each comparison of the clauses as (op, integer coefficients over `own`, constant) of
    lhs - rhs, or None unless every clause is and/or/not of such affine comparisons."""
    comparisons: list[Binary] = []

    def tree(e: Expr) -> bool:
        if isinstance(e, Binary) and e.op in ("and", "or"):
            return tree(e.lhs) and tree(e.rhs)
        if isinstance(e, Unary) and e.op == "not":
            return tree(e.operand)
        if isinstance(e, Binary) and e.op in COMPARISON_OPS:
            comparisons.append(e)
            return True
        return False

    if not all(tree(cl) for cl in arith):
        return None
    forms = []
    for cmp in comparisons:
        f = sympy.expand(to_sympy(Binary("-", cmp.lhs, cmp.rhs), env))
        coeffs = [_coefficient(f, v) for v in own]
        if None in coeffs:
            return None
        rest = sympy.expand(f - sum(a * sympy.Symbol(v, integer=True) for a, v in zip(coeffs, own)))
        if not rest.is_Integer:
            return None
        forms.append((cmp.op, coeffs, int(rest)))
    return forms


def _states(forms: list, lo: dict, size: dict):
    """Per affine comparison, over boxes (first points `lo`, sizes `size` per variable, arrays
    that broadcast): where it holds on the whole box, where on none of it, and the form's value
    at the box's first point."""
    import numpy as np

    for op, coeffs, rest in forms:
        s = sum(a * lo[v] for a, v in zip(coeffs, lo)) + rest
        low = s + sum(np.minimum(0, a * (size[v] - 1)) for a, v in zip(coeffs, lo))
        high = s + sum(np.maximum(0, a * (size[v] - 1)) for a, v in zip(coeffs, lo))
        if op in ("<", "<="):
            always, never = (high < 0, low >= 0) if op == "<" else (high <= 0, low > 0)
        elif op in (">", ">="):
            always, never = (low > 0, high <= 0) if op == ">" else (low >= 0, high < 0)
        else:
            exact, apart = (low == 0) & (high == 0), (low > 0) | (high < 0)
            always, never = (exact, apart) if op == "==" else (apart, exact)
        yield always, never, s


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
