"""Reverse-mode differentiation of a cascade, as a cascade transformation (`ei.grad`).

The backward is derived from the cascade the forward kernel runs (the lowered one: division
deferred, scores in base 2), mechanically, one Einsum at a time, in reverse order:

- `Z[z] = sum_r f(..., A[a], ...) where pred` gives `dA[a] += sum (dZ[z] * df/dA) where pred`,
  the sum over Z's indices that A lacks: a contraction's gradient is a contraction; an
  elementwise map is the chain rule, with each function's partial derivatives from its registry
  entry (`einsum_ir.functions`). The predicate carries over, so absent points get no gradient.
- `Z = max_r S` gets no gradient when the outputs do not depend on it: shifting Z by any t
  leaves every output unchanged, which is shown symbolically (`exp2(S - Z - t)` scales the
  numerator and the denominator alike). Otherwise the gradient goes to the maximal points.
- A tensor read by several Einsums sums their contributions.

The forward saves the final values of its carried reductions (the running max GM and the
denominator SD: O(N); a numerator such as O_num is read back from the output, O * SD, when the
output's map of it inverts); the backward reads them instead of reducing again, and recomputes everything else (scores and
their maps) tile by tile. A row that saw no key saves a safe value (0 for a max, 1 for a sum),
so the backward's arithmetic stays finite there; its points are absent anyway.

The gradients that read per-query values alone (FlashAttention-2's `D = rowsum(dO * O)`,
here `dSD_O`) form a *prologue* cascade with no key rank. Every other gradient is one
*key-tile* cascade: the planner (lowering/stream_keys.py) streams the queries under a key tile,
since fewer of its outputs keep the query rank. dK, dV and per-key tensors are carried sums of
the program; dQ and other per-query gradients are summed tile by tile into their output across
programs (plan kind `tile_sum`); a bias over both ranks is written tile by tile; a per-head
scalar is summed across programs. An input read at both token ranks (FoX's gate G[p] - G[m],
symmetric attention's Q[p] * Q[m]) gets one contribution per reading, one per query and one per
key; the kernel returns each as its own output, and an *epilogue* cascade adds them position by
position after it (a few tensor ops over O(N) values). docs/backward.md has the whole account.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import sympy

from einsum_ir.errors import LoweringError, located
from einsum_ir.functions import FUNCTIONS, UNIONS
from einsum_ir.graph import cascade_graph
from einsum_ir.ir import (
    FLOAT_DTYPES, Access, Binary, Call, Cascade, Einsum, Expr, Index, InputDecl, Name, Num, Output,
    Unary, accesses, conjuncts, index_vars, rank_of, rebuild, walk,
)
from einsum_ir.lowering.defer import prune
from einsum_ir.lowering.exprs import tensors_read, to_sympy

# A saved carried value of a row that saw nothing: finite, and a divisor's 1 (DESIGN section 2:
# its points are absent, so the value never reaches a result).
SAFE_FILL = {"max": 0.0, "sum": 1.0}


@dataclass(frozen=True)
class Gradient:
    """The forward for training and its backward cascades.

    `forward` is the lowered forward with the saved values appended to its outputs; each
    cascade in `backward` takes the forward's inputs, the saved values and the incoming
    gradient of every output (`seeds`: output -> its name), and returns gradients (`grads`:
    input -> its name). `zero` lists the floating inputs whose gradient is identically 0."""

    cascade: Cascade
    forward: Cascade
    outputs: tuple[str, ...]
    saved: tuple[str, ...]
    prologue: Cascade | None
    backward: tuple[Cascade, ...]
    seeds: Mapping[str, str]
    grads: Mapping[str, str]
    zero: tuple[str, ...] = ()
    shift_only: tuple[str, ...] = ()  # maxima that only shift an exp: no gradient flows through them
    epilogue: Cascade | None = None  # sums of per-reading contributions, after the kernels

    @property
    def fp32(self) -> frozenset[str]:
        """The values the training kernels hold in fp32 whatever the element type: the saved
        statistics, and the prologue's row values the backward kernel reads."""
        return frozenset(self.saved) | frozenset(self.prologue.output_names if self.prologue is not None else ())

    @property
    def cascades(self) -> tuple[Cascade, ...]:
        """The backward's cascades in the order they run (the prologue first)."""
        return ((self.prologue,) if self.prologue is not None else ()) + self.backward + \
            ((self.epilogue,) if self.epilogue is not None else ())

    def __str__(self) -> str:
        parts = ["# training forward: the forward, saving " + (", ".join(self.saved) or "nothing more"),
                 str(self.forward)]
        if self.prologue is not None:
            parts += ["# backward prologue: per-query values (row statistics), no key loop", str(self.prologue)]
        for k, b in enumerate(self.backward):
            parts += ["# backward: the gradients' cascade (its lowering below)", str(b)]
        if self.epilogue is not None:
            parts += ["# backward epilogue: each input's contributions from its readings at both token ranks, "
                      "added", str(self.epilogue)]
        return "\n".join(parts)


