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
position after it (a few tensor ops over O(N) values). So does it for contributions the kernel
cannot add itself: reductions over different sets of points, and the per-key shares of a
gradient over neither token rank with several readings.

A union form the forward takes after its key loop (of final values, by their presence) is
differentiated by the presence of its operands: a union_sum passes the gradient to an operand
where it is present, a union_max to the present operands that attain it. The backward reads
saved values as inputs, present everywhere, so where a reduction saw no point is carried over
as a count of its points, which the training forward saves (`PresenceCounts`).
docs/backward.md has the whole account.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import sympy

from einsum_ir.errors import LoweringError, located
from einsum_ir.functions import FUNCTIONS, UNIONS
from einsum_ir.graph import cascade_graph
from einsum_ir.ir import (
    FLOAT_DTYPES, Access, Binary, Call, Cascade, Einsum, Expr, Index, InputDecl, Name, Num, Output,
    Unary, accesses, chain, children, conjuncts, index_vars, product_terms, rank_of, rebuild, substitute, walk,
)
from einsum_ir.lowering.defer import prune
from einsum_ir.lowering.exprs import product, tensors_read, to_sympy
from einsum_ir.validate import AnyOf, Exists, PresenceAnalysis, describe_presence, implies

if TYPE_CHECKING:
    from einsum_ir.lowering.plan import Stage

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
            parts += ["# backward epilogue: contributions the kernels return apart, added", str(self.epilogue)]
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


def diff(expr: Expr, target: Access, value: Expr | None = None,
         present: Callable[[Expr], Expr | None] | None = None) -> Expr:
    """d expr / d target for one plain access `target`: a partial derivative, so a read of the
    same tensor at other indices (another reading, `_reads` lists each) is held fixed. `value`,
    when given, holds expr's own value (the tensor an Einsum writes), so `d exp(x) = exp(x) dx`
    reads it instead of recomputing it. `present` gives, for an operand of a union form, the
    predicate under which it is present (None: wherever `target` is); without it a union has
    no derivative (`_union_diff`)."""
    def d(x: Expr) -> Expr:
        return diff(x, target, present=present)

    if isinstance(expr, (Num, Name, Index)):
        return Num(0)
    if isinstance(expr, Access):
        if expr.tensor != target.tensor:
            return Num(0)
        return Num(1) if expr == target else Num(0)
    if isinstance(expr, Unary):
        return Num(0) if expr.op == "not" else neg(d(expr.operand))
    if isinstance(expr, Binary):
        if expr.op in ("+", "-"):
            da, db = d(expr.lhs), d(expr.rhs)
            return add(da, neg(db) if expr.op == "-" else db)
        if expr.op == "*":
            return add(mul(d(expr.lhs), expr.rhs), mul(expr.lhs, d(expr.rhs)))
        if expr.op == "/":
            da, db = d(expr.lhs), d(expr.rhs)
            out = Binary("/", da, expr.rhs) if not _zero(da) else Num(0)
            if not _zero(db):
                out = add(out, neg(Binary("/", mul(expr.lhs, db), mul(expr.rhs, expr.rhs))))
            return out
        if any(a.tensor == target.tensor for a in accesses(expr)) and expr.op in ("//", "%"):
            raise LoweringError(located(expr, f"{_text(expr)} is integer arithmetic on {target.tensor}: no gradient"))
        return Num(0)  # comparisons, and, or: piecewise constant
    assert isinstance(expr, Call)
    if expr.fn in UNIONS and any(a.tensor == target.tensor for a in accesses(expr)):
        return _union_diff(expr, target, present)
    if expr.fn not in FUNCTIONS:  # a predicate builtin
        return Num(0)
    f = FUNCTIONS[expr.fn]
    out: Expr = Num(0)
    for k, arg in enumerate(expr.args):
        dk = d(arg)
        if _zero(dk):
            continue
        if f.derivative[k] is None:
            raise LoweringError(located(expr, f"{expr.fn}(...) has no derivative in argument {k + 1}, which reads "
                                          f"{target.tensor}; add one to its entry in einsum_ir/functions.py"))
        out = add(out, mul(f.derivative[k](expr.args, value if value is not None else expr), dk))
    return out