# ---------------------------------------------------------------------------- expressions


def _zero(e: Expr) -> bool:
    return isinstance(e, Num) and e.value == 0


def _one(e: Expr) -> bool:
    return isinstance(e, Num) and e.value == 1


def add(a: Expr, b: Expr) -> Expr:
    if _zero(a):
        return b
    if _zero(b):
        return a
    if isinstance(b, Unary) and b.op == "-":
        return Binary("-", a, b.operand)
    return Binary("+", a, b)


def mul(a: Expr, b: Expr) -> Expr:
    if _zero(a) or _zero(b):
        return Num(0)
    if _one(a):
        return b
    if _one(b):
        return a
    return Binary("*", a, b)


def neg(a: Expr) -> Expr:
    if _zero(a):
        return a
    if isinstance(a, Unary) and a.op == "-":
        return a.operand
    return Unary("-", a)


def diff(expr: Expr, target: Access, value: Expr | None = None) -> Expr:
    """d expr / d target for one plain access `target`: a partial derivative, so a read of the
    same tensor at other indices (another reading, `_reads` lists each) is held fixed. `value`,
    when given, holds expr's own value (the tensor an Einsum writes), so `d exp(x) = exp(x) dx`
    reads it instead of recomputing it."""
    if isinstance(expr, (Num, Name, Index)):
        return Num(0)
    if isinstance(expr, Access):
        if expr.tensor != target.tensor:
            return Num(0)
        return Num(1) if expr == target else Num(0)
    if isinstance(expr, Unary):
        return Num(0) if expr.op == "not" else neg(diff(expr.operand, target))
    if isinstance(expr, Binary):
        if expr.op in ("+", "-"):
            da, db = diff(expr.lhs, target), diff(expr.rhs, target)
            return add(da, neg(db) if expr.op == "-" else db)
        if expr.op == "*":
            return add(mul(diff(expr.lhs, target), expr.rhs), mul(expr.lhs, diff(expr.rhs, target)))
        if expr.op == "/":
            da, db = diff(expr.lhs, target), diff(expr.rhs, target)
            out = Binary("/", da, expr.rhs) if not _zero(da) else Num(0)
            if not _zero(db):
                out = add(out, neg(Binary("/", mul(expr.lhs, db), mul(expr.rhs, expr.rhs))))
            return out
        if any(a.tensor == target.tensor for a in accesses(expr)) and expr.op in ("//", "%"):
            raise LoweringError(located(expr, f"{_text(expr)} is integer arithmetic on {target.tensor}: no gradient"))
        return Num(0)  # comparisons, and, or: piecewise constant
    assert isinstance(expr, Call)
    if expr.fn in UNIONS and any(a.tensor == target.tensor for a in accesses(expr)):
        # its value depends on which operands are present: no point-by-point derivative
        raise LoweringError(located(expr, f"{expr.fn}(...) has no derivative point by point: which operands it "
                                          f"adds depends on their presence; the key loop differentiates the "
                                          f"cascade after eliminating its unions (lowering/unions.py)"))
    if expr.fn not in FUNCTIONS:  # a predicate builtin
        return Num(0)
    f = FUNCTIONS[expr.fn]
    out: Expr = Num(0)
    for k, arg in enumerate(expr.args):
        d = diff(arg, target)
        if _zero(d):
            continue
        if f.derivative[k] is None:
            raise LoweringError(located(expr, f"{expr.fn}(...) has no derivative in argument {k + 1}, which reads "
                                          f"{target.tensor}; add one to its entry in einsum_ir/functions.py"))
        out = add(out, mul(f.derivative[k](expr.args, value if value is not None else expr), d))
    return out