def _union_diff(u: Call, target: Access, present: Callable[[Expr], Expr | None] | None) -> Expr:
    """d union / d target, by the operands' presence (`present`, see `diff`).

    A union is the reduction of its kind over its present operands (docs/spec.md, "Unions"), so
    its derivative is that reduction's: a union_sum passes each operand's derivative on where
    that operand is present (an absent one is the identity, a constant); a union_max (min) only
    where the operand is also the maximum (minimum) of the present ones, split evenly between
    those that attain it, as a max reduction's gradient is (`_argmax`). Exact at every point
    where `target` is present; where it is absent its gradient reaches no present point."""
    if present is None:
        raise LoweringError(located(u, f"{u.fn}(...) has no derivative point by point: which operands it combines "
                                       f"depends on their presence, which only the key loop's derivation "
                                       f"(lowering/grad.py, `grad`) carries into the backward"))
    form = UNIONS[u.fn]
    hits = [present(x) for x in u.args]
    share: Expr | None = None
    if form.reduce != "sum":
        value = union_value(u, present)
        hits = [_both(h, Binary("==", x, value)) for x, h in zip(u.args, hits)]
        share = Num(0)
        for h in hits:
            share = add(share, Call("where", (h, Num(1.0), Num(0.0))))
    out: Expr = Num(0)
    for x, h in zip(u.args, hits):
        dx = diff(x, target, present=present)
        if _zero(dx):
            continue
        if share is not None:
            dx = Binary("/", dx, share)
        # a select, not a product: an absent operand's derivative may be any number, even inf
        out = add(out, dx if h is None else Call("where", (h, dx, Num(0.0))))
    return out


def union_value(u: Call, present: Callable[[Expr], Expr | None]) -> Expr:
    """The union `u` as plain IR: each operand selected by its presence, the identity where it
    is absent, then combined as where every operand is present (the union's value wherever
    one is; the backward's operands are present everywhere, as its saved inputs are)."""
    form = UNIONS[u.fn]
    picked = []
    for x in u.args:
        h = present(x)
        picked.append(x if h is None else Call("where", (h, x, Num(form.identity))))
    return form.present_value(tuple(picked))


def _both(a: Expr | None, b: Expr) -> Expr:
    return b if a is None else Binary("and", a, b)



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


# ---------------------------------------------------------------------------- presence in the backward