def _text(e: Expr) -> str:
    from einsum_ir.printer import print_expr

    return print_expr(e)


# ---------------------------------------------------------------------------- shift invariance


def shift_invariant(c: Cascade, name: str) -> bool:
    """Whether every output of `c` stays the same when the max `name` is shifted by any t.

    The shift reaches the outputs as an offset or a factor of t (`exp2(S - Z)`), or as a factor
    of t and of the max itself: the scale argument of a scaled function (lowering.underflow's
    `softplus_scaled(S, max(-Z, 0))`), a factor of the row that cancels in a normalization."""
    t = sympy.Symbol("_shift", real=True)
    z = sympy.Symbol("T_" + name)
    rows = tuple(i.name for i in c.einsum(name).target.indices if isinstance(i, Index))
    return _invariant(c, name, ("offset", t), {t, z}, {z}, rows)


def scale_invariant(c: Cascade, name: str, rows: tuple[str, ...]) -> bool:
    """Whether every output of `c` stays the same when `name` is multiplied by any positive
    factor that depends on the index variables `rows` alone (a normalization over the others)."""
    lam = sympy.Symbol("_scale", positive=True)
    return _invariant(c, name, ("factor", lam), {lam}, {lam}, rows)


def _invariant(c: Cascade, name: str, start: tuple[str, sympy.Expr], allowed: set, per_row: set,
               rows: tuple[str, ...]) -> bool:
    """Whether the outputs are unchanged when `name` changes by `start` (an offset or a factor).

    Each tensor's changed value is tracked as its own value times a factor, or plus an offset,
    in the symbols `allowed` (sympy decides which form an Einsum keeps); a sum passes a factor
    through, a max passes an offset or a positive factor; an output must come back unchanged.
    A change in a `per_row` symbol differs from row to row (`rows`, the index variables it
    depends on): it may not be reduced over a row rank, and it is read only at the tensor's own
    index variables, so that one symbol means the same row everywhere."""
    graph = cascade_graph(c)
    change: dict[str, tuple[str, sympy.Expr]] = {name: start}
    for e in graph.order:
        if e.name == name or not (graph.ancestors[e.name] & set(change)):
            continue
        if e.where is not None and set(tensors_read(e.where)) & set(change):
            return False
        old = to_sympy(e.expr, lambda a: sympy.Symbol("T_" + a.tensor))

        def shifted(a: Access):
            s = sympy.Symbol("T_" + a.tensor)
            kind, v = change.get(a.tensor, ("factor", sympy.Integer(1)))
            return s * v if kind == "factor" else s + v

        new = to_sympy(e.expr, shifted)
        form = _form(old, new, allowed)
        if form is None:
            return False
        kind, v = form
        row_wise = {t for t, (_, w) in change.items() if w.free_symbols & per_row}
        if v.free_symbols & per_row:  # the row's own value of `name` entered here
            row_wise.add(name)
        if set(tensors_read(e.expr)) & row_wise and (
                set(e.reduced) & set(rows)
                or any(a.tensor in row_wise and a.indices != c.einsum(a.tensor).target.indices
                       for a in accesses(e.expr))):
            return False
        unchanged = (v - 1 if kind == "factor" else v).is_zero  # 1.0 and 0.0 too: sympy's Float(1.0) != 1
        if e.reduced and e.reduce == "sum" and kind == "offset" and not unchanged:
            return False  # an offset summed over points grows with their count
        if e.reduced and e.reduce == "max" and kind == "factor" and not v.is_positive:
            return False
        if e.reduced and e.reduce not in ("sum", "max"):
            return False
        if not unchanged:
            change[e.name] = (kind, v)
    return not set(change) & set(c.output_names)


def _form(old: sympy.Expr, new: sympy.Expr, allowed: set) -> tuple[str, sympy.Expr] | None:
    ratio = sympy.simplify(sympy.powsimp(new / old, force=True)) if old != 0 else None
    if ratio is not None and ratio.free_symbols <= allowed:
        return "factor", ratio
    offset = sympy.simplify(new - old)
    if offset.free_symbols <= allowed:
        return "offset", offset
    return None


# ---------------------------------------------------------------------------- the derivation


class FreshNames:
    """`names(base)`: base, or base2, base3, ... whichever no tensor, dim or param takes yet."""

    def __init__(self, taken):
        self.taken = set(taken)

    def __call__(self, base: str) -> str:
        name, k = base, 2
        while name in self.taken:
            name, k = f"{base}{k}", k + 1
        self.taken.add(name)
        return name


def grad(c: Cascade) -> Gradient:
    """The training forward and the backward cascades of `c` (LoweringError when the backward
    cannot be derived: recurrences, several forward stages, reads at shifted indices)."""
    from einsum_ir.lowering.chunked_scan import ScanPlan
    from einsum_ir.lowering.strategy import bounded_shifts, choose, key_loop_plan

    c = bounded_shifts(c)
    if isinstance(choose(c)[0], ScanPlan):
        g = _scan_gradient(c)
        if all(choose(b)[0] is not None for b in g.backward):
            return g
        try:  # the scan's backward does not lower: the key loop's quadratic one, where it has one
            key_loop_plan(c)
        except LoweringError:
            return g
    plan = key_loop_plan(c)
    if len(plan.stages) != 1:
        raise LoweringError(f"the forward runs {len(plan.stages)} stages (an intermediate between two key "
                            f"loops); the backward is derived for one-stage forwards")
    lowered = plan.cascade
    (stage,) = plan.stages
    saved = tuple(e.name for e in stage.einsums if stage.kind(e.name) == "carried")
    names = FreshNames(list(lowered.tensors) + list(lowered.dims) + [p.name for p in lowered.params])
    seeds = {o: names("d" + o) for o in lowered.output_names}
    floating = [d.name for d in lowered.inputs if (d.dtype or "fp32") in FLOAT_DTYPES]
    grads_of, einsums, shift_only = _reverse(lowered, seeds, names)
    einsums = _recover_from_outputs(lowered, saved, einsums)
    recomputed = [e for e in lowered.einsums if e.name not in saved and e.name not in lowered.output_names]
    read = {t for e in einsums + recomputed for t in tensors_read(e.expr) + tensors_read(e.where)}
    saved = tuple(n for n in saved if n in read and n not in lowered.output_names)
    grads = {x: grads_of[x] for x in floating if x in grads_of}
    zero = tuple(x for x in floating if x not in grads_of)
    joined = [e for e in einsums if e.name in grads.values() and _joins_partner_readings(e, einsums)]
    einsums = [e for e in einsums if e not in joined]
    # what the kernels return: the gradients, or, for a joined one, its contributions
    kernel_grads = [n for n in grads.values() if n not in {e.name for e in joined}]
    kernel_grads += list(dict.fromkeys(t for e in joined for t in tensors_read(e.expr)))
    forward = _training_forward(lowered, stage, saved)
    inputs = _backward_inputs(lowered, saved, seeds)
    recomputed = [e for e in lowered.einsums if e.name not in saved and e.name not in lowered.output_names]
    per_query = _per_query(recomputed + einsums, set(stage.stream), inputs)
    keyed = [e for e in einsums if e.name not in per_query]
    early = [e.name for e in einsums if e.name in per_query and (
        e.name in kernel_grads or e.reduced and any(e.name in tensors_read(k.expr) + tensors_read(k.where)
                                                    for k in keyed))]
    prologue = None
    if early:
        prologue = _backward_cascade(lowered, saved, inputs, [e for e in einsums if e.name in per_query], early,
                                     recompute=[e for e in recomputed if e.name in per_query])
    late = [n for n in kernel_grads if n not in early]
    backward = ()
    if late:
        given = tuple(InputDecl(n, tuple(i.name for i in _einsum(einsums, n).target.indices)) for n in early)
        backward = (_backward_cascade(lowered, saved, inputs + given,
                                      [e for e in einsums if e.name not in early], late),)
    epilogue = None
    if joined:
        parts = tuple(InputDecl(n, tuple(i.name for i in _einsum(einsums, n).target.indices))
                      for n in dict.fromkeys(t for e in joined for t in tensors_read(e.expr)))
        epilogue = trimmed(lowered.replace(einsums=tuple(joined), inputs=parts, params=(), inits=(), doc="",
                                           outputs=tuple(Output(e.name) for e in joined)))
    return Gradient(c, forward, tuple(lowered.output_names), saved, prologue, backward, seeds, grads, zero,
                    shift_only, epilogue)