class PresenceCounts:
    """Presence the backward must be told, as counts of points the training forward computes.

    The backward cascades read the forward's saved carried values as inputs, present
    everywhere: a predicate still says where a recomputed score is absent, but nothing says
    where a reduction saw no point. Mostly that does not matter, since a row whose reduction saw
    nothing has no present point for its gradient to reach. It does where a value is present
    while one that reads it is not: a union operand that is absent where the union is present
    (a share present only in rows that saw a sink), or a product of a per-row value that saw a
    point and one that did not. A contribution through such a value must be 0 there, and the
    presence analysis (einsum_ir.validate) says where: each `Exists` atom ("some m has body")
    becomes a count `n[rows] = sum[m] 1.0 where body`, computed by the forward beside its
    carried values and read as `n > 0`. Exact, as the count is of the very points the
    reduction saw."""

    def __init__(self, c: Cascade, names: FreshNames, stage: Stage):
        self.c = c
        self.names = names
        self.stage = stage  # the forward's key loop, which computes the counts per row
        self.analysis = PresenceAnalysis(c)
        self.counts: dict[tuple, Einsum] = {}  # (rows, body) -> the Einsum that counts it

    @property
    def einsums(self) -> tuple[Einsum, ...]:
        return tuple(self.counts.values())

    def have(self, z: Einsum, a: Access) -> frozenset:
        """What holds wherever a contribution of z to its read `a` matters: a's presence (where
        a is absent, its gradient reaches no present point) and z's predicates."""
        return self.analysis.of(a) | {x for x in self._space(z) if not isinstance(x, (Exists, AnyOf))}

    def between(self, z: Einsum, have: frozenset) -> Expr | None:
        """Where z's points are present beyond `have` (None: wherever it holds): the reductions z
        reads, where some saw no point while the read did (an intersecting map after the key
        loop; inside it, a point's absence is its predicates' or a sentinel's, which the
        backward recomputes)."""
        if set(z.space) & set(self.stage.stream):
            return None
        return self._condition([x for x in self._space(z) if isinstance(x, Exists)], have, z.target)

    def operand(self, x: Expr, have: frozenset) -> Expr | None:
        """Where the union operand `x` is present beyond `have` (None: wherever it holds)."""
        for atom in self.analysis.of(x):
            if isinstance(atom, AnyOf):
                raise LoweringError(located(x, f"{_text(x)} is a union operand that reads another union; the backward "
                                               f"of a union is derived for flat ones: name the inner union as an "
                                               f"Einsum of its own and write one union of every operand"))
            if not isinstance(atom, Exists) and not implies(have, atom):
                pred = describe_presence(frozenset({atom}))
                raise LoweringError(located(x, f"{_text(x)} is a union operand present where {pred}, a predicate of "
                                               f"its own, which the backward recomputes as absent; the backward of a "
                                               f"union is derived for operands absent only where a reduction they "
                                               f"read saw no point: select instead, where({pred}, {_text(x)}, the "
                                               f"union's identity), which differs only where no other operand is "
                                               f"present"))
        return self._condition(self.analysis.of(x), have, x)

    def replayed(self, e: Einsum) -> Einsum:
        """`e` as the backward recomputes it: each union form as the plain IR of its value, its
        operands selected by their presence (`union_value`)."""
        have = frozenset(conjuncts(e.where))

        def plain(n: Expr) -> Expr | None:
            if not (isinstance(n, Call) and n.fn in UNIONS):
                return None
            return union_value(n, lambda x: self.operand(x, have))

        return replace(e, expr=rebuild(e.expr, plain))

    def _space(self, z: Einsum) -> frozenset:
        """The presence of z's points, before its reduction."""
        return frozenset(conjuncts(z.where)) | self.analysis.of(z.expr)

    def _condition(self, atoms, have: frozenset, node) -> Expr | None:
        parts: list[Expr] = []
        for atom in sorted(atoms, key=lambda x: describe_presence(frozenset({x}))):
            part = None if implies(have, atom) else Binary(">", self._count(atom, node), Num(0))
            if part is not None and part not in parts:  # two reductions over one set of points
                parts.append(part)
        return chain("and", parts) if parts else None

    def _count(self, atom: Exists, node) -> Access:
        """The count of the points `atom` ranges over, one per row of its free variables."""
        what = describe_presence(frozenset({atom}))
        if any(isinstance(x, (Exists, AnyOf)) for x in atom.body):
            raise LoweringError(located(node, f"{_text(node)} is present where {what}: a reduction over values that "
                                              f"are themselves present only where another reduction saw a point; "
                                              f"the backward counts the points of one reduction"))
        free = set().union(*(index_vars(x) for x in atom.body)) - set(atom.bound)
        rename: dict[str, Expr] = {}
        for v in atom.bound:  # a witness takes its rank's index variable (`m'GM` is an m)
            base = v.split("'")[0]
            if base in free or Index(base) in rename.values() or rank_of(base) not in self.c.dims:
                raise LoweringError(located(node, f"{_text(node)} is present where {what}; the backward cannot "
                                                  f"count those points, as {base} is also free there"))
            rename[v] = Index(base)
        body = tuple(sorted((substitute(x, rename) for x in atom.body), key=_text))
        # one count per row of the loop that computes it (a row of its grid and query indices)
        dims = list(self.c.dims)
        rows = tuple(sorted(free | set(self.stage.grid) | set(self.stage.query),
                            key=lambda v: dims.index(rank_of(v)) if rank_of(v) in dims else len(dims)))
        key = (rows, body)
        if key not in self.counts:
            self.counts[key] = Einsum(Access(self.names("n_seen"), tuple(Index(v) for v in rows)), Num(1.0),
                                      "sum", chain("and", list(body)))
        return self.counts[key].target


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
    # differentiated: the forward with its products over points and features apart
    differentiated = _name_point_factors(lowered, stage, names)
    counts = PresenceCounts(differentiated, names, stage)
    grads_of, einsums, shift_only = _reverse(differentiated, seeds, names, counts)
    einsums = _recover_from_outputs(differentiated, saved, einsums)
    # the counts are carried values too: the training forward computes them, the backward reads
    # them, and recomputes each union from its operands by their counts (`PresenceCounts.replayed`)
    tallies = tuple(e.name for e in counts.einsums)
    saved += tallies
    replayed = tuple(counts.replayed(e) if e.name not in saved and e.name not in lowered.output_names else e
                     for e in differentiated.einsums)
    forward_source = lowered.replace(einsums=lowered.einsums + counts.einsums)
    lowered = differentiated.replace(einsums=replayed + counts.einsums)
    recomputed = [e for e in lowered.einsums if e.name not in saved and e.name not in lowered.output_names]
    read = {t for e in einsums + recomputed for t in tensors_read(e.expr) + tensors_read(e.where)}
    saved = tuple(n for n in saved if n in read and n not in lowered.output_names)
    grads = {x: grads_of[x] for x in floating if x in grads_of}
    zero = tuple(x for x in floating if x not in grads_of)
    joined: list[Einsum] = []
    for name in grads.values():
        e = _einsum(einsums, name)
        if _adds_per_program_sums(e, stage):
            einsums = _kept_per_key(e, einsums, stage)
            joined.append(_einsum(einsums, name))
        elif _joins_partner_readings(e, einsums):
            joined.append(e)
    einsums = [e for e in einsums if e not in joined]
    # what the kernels return: the gradients, or, for a joined one, its contributions
    kernel_grads = [n for n in grads.values() if n not in {e.name for e in joined}]
    kernel_grads += list(dict.fromkeys(t for e in joined for t in tensors_read(e.expr)))
    forward = _training_forward(forward_source, saved, tallies)
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
    keeps that one per key and the other per query, so the sum waits for the epilogue. So does
    a union_sum of contributions (`_input_gradient`): the kernel returns each one, 0 where it
    saw no point, and the epilogue adds them."""
    if e.reduce != "sum" or e.reduced or e.where is not None:
        return False
    if isinstance(e.expr, Call) and e.expr.fn == "union_sum":
        return True
    if any(not (isinstance(n, Access) or isinstance(n, Binary) and n.op == "+" or isinstance(n, Index))
           for n in walk(e.expr)):
        return False
    writers = {x.name: x for x in einsums}
    return any(a.tensor in writers and a.indices != writers[a.tensor].target.indices for a in accesses(e.expr))


def _name_point_factors(c: Cascade, stage: Stage, names: FreshNames) -> Cascade:
    """The cascade to differentiate: a contraction whose summand multiplies factors over the
    scores' points by factors over a feature rank (`Rho[h] * SN[p,m] * V[m,f]`), where an input
    among the former lacks a token index of the others, with the former named as a value of its
    own (`T[p,m] = Rho[h] * SN[p,m]`, then `sum T * V`). The same sum; but the input's gradient
    is then a sum of a 2-D product (`dT * SN`, with dT = dO . V^T a matrix product) instead of a
    product over the points and the feature rank at once, which no kernel tiles."""
    tokens, features = set(stage.stream) | set(stage.query), set(stage.features)
    floating = {d.name for d in c.inputs if (d.dtype or "fp32") in FLOAT_DTYPES}
    out: list[Einsum] = []
    for e in c.einsums:
        terms = product_terms(e.expr) if e.reduced and e.reduce == "sum" and not e.recurrence_var else []
        point = [f for f in terms[0][1] if not set(index_vars(f[1])) & features] if len(terms) == 1 else []
        rest = [f for f in terms[0][1] if f not in point] if point else []
        span = {v for _, f in point for v in index_vars(f)}
        if len(point) < 2 or not rest or not any(a.tensor in floating and (span & tokens) - set(index_vars(a))
                                                 for _, f in point for a in accesses(f)):
            out.append(e)
            continue
        named = Access(names(f"{e.name}_pt"), tuple(Index(v) for v in e.space if v in span))
        out += [Einsum(named, product(point), loc=e.loc),
                replace(e, expr=product([(False, named)] + rest, terms[0][0]))]
    return c.replace(einsums=tuple(out))


def _adds_per_program_sums(e: Einsum, stage: Stage) -> bool:
    """An input's gradient over neither token rank that adds several contributions (a per-head
    share read twice): each would be a sum across the backward's programs, which a kernel forms
    only as an output of its own (`_kept_per_key`)."""
    sums = isinstance(e.expr, Call) and e.expr.fn == "union_sum" or \
        all(isinstance(n, (Access, Index)) or isinstance(n, Binary) and n.op == "+" for n in walk(e.expr))
    return sums and len(accesses(e.expr)) > 1 and not e.reduced and e.where is None and \
        not set(e.lhs_vars) & (set(stage.stream) | set(stage.query))


def _kept_per_key(total: Einsum, einsums: list[Einsum], stage: Stage) -> list[Einsum]:
    """`einsums` with the contributions that `total` adds kept per key and program (over the
    forward's key and grid indices they reduce: `dRho_X[b,h,m]` for `dRho_X[h]`, a per-key
    output of the backward kernel as dK is), and `total` their sum over those indices, for the
    epilogue: the same sum, regrouped."""
    order = list(stage.grid) + list(stage.stream)
    writers = {e.name: e for e in einsums}
    parts: dict[str, Access] = {}
    for a in accesses(total.expr):
        e = writers.get(a.tensor)
        kept = [v for v in order if e is not None and v in e.reduced]
        shared = any(a.tensor in tensors_read(x.expr) for x in einsums if x is not total)
        if e is None or shared or not set(kept) & set(stage.stream):
            raise LoweringError(located(total.target, f"{total.name} adds {a.tensor}, which is not a sum over the "
                                                      f"keys of its own; the backward adds several contributions "
                                                      f"to a gradient over neither token rank when each sums over "
                                                      f"the keys"))
        indices = [v for v in order if v in kept or v in e.lhs_vars] + [v for v in e.lhs_vars if v not in order]
        parts[a.tensor] = Access(a.tensor, tuple(Index(v) for v in indices))
    out = []
    for e in einsums:
        if e.name in parts:
            out.append(replace(e, target=parts[e.name]))
        elif e is total:
            out.append(replace(e, expr=rebuild(e.expr, lambda n: parts.get(n.tensor) if isinstance(n, Access)
                                               else None)))
        else:
            out.append(e)
    return out


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


def _training_forward(lowered: Cascade, saved: tuple[str, ...], tallies: tuple[str, ...]) -> Cascade:
    """The forward returning its saved values too: a carried value with its safe fill, a count
    of points (`PresenceCounts`) with 0, the count of a row that saw none."""
    extra = tuple(Output(n, 0.0 if n in tallies else SAFE_FILL[lowered.einsum(n).reduce])
                  for n in saved if n not in lowered.output_names)
    return lowered.replace(einsums=tuple(e for e in lowered.einsums if e.name not in tallies or e.name in saved),
                           outputs=lowered.outputs + extra)


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


def _reverse(c: Cascade, seeds: dict[str, str], names: FreshNames, counts: PresenceCounts | None = None
             ) -> tuple[dict[str, str], list[Einsum], tuple[str, ...]]:
    """Gradient Einsums of every tensor that receives one, in an order the cascade can run, and
    the maxima that get no gradient because they only shift an exponential. With `counts`, a
    contribution is also restricted to where the values between it and its read are present
    (`PresenceCounts.between`), union forms are differentiated by their operands' presence, and
    a sum of contributions adds alike ones (`Contributions`)."""
    graph = cascade_graph(c)
    contributions: dict[str, list[Access]] = {o: [Access(d, c.einsum(o).target.indices)] for o, d in seeds.items()}
    made = Contributions(counts.analysis if counts is not None else None)
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
        dz = _total(z, contributions.pop(z.name), names, made)
        grads[z.name] = dz.tensor
        if z.reduce == "max" and z.reduced:
            if shift_invariant(c, z.name):
                shift_only.append(z.name)
                continue  # the outputs do not move with this max: no gradient (softmax's GM)
            _argmax(c, z, dz, names, made, contributions)
            continue
        if z.reduce not in ("sum",):
            raise LoweringError(located(z.target, f"{z.name} is a {z.reduce} reduction; the backward is derived "
                                              f"for sum and max"))
        for a in _reads(z, set(c.input_names), _constant(c)):
            present, mask = None, None
            if counts is not None:
                have = counts.have(z, a)
                present = lambda x, have=have: counts.operand(x, have)  # noqa: E731
                mask = counts.between(z, have)
            g = diff(z.expr, a, z.target if not z.reduced else None, present=present)
            if _zero(g):
                continue
            if mask is None and _one(g) and not z.reduced and z.where is None and a.indices == z.target.indices:
                contributions.setdefault(a.tensor, []).append(dz)  # a copy passes its gradient on
                continue
            name = names(f"d{a.tensor}_{z.name}")
            at_own = a.tensor in presence and a.indices == c.einsum(a.tensor).target.indices
            own = [presence[a.tensor]] if at_own else []
            conds = conjuncts(_conjunction([z.where] + own))
            # with counts, a conjunct over an intermediate's own points that neither its presence
            # nor dz's has (a sum over the sinks, `where Sink[b,m]`, on the scores) is a select:
            # the contribution is 0 there, absent only where the intermediate is, as its other
            # contributions are (an input's are made alike when they are added: `Contributions`)
            selected = [x for x in conds if counts is not None and a.tensor not in c.input_names and
                        x not in conjuncts(_conjunction(own)) and set(index_vars(x)) <= set(index_vars(a))
                        and not implies(made.presence(dz), x)]
            where = _conjunction([x for x in conds if x not in selected])
            expr = _select_factor(_conjunction([mask] + selected), mul(dz, g))
            made.add(Einsum(Access(name, a.indices), expr, "sum", where), z, dz)
            contributions.setdefault(a.tensor, []).append(Access(name, a.indices))
    for d in c.inputs:
        if d.name in contributions:
            grads[d.name] = _input_gradient(d.name, d.indices, contributions.pop(d.name), names, made)
    return grads, made.out, tuple(shift_only)


class Contributions:
    """The gradient Einsums made so far (`out`) and, with the forward's presence analysis, what
    each one is present by in the backward, so that a sum of contributions adds alike ones.

    A contribution is absent where its reader's points are (its predicate), which means 0 there;
    but a plain `+` of contributions present at different points (a reader under `Sink[b,m]`,
    another under `m <= p`) is absent wherever one is. So a sum first makes its parts alike: a
    conjunct of a part's predicate that not every part has becomes a select (`where(Sink[b,m],
    x, 0)`, exact: a zero adds nothing). In the backward the forward's reductions are saved
    inputs, present everywhere, so a part is present by predicates alone: those of the values it
    reads (the analysis of its reader's right side), its own, and those of the gradient it
    multiplies; a part that reduces is absent where none of its points is."""

    def __init__(self, analysis: PresenceAnalysis | None):
        self.analysis = analysis
        self.out: list[Einsum] = []
        self.reads: dict[str, frozenset] = {}  # a contribution -> the presence of what it reads

    def add(self, e: Einsum, z: Einsum | None = None, dz: Access | None = None) -> None:
        """Record `e`: the contribution of `z` (its reader) through the gradient `dz`, or a sum
        of alike contributions (no z)."""
        self.out.append(e)
        if self.analysis is not None and z is not None:
            plain = {x for x in self.analysis.of(z.expr) if not isinstance(x, (Exists, AnyOf))}
            self.reads[e.name] = frozenset(plain) | (self.presence(dz) if dz is not None else frozenset())

    def writer(self, name: str) -> Einsum | None:
        return next((e for e in self.out if e.name == name), None)

    def presence(self, part: Access) -> frozenset:
        """Where `part` is present, as atoms over its writer's indices (empty: everywhere)."""
        e = self.writer(part.tensor)
        if self.analysis is None or e is None:  # a seed: an input of the backward
            return frozenset()
        if e.name not in self.reads and e.where is None and not e.reduced:  # a sum of alike parts
            first = accesses(e.expr)
            return self.presence(first[0]) if first else frozenset()
        return self.analysis.reduce(self.reads.get(e.name, frozenset()) | frozenset(conjuncts(e.where)),
                                    e.reduced, e.name)

    def groups(self, parts: list[Access], target: str | None = None) -> list[list[Access]]:
        """`parts` grouped by presence, made alike first where selects make them one group. For
        the gradient of an intermediate `target`, only where it is present matters (elsewhere
        its gradient reaches no present point)."""
        context = self.analysis.tensors.get(target, frozenset()) if self.analysis and target else frozenset()
        groups = self._grouped(parts, context)
        if len(groups) > 1:
            before = list(self.out)
            self._align(parts)
            aligned = self._grouped(parts, context)
            if len(aligned) == 1:
                return aligned
            self.out[:] = before  # some part reduces other points: selects would not help
        return groups

    def _grouped(self, parts: list[Access], context: frozenset) -> list[list[Access]]:
        groups: list[tuple[frozenset, list[Access]]] = []
        for p in parts:
            atoms = frozenset(x for x in self.presence(p) if not implies(context, x))
            same = next((g for a, g in groups if all(implies(a, x) for x in atoms) and
                         all(implies(atoms, x) for x in a)), None)
            if same is None:
                groups.append((atoms, [p]))
            else:
                same.append(p)
        return [g for _, g in groups]

    def _align(self, parts: list[Access]) -> None:
        """Each part's predicate without the conjuncts some other part lacks, those as a select."""
        writers = [self.writer(p.tensor) for p in parts]
        sets = [set(conjuncts(w.where)) if w is not None and w.name in self.reads else set() for w in writers]
        common = set.intersection(*sets)
        for w, mine in zip(writers, sets):
            moved = [x for x in conjuncts(w.where) if x not in common] if w is not None and mine else []
            if moved:
                where = _conjunction([x for x in conjuncts(w.where) if x in common])
                self.out[self.out.index(w)] = replace(w, expr=_select_factor(chain("and", moved), w.expr),
                                                      where=where)


def _select_factor(cond: Expr | None, expr: Expr) -> Expr:
    """`expr`, 0 where `cond` fails: a select on the innermost factor of a product that reads
    every index cond does (so that a contraction stays a product of 2-D factors), else on the
    whole."""
    if cond is None or _zero(expr):
        return expr
    if isinstance(expr, Binary) and expr.op == "*":
        for side in ("lhs", "rhs"):
            factor = getattr(expr, side)
            if set(index_vars(cond)) <= set(index_vars(factor)):
                return replace(expr, **{side: _select_factor(cond, factor)})
    return _select(cond, expr)


def _presence(c: Cascade, graph) -> dict[str, Expr]:
    """Where each intermediate is present, as a predicate over its own indices (when one says
    so): its `where`, and its operands' (a map is absent where an operand is; a reduction drops
    what mentions the reduced indices; a union form's operands do not restrict it, as it is
    present where any one is). A gradient is restricted to where its tensor is present:
    elsewhere nothing reads it."""
    out: dict[str, Expr] = {}
    for e in graph.order:
        parts = [e.where] if e.where is not None else []
        for a in _outside_unions(e.expr):
            if a.tensor in out and a.indices == c.einsum(a.tensor).target.indices:
                parts.append(out[a.tensor])
        parts = [p for p in parts if not set(index_vars(p)) & set(e.reduced)]
        if parts:
            out[e.name] = _conjunction(parts)
    return out


def _outside_unions(expr: Expr) -> list[Access]:
    """The accesses of `expr` that no union form encloses."""
    if isinstance(expr, Call) and expr.fn in UNIONS:
        return []
    inner = [a for x in children(expr) for a in _outside_unions(x)]
    return [expr] + inner if isinstance(expr, Access) else inner


def _select(cond: Expr | None, g: Expr) -> Expr:
    """`g` where `cond` holds, else 0 (a select: g may be any number where cond fails)."""
    return g if cond is None or _zero(g) else Call("where", (cond, g, Num(0.0)))


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


def _total(z: Einsum, parts: list[Access], names: FreshNames, made: Contributions) -> Access:
    """The gradient of an intermediate: its one contribution, or their sum as one more Einsum."""
    if len(parts) == 1:
        return parts[0]
    if len(made.groups(parts, z.name)) > 1:
        raise LoweringError(located(z.target, f"the gradient of {z.name} adds contributions present at different "
                                              f"points ({', '.join(p.tensor for p in parts)}: reductions whose "
                                              f"points differ, or reads of values absent at different points); the "
                                              f"backward adds such contributions for inputs only"))
    name = names("d" + z.name)
    made.add(_sum_of(name, z.target.indices, parts))
    return Access(name, z.target.indices)


def _sum_of(name: str, indices, parts: list[Access]) -> Einsum:
    return Einsum(Access(name, indices), _added(parts))


def _added(parts: list[Access]) -> Expr:
    total: Expr = Num(0)
    for p in parts:
        total = add(total, p)
    return total


def _input_gradient(x: str, declared: tuple[str, ...], parts: list[Access], names: FreshNames,
                    made: Contributions) -> str:
    """An input's gradient gets its own name (an output of the backward): its one contribution
    renamed, or the sum of several, each read position by position at the input's declared
    indices (a reading at a partner rank wrote its contribution over that rank, of equal extent).
    Contributions present at different points (reductions whose points differ: one absent where
    another is present) are joined by a union_sum, which the epilogue takes after the kernels."""
    name = names("d" + x)
    out = made.out
    partner = any(p.indices != tuple(Index(v) for v in declared) for p in parts)
    groups = [parts] if partner or len(parts) == 1 else made.groups(parts)  # a partner's: the epilogue's
    at = lambda p: Access(p.tensor, tuple(Index(v) for v in declared))  # noqa: E731
    own = [k for k, e in enumerate(out) if e.name == parts[0].tensor]
    read = any(parts[0].tensor in tensors_read(e.expr) for e in out)
    if len(parts) == 1 and own and not read:
        e = out[own[0]]
        out[own[0]] = Einsum(Access(name, e.target.indices), e.expr, e.reduce, e.where)
        return name
    if len(groups) == 1:
        made.add(_sum_of(name, at(parts[0]).indices, [at(p) for p in parts]))
        return name
    if len(groups) > UNIONS["union_sum"].arity[1]:
        raise LoweringError(f"the gradient of {x} adds contributions present at {len(groups)} different sets of "
                            f"points; a union_sum takes at most {UNIONS['union_sum'].arity[1]}")
    terms = tuple(_added([at(p) for p in g]) for g in groups)
    made.add(Einsum(Access(name, at(parts[0]).indices), Call("union_sum", terms)))
    return name


def _argmax(c: Cascade, z: Einsum, dz: Access, names: FreshNames, made: Contributions, contributions) -> None:
    """A max whose value the outputs read: its gradient splits over the points that attain it."""
    if not isinstance(z.expr, Access):
        raise LoweringError(located(z.target, f"{z.name} is a max of an expression; write the maximized tensor as "
                                          f"its own Einsum"))
    a = z.expr
    hit = Call("where", (Binary("==", a, z.target), Num(1.0), Num(0.0)))
    count = names(f"n{z.name}")
    made.add(Einsum(Access(count, z.target.indices), hit, "sum", z.where), z)
    name = names(f"d{a.tensor}_{z.name}")
    made.add(Einsum(Access(name, a.indices), Binary("/", mul(dz, hit), Access(count, z.target.indices)),
                    "sum", z.where), z, dz)
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