def _joins_partner_readings(e: Einsum, einsums: list[Einsum]) -> bool:
    """An input's gradient that adds contributions of which one was written over another rank
    (the reading at the partner rank, `dG_S2[b,h,m]` read at p): the kernel that computes them
    keeps that one per key and the other per query, so the sum waits for the epilogue."""
    if e.reduce != "sum" or e.reduced or e.where is not None:
        return False
    if any(not (isinstance(n, Access) or isinstance(n, Binary) and n.op == "+" or isinstance(n, Index))
           for n in walk(e.expr)):
        return False
    writers = {x.name: x for x in einsums}
    return any(a.tensor in writers and a.indices != writers[a.tensor].target.indices for a in accesses(e.expr))


def _scan_gradient(c: Cascade) -> Gradient:
    """The backward of a cascade the chunked scan runs: it keeps no per-row statistics (a scan
    carries states, which the backward rebuilds chunk by chunk in its own sweeps), so the
    training forward is the forward itself, and every gradient is one backward cascade, which
    the scan lowers in turn: a sum over the keys becomes a sum over the queries, a reverse scan."""
    names = FreshNames(list(c.tensors) + list(c.dims) + [p.name for p in c.params])
    seeds = {o: names("d" + o) for o in c.output_names}
    floating = [d.name for d in c.inputs if (d.dtype or "fp32") in FLOAT_DTYPES]
    grads_of, einsums, shift_only = _reverse(c, seeds, names)
    grads = {x: grads_of[x] for x in floating if x in grads_of}
    zero = tuple(x for x in floating if x not in grads_of)
    backward = ()
    if grads:
        backward = (_backward_cascade(c, (), _backward_inputs(c, (), seeds), einsums, list(grads.values())),)
    return Gradient(c, c, tuple(c.output_names), (), None, backward, seeds, grads, zero, shift_only)


def _einsum(einsums: list[Einsum], name: str) -> Einsum:
    return next(e for e in einsums if e.name == name)


def _per_query(einsums: list[Einsum], stream: set[str], inputs) -> set[str]:
    """Gradient Einsums computed from per-query values alone (no key rank anywhere upstream).
    The reductions among them are row statistics, computed once before the key-tile kernel
    rather than in each of its tiles: FlashAttention-2's `D = rowsum(dO * O)`."""
    per_query = {d.name for d in inputs if not set(d.indices) & stream}
    for e in einsums:
        if not set(e.space) & stream and set(tensors_read(e.expr) + tensors_read(e.where)) <= per_query:
            per_query.add(e.name)
    return per_query - {d.name for d in inputs}


def _training_forward(lowered: Cascade, stage, saved: tuple[str, ...]) -> Cascade:
    extra = tuple(Output(n, SAFE_FILL[lowered.einsum(n).reduce]) for n in saved if n not in lowered.output_names)
    return lowered.replace(outputs=lowered.outputs + extra)


def _recover_from_outputs(lowered: Cascade, saved: tuple[str, ...], einsums: list[Einsum]) -> list[Einsum]:
    """Read a saved value through an output that is a map of it, when that map inverts: the
    numerator O_num of `O = O_num / SD` is `O * SD`, so the forward saves only SD and GM next
    to the outputs it returns anyway."""
    for x in saved:
        if x in lowered.output_names:
            continue
        target = lowered.einsum(x).target
        for y in lowered.output_names:
            e = lowered.einsum(y)
            if e.reduced or e.where is not None or e.target.indices != target.indices:
                continue
            reads = [a for a in accesses(e.expr) if a.tensor == x]
            if len(reads) != 1 or reads[0] != target or not set(tensors_read(e.expr)) - {x} <= set(saved):
                continue
            value = _invert(e.expr, target, Access(y, e.target.indices))
            if value is None:
                continue
            einsums = [replace(g, expr=substitute_access(g.expr, target, value)) for g in einsums]
            break
    return einsums


def _invert(expr: Expr, x: Access, y: Expr) -> Expr | None:
    """The `x` with `expr(x) == y`, for `expr` built of +, -, *, / with one read of x (else None)."""
    if expr == x:
        return y
    if isinstance(expr, Unary) and expr.op == "-":
        return _invert(expr.operand, x, neg(y))
    if not isinstance(expr, Binary) or expr.op not in ("+", "-", "*", "/"):
        return None
    left = x.tensor in tensors_read(expr.lhs)
    inner, other = (expr.lhs, expr.rhs) if left else (expr.rhs, expr.lhs)
    if expr.op == "+":
        return _invert(inner, x, Binary("-", y, other))
    if expr.op == "*":
        return _invert(inner, x, Binary("/", y, other))
    if expr.op == "-":
        return _invert(inner, x, Binary("+", y, other) if left else Binary("-", other, y))
    return _invert(inner, x, Binary("*", y, other) if left else Binary("/", other, y))


def substitute_access(expr: Expr, target: Access, value: Expr) -> Expr:
    """`expr` with every read `target` (same indices) replaced by `value`."""
    return rebuild(expr, lambda n: value if n == target else None)


def _backward_inputs(lowered: Cascade, saved, seeds) -> tuple[InputDecl, ...]:
    decls = list(lowered.inputs)
    for n in tuple(saved) + tuple(lowered.output_names):
        decls.append(InputDecl(n, tuple(i.name for i in lowered.einsum(n).target.indices)))
    for o, d in seeds.items():
        decls.append(InputDecl(d, tuple(i.name for i in lowered.einsum(o).target.indices)))
    return tuple(decls)


def _reverse(c: Cascade, seeds: dict[str, str], names: FreshNames) -> tuple[dict[str, str], list[Einsum], tuple[str, ...]]:
    """Gradient Einsums of every tensor that receives one, in an order the cascade can run, and
    the maxima that get no gradient because they only shift an exponential."""
    graph = cascade_graph(c)
    contributions: dict[str, list[Access]] = {o: [Access(d, c.einsum(o).target.indices)] for o, d in seeds.items()}
    out: list[Einsum] = []
    grads: dict[str, str] = {}
    shift_only: list[str] = []
    presence = _presence(c, graph)
    for z in reversed(graph.order):
        if z.name not in contributions:
            continue
        if z.recurrence_var is not None:
            raise LoweringError(located(z.target, f"{z.name} is a recurrence: the backward is derived for the "
                                              f"multi-pass form; write that instead"))
        if any(not isinstance(i, Index) for i in z.target.indices):
            raise LoweringError(located(z.target, f"{z.name} is written at index expressions; the backward needs "
                                              f"plain target indices"))
        dz = _total(c, z, contributions.pop(z.name), names, out)
        grads[z.name] = dz.tensor
        if z.reduce == "max" and z.reduced:
            if shift_invariant(c, z.name):
                shift_only.append(z.name)
                continue  # the outputs do not move with this max: no gradient (softmax's GM)
            _argmax(c, z, dz, names, out, contributions)
            continue
        if z.reduce not in ("sum",):
            raise LoweringError(located(z.target, f"{z.name} is a {z.reduce} reduction; the backward is derived "
                                              f"for sum and max"))
        for a in _reads(z, set(c.input_names), _constant(c)):
            g = diff(z.expr, a, z.target if not z.reduced else None)
            if _zero(g):
                continue
            if _one(g) and not z.reduced and z.where is None and a.indices == z.target.indices:
                contributions.setdefault(a.tensor, []).append(dz)  # a copy passes its gradient on
                continue
            name = names(f"d{a.tensor}_{z.name}")
            where = _conjunction([z.where] + ([presence[a.tensor]] if a.tensor in presence and
                                              a.indices == c.einsum(a.tensor).target.indices else []))
            e = Einsum(Access(name, a.indices), mul(dz, g), "sum", where)
            out.append(e)
            contributions.setdefault(a.tensor, []).append(Access(name, a.indices))
    for d in c.inputs:
        if d.name in contributions:
            grads[d.name] = _input_gradient(d.name, d.indices, contributions.pop(d.name), names, out)
    return grads, out, tuple(shift_only)


def _presence(c: Cascade, graph) -> dict[str, Expr]:
    """Where each intermediate is present, as a predicate over its own indices (when one says
    so): its `where`, and its operands' (a map is absent where an operand is; a reduction drops
    what mentions the reduced indices). A gradient is restricted to where its tensor is present:
    elsewhere nothing reads it."""
    out: dict[str, Expr] = {}
    for e in graph.order:
        parts = [e.where] if e.where is not None else []
        for a in accesses(e.expr):
            if a.tensor in out and a.indices == c.einsum(a.tensor).target.indices:
                parts.append(out[a.tensor])
        parts = [p for p in parts if not set(index_vars(p)) & set(e.reduced)]
        if parts:
            out[e.name] = _conjunction(parts)
    return out


def _conjunction(parts: list[Expr | None]) -> Expr | None:
    """`a and b and ...` of the distinct conjuncts of `parts` (None: no predicate)."""
    seen: list[Expr] = []
    for p in parts:
        for q in conjuncts(p):
            if q not in seen:
                seen.append(q)
    out = seen[0] if seen else None
    for q in seen[1:]:
        out = Binary("and", out, q)
    return out


def _constant(c: Cascade) -> set[str]:
    """Integer and boolean inputs: they get no gradient, so they may be read at any index."""
    return {d.name for d in c.inputs if (d.dtype or "fp32") not in FLOAT_DTYPES}


def _reads(z: Einsum, inputs: set[str], constant: set[str]) -> list[Access]:
    """The distinct accesses of the expression that can carry a gradient (not of `constant`
    inputs), each plain (distinct index variables): one per intermediate, any number per input
    (an input read at its own positions and at a partner rank's, `G[b,h,p]` and `G[b,h,m]`, gets
    one contribution per reading)."""
    seen: dict[str, Access] = {}
    out: list[Access] = []
    for a in (a for a in accesses(z.expr) if a.tensor not in constant):
        if any(not isinstance(i, Index) for i in a.indices) or len(set(index_vars(a))) != len(a.indices):
            raise LoweringError(located(a, f"{z.name} reads {_text(a)} at index expressions; the backward needs "
                                       f"plain reads (its gradient would scatter): gather the tensor before "
                                       f"the cascade and pass it as an input"))
        if a.tensor in seen and seen[a.tensor] != a and a.tensor not in inputs:
            raise LoweringError(located(a, f"{z.name} reads {a.tensor} as {_text(seen[a.tensor])} and {_text(a)}; "
                                       f"the backward needs one reading per Einsum"))
        seen.setdefault(a.tensor, a)
        if a not in out:
            out.append(a)
    return out


def _total(c: Cascade, z: Einsum, parts: list[Access], names: FreshNames, out: list[Einsum]) -> Access:
    """The gradient of an intermediate: its one contribution, or their sum as one more Einsum."""
    if len(parts) == 1:
        return parts[0]
    name = names("d" + z.name)
    out.append(_sum_of(name, z.target.indices, parts))
    return Access(name, z.target.indices)


def _sum_of(name: str, indices, parts: list[Access]) -> Einsum:
    total: Expr = Num(0)
    for p in parts:
        total = add(total, p)
    return Einsum(Access(name, indices), total)


def _input_gradient(x: str, declared: tuple[str, ...], parts: list[Access], names: FreshNames,
                    out: list[Einsum]) -> str:
    """An input's gradient gets its own name (an output of the backward): its one contribution
    renamed, or the sum of several, each read position by position at the input's declared
    indices (a reading at a partner rank wrote its contribution over that rank, of equal extent)."""
    name = names("d" + x)
    parts = [Access(p.tensor, tuple(Index(v) for v in declared)) for p in parts]
    own = [k for k, e in enumerate(out) if e.name == parts[0].tensor]
    read = any(parts[0].tensor in tensors_read(e.expr) for e in out)
    if len(parts) == 1 and own and not read:
        e = out[own[0]]
        out[own[0]] = Einsum(Access(name, e.target.indices), e.expr, e.reduce, e.where)
        return name
    out.append(_sum_of(name, parts[0].indices, parts))
    return name


def _argmax(c: Cascade, z: Einsum, dz: Access, names: FreshNames, out: list[Einsum], contributions) -> None:
    """A max whose value the outputs read: its gradient splits over the points that attain it."""
    if not isinstance(z.expr, Access):
        raise LoweringError(located(z.target, f"{z.name} is a max of an expression; write the maximized tensor as "
                                          f"its own Einsum"))
    a = z.expr
    hit = Call("where", (Binary("==", a, z.target), Num(1.0), Num(0.0)))
    count = names(f"n{z.name}")
    out.append(Einsum(Access(count, z.target.indices), hit, "sum", z.where))
    name = names(f"d{a.tensor}_{z.name}")
    out.append(Einsum(Access(name, a.indices), Binary("/", mul(dz, hit), Access(count, z.target.indices)),
                      "sum", z.where))
    contributions.setdefault(a.tensor, []).append(Access(name, a.indices))


def _backward_cascade(lowered: Cascade, saved, inputs, grad_einsums: list[Einsum], outs: list[str],
                      recompute: list[Einsum] | None = None) -> Cascade:
    """One backward cascade: the forward's Einsums it recomputes (by default all but the saved
    values and outputs, pruned to what it needs), the gradient Einsums, and the gradient outputs
    `outs` (saved values and seeds are inputs)."""
    if recompute is None:
        recompute = [e for e in lowered.einsums if e.name not in saved and e.name not in lowered.output_names]
    c = lowered.replace(einsums=tuple(recompute + grad_einsums), inputs=inputs,
                        outputs=tuple(Output(n) for n in outs), inits=(), doc="")
    c = prune(c)
    used = {t for e in c.einsums for t in tensors_read(e.expr) + tensors_read(e.where)}
    c = c.replace(inputs=tuple(d for d in c.inputs if d.name in used))
    return trimmed(c)


def trimmed(c: Cascade) -> Cascade:
    """`c` without the params and dims nothing in it reads (a prologue over rows needs neither
    the keys' extent nor the score scale)."""
    names = {n.name for e in c.einsums for x in (e.expr, e.where) if x is not None for n in walk(x)
             if isinstance(n, Name)}
    params = []
    for p in reversed(c.params):
        if p.name in names:
            params.insert(0, p)
            if p.expr is not None:
                names |= {n.name for n in walk(p.expr) if isinstance(n, Name)}
    ranks = {rank_of(v) for e in c.einsums for v in e.space} | {rank_of(i) for d in c.inputs for i in d.indices}
    ranks |= {r for s in c.splits for r in (s.rank, s.outer, s.inner)}
    return c.replace(dims=tuple(d for d in c.dims if d in ranks or d in names), params=tuple(params))
