"""Recurrences folded into reductions: a 1-pass cascade back to its multi-pass form.

A user may write the 1-pass form itself (FuseMax's Cascade 5, `softmax_1pass`): iterative
tensors over the outer rank m1 of a split `M -> M1 x M0`, read at their last step `M1`. The
stream strategy lowers the multi-pass form and derives the running reductions itself, so this
rewrite undoes the recurrences, derived from their algebra (no names are matched):

1. **max / min**: `X[m1+1] = max(X[m1], Y[m1])` with init -inf (+inf for min) is a reduction,
   `X[M1] = max[m1] Y[m1]`, when Y reads no running value.
2. **linear**: `X[m1+1] = A[m1] + X[m1] * F[m1]` with init 0 unrolls to
   `X[M1] = sum[m1] A[m1] * prod_{j>m1} F[j]`. The product telescopes when F is a ratio of
   one function of the running maxima R at two steps, `F = phi(R[m1]) / phi(R[m1+1])` (sympy
   checks `F(a,b) F(b,c) = F(a,c)` and `F(a,a) = 1`): then `prod_{j>m1} F[j] = F(R[m1+1], R[M1])`.
   When A times that factor is A with every running read replaced by the final one (sympy
   again, through sums over other ranks, which the factor commutes with), `X[M1] = sum[m1] A'`
   and A' reads only final values: `exp(S - RM[m1+1]) * exp(RM[m1+1] - RM[M1]) = exp(S - RM[M1])`.
   The maps that read a running value at the step before (FuseMax's PRM, SPD, SPNV) are inlined
   into the bodies that read them first, so that X[m1] shows as a factor.
3. Every read of a running maximum (at m1 or m1+1) then reads its final value, every read at
   `M1` reads the reduction, the recurrences and their inits go, and so does what only they read.
4. **the split folds back** (`fold_split`): blocked copies `BK[m1,m0] = K[m1*M0+m0]` are
   inlined, a reduction over m0 read only by the same reduction over m1 becomes one reduction
   over (m1, m0), each (m1, m0) pair of indices becomes m and `m1*M0+m0` becomes m. Points of
   the last tile past M are absent in the split form (their reads of K are out of bounds), so
   dropping them is exact; an Einsum over (m1, m0) that reads no tensor over M is refused.

The unrolling relies on the absent-point semantics only in one way: a step where A is absent
carries X without the factor F, so it must be a step where the running maxima do not move
either. That holds when A and the maxima read the same scores, as in FuseMax's cascade and in
what `lowering.online` writes; `_check_presence` refuses an A with a predicate the
maxima lack.

Any other shape raises LoweringError naming the Einsum and the forms that fold.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from einsum_ir.errors import LoweringError, located
from einsum_ir.graph import topological_einsums
from einsum_ir.ir import (
    REDUCE_IDENTITY, Access, Binary, Call, Cascade, Einsum, Expr, Index, Name, Num, Split, accesses,
    index_vars, product_terms, rank_of, rebuild, substitute, walk,
)
from einsum_ir.lowering.defer import prune
from einsum_ir.lowering.exprs import product, replace_accesses, summation, tensors_read, to_sympy
from einsum_ir.printer import print_expr

FOLDABLE = ("fold a recurrence X[.., m1+1, ..] = max(X[.., m1, ..], Y) (or min) with init -inf (+inf), "
            "or X[.., m1+1, ..] = A + X[.., m1, ..] * F with init 0 and F = exp(R[m1] - R[m1+1]) for a "
            "running max R; or write the multi-pass form (reductions over the whole rank) and the "
            "lowering derives the running reductions itself")


def has_recurrences(c: Cascade) -> bool:
    return bool(c.inits) or any(e.recurrence_var for e in c.einsums)


def fold_recurrences(c: Cascade) -> Cascade:
    """`c` without iterative tensors and with the recurrence's split folded back (see the module
    doc); `c` itself when it has none. LoweringError, located at the Einsum, for a recurrence
    of another shape."""
    if not has_recurrences(c):
        return c
    unrolled, var = unroll(c)
    split = next((s for s in c.splits if s.outer.lower() == var), None)
    return unrolled if split is None else fold_split(unrolled, split)


# ---------------------------------------------------------------------------- recurrences


@dataclass(frozen=True)
class Recurrence:
    """An iterative tensor: its step `X[.., x+1, ..] = body`, the step index's position among
    X's indices, its init value and the step rank's name (what the final read is indexed by)."""

    einsum: Einsum
    position: int
    init: Num
    rank: str

    @property
    def name(self) -> str:
        return self.einsum.name

    @property
    def var(self) -> str:
        return self.einsum.recurrence_var  # type: ignore[return-value]

    def at(self, step: Expr) -> Access:
        indices = list(self.einsum.target.indices)
        indices[self.position] = step
        return Access(self.name, tuple(indices))

    def reduced_target(self) -> Access:
        """X's left side without its step index: the target of the reduction it becomes."""
        indices = self.einsum.target.indices
        return Access(self.name, indices[:self.position] + indices[self.position + 1:], self.einsum.target.loc)

    def step_of(self, a: Access) -> str | None:
        """"prev" for a read at x, "next" at x+1, "final" at the rank's extent, else None."""
        idx = a.indices[self.position]
        return {Index(self.var): "prev", Binary("+", Index(self.var), Num(1)): "next",
                Name(self.rank): "final"}.get(idx)

    def final_read(self, a: Access) -> Access:
        return Access(self.name, a.indices[:self.position] + a.indices[self.position + 1:], a.loc)


def _refuse(node, message: str) -> LoweringError:
    return LoweringError(located(node, f"{message}; {FOLDABLE}"))


def _recurrences(c: Cascade) -> dict[str, Recurrence]:
    steps = [e for e in c.einsums if e.recurrence_var]
    variables = sorted({e.recurrence_var for e in steps})
    if len(variables) != 1:
        where = steps[1] if steps else c.inits[0]
        raise _refuse(where, f"recurrences over {len(variables)} ranks ({', '.join(variables)}); one folds")
    out = {}
    for e in steps:
        if len(c.writers(e.name)) != 1 or e.where is not None or e.reduced:
            raise _refuse(e, f"{e.name} is written by more than its step, or its step reduces or has a predicate")
        inits = [i for i in c.inits if i.target.tensor == e.name]
        position = next(k for k, i in enumerate(e.target.indices) if e.recurrence_var in index_vars(i))
        if (len(inits) != 1 or inits[0].target.indices[position] != Num(0)
                or not isinstance(inits[0].expr, Num)):
            raise _refuse(e, f"{e.name} needs one constant init at step 0")
        out[e.name] = Recurrence(e, position, inits[0].expr, rank_of(e.recurrence_var))
    return out


def _dependent(c: Cascade, recurrences: dict[str, Recurrence]) -> set[str]:
    """Non-iterative tensors that read a running value (an iterative tensor at a step before
    its last), directly or through others."""

    def running(a: Access) -> bool:
        r = recurrences.get(a.tensor)
        return r is not None and r.step_of(a) != "final"

    dependent: set[str] = set()
    changed = True
    while changed:  # a fixed point: the Einsums' order need not be topological
        changed = False
        for e in c.einsums:
            reads = accesses(e.expr) + accesses(e.where)
            if (e.name not in recurrences and e.name not in dependent
                    and any(running(a) or a.tensor in dependent for a in reads)):
                dependent.add(e.name)
                changed = True
    return dependent


def _is_map(e: Einsum) -> bool:
    return not e.reduced and e.where is None and all(isinstance(i, Index) for i in e.target.indices)


def _inline_maps(c: Cascade, maps: set[str], expr: Expr) -> Expr:
    """`expr` with reads of the map tensors `maps` replaced by their bodies, recursively."""

    def fn(a: Access) -> Expr:
        if a.tensor not in maps:
            return a
        w = c.einsum(a.tensor)
        body = substitute(w.expr, {i.name: j for i, j in zip(w.target.indices, a.indices)})
        return _inline_maps(c, maps, body)

    return replace_accesses(expr, fn)


@dataclass(frozen=True)
class _Unrolling:
    """What the checks share: the recurrences, which are running maxima (or minima), and the
    tensors that depend on running values with the map ones among them."""

    c: Cascade
    recurrences: dict[str, Recurrence]
    extrema: dict[str, str]  # name -> "max" | "min"
    dependent: frozenset[str]
    dependent_maps: frozenset[str]

    def symbol(self, a: Access, owner: Einsum) -> sympy.Expr:
        """A running extremum read at a step as the symbol `R[rest]@step`; a dependent map
        inlined; any other tensor an opaque symbol."""
        if a.tensor in self.extrema:
            r = self.recurrences[a.tensor]
            step = r.step_of(a)
            if step is None:
                raise _refuse(a, f"{owner.name} reads {print_expr(a)}, not at step {r.var}, {r.var}+1 or {r.rank}")
            return sympy.Symbol(f"{print_expr(r.final_read(a))}@{step}")
        if a.tensor in self.recurrences:
            raise _refuse(a, f"{owner.name} reads the running value {print_expr(a)} other than as a factor "
                             f"X[{owner.recurrence_var}]")
        if a.tensor in self.dependent_maps:
            w = self.c.einsum(a.tensor)
            body = substitute(w.expr, {i.name: j for i, j in zip(w.target.indices, a.indices)})
            return to_sympy(body, lambda b: self.symbol(b, owner))
        if a.tensor in self.dependent:
            raise _refuse(a, f"{owner.name} depends on {print_expr(a)}, a {self.c.einsum(a.tensor).reduce} of a "
                             f"running value, other than through a sum")
        return sympy.Symbol(print_expr(a))

    def sym(self, expr: Expr, owner: Einsum) -> sympy.Expr:
        return to_sympy(expr, lambda a: self.symbol(a, owner))


def _steps(expr: sympy.Expr, mapping: dict[str, str]) -> sympy.Expr:
    """`expr` with each running value's step renamed: `R@prev` -> `R@<mapping["prev"]>`."""
    subs = {}
    for s in expr.free_symbols:
        base, _, step = s.name.rpartition("@")
        if base and step in mapping:
            subs[s] = sympy.Symbol(f"{base}@{mapping[step]}")
    return expr.xreplace(subs)


def _vanishes(expr: sympy.Expr) -> bool:
    return sympy.simplify(sympy.powsimp(sympy.expand(expr), force=True)) == 0


def _telescopes(factor: sympy.Expr) -> bool:
    """F(a, b) F(b, c) = F(a, c) and F(a, a) = 1: F is phi(a)/phi(b), so a product over steps
    j..k-1 is F at steps (j, k)."""
    chained = _steps(factor, {"next": "third"})
    later = _steps(factor, {"prev": "next", "next": "third"})
    return _vanishes(factor * later - chained) and _vanishes(_steps(factor, {"next": "prev"}) - 1)


def _absorbs(u: _Unrolling, expr: Expr, rest: sympy.Expr, owner: Einsum, bound: frozenset[str]) -> bool:
    """`expr * rest == expr` with every running read at its final step. A factor that is a sum
    over other ranks of a dependent value takes `rest` inside: `rest` does not depend on the
    summed ranks, since they are none of the index variables `bound` around it."""
    for sign, factors in product_terms(_inline_maps(u.c, set(u.dependent_maps), expr), distribute=True):
        sums = [f for r, f in factors if not r and isinstance(f, Access) and f.tensor in u.dependent
                and u.c.einsum(f.tensor).reduce == "sum"]
        others = [f for _, f in factors if not (sums and f is sums[0])]
        if len(sums) == 1 and not any(set(tensors_read(f)) & (u.dependent | set(u.recurrences)) for f in others):
            w = u.c.einsum(sums[0].tensor)
            if set(w.reduced) & bound:
                return False
            summand = substitute(w.expr, {i.name: j for i, j in zip(w.target.indices, sums[0].indices)})
            if not _absorbs(u, summand, rest, owner, bound | set(w.reduced)):
                return False
            continue
        term = u.sym(product(factors, sign), owner)
        if not _vanishes(term * rest - _steps(term, {"prev": "final", "next": "final"})):
            return False
    return True


def _tensor_of(symbol: sympy.Symbol) -> str:
    return symbol.name.partition("[")[0]


def _reduction(u: _Unrolling, r: Recurrence, body: Expr) -> Einsum:
    """The reduction that recurrence `r` (its body with step maps inlined) computes at its last step."""
    e = r.einsum
    prev = r.at(Index(r.var))
    if r.name in u.extrema:
        other = body.args[1] if body.args[0] == prev else body.args[0]
        if set(tensors_read(other)) & (u.dependent | set(u.recurrences)):
            raise _refuse(e, f"{e.name}'s {body.fn} reads a running value besides {print_expr(prev)}")
        return Einsum(r.reduced_target(), other, body.fn, loc=e.loc)
    if isinstance(body, Call) and body.fn in ("max", "min") and prev in body.args:
        raise _refuse(e, f"{e.name} is a running {body.fn} but starts at {print_expr(r.init)}, "
                         f"not {print_expr(Num(REDUCE_IDENTITY[body.fn]))}")
    if r.init.value != 0:
        raise _refuse(e, f"{e.name} starts at {print_expr(r.init)}, not 0")
    added, scaled = [], []
    for sign, factors in product_terms(body, distribute=True):
        mine = [f for f in factors if r.name in tensors_read(f[1])]
        if not mine:
            added.append(product(factors, sign))
        elif mine == [(False, prev)]:
            scaled.append(product([f for f in factors if f != (False, prev)], sign))
        else:
            raise _refuse(e, f"{e.name} is not linear in {print_expr(prev)}")
    if not added or not scaled:
        raise _refuse(e, f"{e.name} {'adds nothing to' if not added else 'does not read'} {print_expr(prev)}")
    factor = u.sym(summation(scaled), e)
    if not _telescopes(factor):
        raise _refuse(e, f"{e.name}'s factor on {print_expr(prev)}, {factor}, is not a ratio exp(R[m1] - R[m1+1]) "
                         f"of running maxima, so its product over the steps does not telescope")
    rest = _steps(factor, {"prev": "next", "next": "final"})
    addend = summation(added)
    if not _absorbs(u, addend, rest, e, frozenset(e.lhs_vars)):
        raise _refuse(e, f"{e.name}'s addend {print_expr(addend)} times {rest} (the factors of the later steps) "
                         f"still depends on the running values")
    maxima = sorted({_tensor_of(s) for s in factor.free_symbols} & set(u.extrema))
    if maxima:  # with no maxima every step's factor is 1, and an absent step changes nothing
        _check_presence(u, e, addend, maxima)
    return Einsum(r.reduced_target(), addend, "sum", loc=e.loc)


def _predicates(c: Cascade, names: list[str], stop: set[str]) -> frozenset[Expr]:
    """The predicates guarding the tensors `names` and what they read (not crossing `stop`)."""
    seen, found, todo = set(), set(), list(names)
    while todo:
        t = todo.pop()
        if t in seen or t in stop or not c.writers(t):
            continue
        seen.add(t)
        e = c.einsum(t)
        if e.where is not None:
            found.add(e.where)
        todo += tensors_read(e.expr) + tensors_read(e.where)
    return frozenset(found)


def _check_presence(u: _Unrolling, e: Einsum, addend: Expr, maxima: list[str]) -> None:
    """A step where the addend is absent keeps X unscaled: the maxima must not move there, so
    the addend may have no predicate that the maxima's arguments lack."""
    stop = set(u.recurrences)
    mine = _predicates(u.c, tensors_read(addend), stop)
    theirs = _predicates(u.c, [t for m in maxima for t in tensors_read(u.recurrences[m].einsum.expr)], stop)
    if not mine <= theirs:
        raise _refuse(e, f"{e.name}'s addend has a predicate the running maxima {', '.join(maxima)} lack: on a "
                         f"step where only the addend is absent, {e.name} would keep its old scale")


def _is_extremum(r: Recurrence, body: Expr) -> bool:
    return (isinstance(body, Call) and body.fn in ("max", "min") and len(body.args) == 2
            and r.at(Index(r.var)) in body.args and r.init == Num(REDUCE_IDENTITY[body.fn]))


def unroll(c: Cascade) -> tuple[Cascade, str]:
    """`c` with every recurrence replaced by the reduction it computes (module doc, steps 1-3),
    and the recurrence's index variable."""
    recurrences = _recurrences(c)
    outputs = [c.einsum(o) for o in c.output_names if o in recurrences]
    if outputs:
        raise _refuse(outputs[0], f"{outputs[0].name} is an output with a value per step")
    dependent = _dependent(c, recurrences)
    var = next(iter(recurrences.values())).var
    step_maps = {t for t in dependent if _is_map(c.einsum(t)) and var in c.einsum(t).lhs_vars}
    bodies = {n: _inline_maps(c, step_maps, r.einsum.expr) for n, r in recurrences.items()}
    extrema = {n: bodies[n].fn for n, r in recurrences.items() if _is_extremum(r, bodies[n])}
    u = _Unrolling(c, recurrences, extrema, frozenset(dependent), frozenset(step_maps))
    reductions = {n: _reduction(u, r, bodies[n]) for n, r in recurrences.items()}
    # the recurrences' own helpers (PRM, SPD) go before the reads are checked
    replaced = prune(c.replace(einsums=tuple(reductions.get(e.name, e) for e in c.einsums), inits=()))
    for e in replaced.einsums:
        _check_reads_of_dependent(replaced, e, dependent, set(reductions), var)
    origin = {n: r.einsum for n, r in recurrences.items()}
    einsums = tuple(_read_finals(u, e, origin.get(e.name, e)) for e in replaced.einsums)
    return replaced.replace(einsums=einsums), var


def _check_reads_of_dependent(c: Cascade, e: Einsum, dependent: set[str], reductions: set[str], var: str) -> None:
    """Values that depend on running ones are per step, and read only by each other and by the
    reductions the recurrences became (whose algebra was checked)."""
    if e.name in dependent and (var not in e.lhs_vars or e.name in c.output_names):
        what = "an output" if var in e.lhs_vars else f"reduced over {var}"
        raise _refuse(e, f"{e.name} depends on running values and is {what}")
    reads = set(tensors_read(e.expr) + tensors_read(e.where)) & dependent
    if reads and e.name not in dependent | reductions:
        raise _refuse(e, f"{e.name} reads {sorted(reads)[0]}, which depends on running values, after the "
                         f"recurrences")


def _read_finals(u: _Unrolling, e: Einsum, origin: Einsum) -> Einsum:
    """`e` with reads of running extrema at their steps, and of any iterative tensor at its
    last step, reading the reduction instead; any other read of an iterative tensor is refused."""

    def fn(a: Access) -> Expr:
        r = u.recurrences.get(a.tensor)
        if r is None:
            return a
        step = r.step_of(a)
        if step == "final" or (step is not None and a.tensor in u.extrema and r.var in origin.lhs_vars):
            return r.final_read(a)
        raise _refuse(a, f"{origin.name} reads {print_expr(a)}: a running value is read only by the recurrences "
                         f"(and a running max at {r.var} or {r.var}+1 by the values of a step)")

    where = None if e.where is None else replace_accesses(e.where, fn)
    return Einsum(e.target, replace_accesses(e.expr, fn), e.reduce, where, e.loc)


# ---------------------------------------------------------------------------- the split


@dataclass(frozen=True)
class _Split:
    """The index variables of a split `M -> M1 x M0` and its flat index `m1*M0 + m0`."""

    split: Split

    @property
    def outer(self) -> str:
        return self.split.outer.lower()

    @property
    def inner(self) -> str:
        return self.split.inner.lower()

    @property
    def flat(self) -> str:
        return self.split.rank.lower()

    def is_flat(self, expr: Expr) -> bool:
        """`expr` is m1*M0 + m0, however it is written."""
        if not isinstance(expr, Binary) or set(index_vars(expr)) != {self.outer, self.inner}:
            return False
        ours = to_sympy(expr, lambda a: sympy.nan)
        flat = to_sympy(Binary("+", Binary("*", Index(self.outer), Name(self.split.inner)), Index(self.inner)),
                        lambda a: sympy.nan)
        return sympy.expand(ours - flat) == 0

    def tiled(self, e: Einsum) -> bool:
        return {self.outer, self.inner} <= set(e.lhs_vars)


def fold_split(c: Cascade, split: Split) -> Cascade:
    """`c` with `split` undone (module doc, step 4): every (m1, m0) iteration becomes one over m.
    LoweringError when some Einsum keeps m1 or m0 apart."""
    s = _Split(split)
    for e in c.einsums:
        if s.flat in e.space:
            raise LoweringError(located(e, f"{e.name} uses both {s.flat} and its split {s.outer}, {s.inner}"))
    c = _inline_copies(c, s)
    c = _merge_two_level(c, s)
    _check_bounded(c, s)
    positions = {e.name: _pair_positions(e.target, s, e) for e in c.einsums if s.tiled(e)}
    einsums = tuple(_flattened(e, s, positions) for e in c.einsums)
    for e in einsums:
        leftover = {s.outer, s.inner} & set(e.space)
        names = {n.name for n in walk(e.expr) if isinstance(n, Name)} & {split.outer, split.inner}
        if leftover or names:
            raise LoweringError(located(e, f"{e.name} uses {sorted(leftover | names)[0]} apart from the flat "
                                           f"index {s.outer}*{split.inner}+{s.inner}; the split {split.rank} -> "
                                           f"{split.outer} x {split.inner} does not fold back"))
    return c.replace(einsums=einsums, splits=tuple(x for x in c.splits if x != split))


def _inline_copies(c: Cascade, s: _Split) -> Cascade:
    """Blocked copies `BK[.., m1, m0, ..] = K[.., m1*M0+m0, ..]` inlined into their readers."""
    copies = {e.name for e in c.einsums if s.tiled(e) and _is_map(e) and isinstance(e.expr, Access)}
    if not copies:
        return c
    einsums = [e for e in c.einsums if e.name not in copies]
    einsums = [Einsum(e.target, _inline_maps(c, copies, e.expr), e.reduce,
                      None if e.where is None else _inline_maps(c, copies, e.where), e.loc) for e in einsums]
    return prune(c.replace(einsums=tuple(einsums)))


def _merge_two_level(c: Cascade, s: _Split) -> Cascade:
    """A reduction over m0 kept per m1 (`LM[m1] = max[m0] S[m1,m0]`), read only by the same
    reduction over m1, merged into it: `max[m1] LM[m1]` becomes `max[m1,m0] S[m1,m0]`."""
    local = {e.name: e for e in c.einsums if s.outer in e.lhs_vars and s.inner in e.reduced}
    einsums = []
    for e in c.einsums:
        reads = [t for t in tensors_read(e.expr) + tensors_read(e.where) if t in local]
        einsums.append(_merged(e, local[reads[0]], s) if reads else e)
    return prune(c.replace(einsums=tuple(einsums)))


def _merged(e: Einsum, inner: Einsum, s: _Split) -> Einsum:
    """`e`, a reduction over m1 of one factor `inner` (a reduction over m0), as one reduction
    over both: exact for sum (the other factors do not depend on m0) and for max, min alone."""
    terms = product_terms(e.expr)
    factors = terms[0][1] if len(terms) == 1 else []
    reads = [f for r, f in factors if not r and isinstance(f, Access) and f.tensor == inner.name]
    alone = e.reduce == "sum" or e.expr == (reads[0] if reads else None)
    if (not reads or not alone or e.reduce != inner.reduce or s.outer not in e.reduced
            or inner.name in tensors_read(e.where) or set(inner.reduced) & set(e.space)
            or [a.tensor for a in accesses(e.expr)].count(inner.name) != 1):
        raise LoweringError(located(e, f"{e.name} reads {inner.name}, a {inner.reduce} over {s.inner} per {s.outer}, "
                                       f"other than as one factor of the same reduction over {s.outer}; the split "
                                       f"does not fold back"))
    mapping = {i.name: j for i, j in zip(inner.target.indices, reads[0].indices)}
    body = substitute(inner.expr, mapping)
    expr = replace_accesses(e.expr, lambda a: body if a == reads[0] else a)
    wheres = [w for w in (e.where, inner.where and substitute(inner.where, mapping)) if w is not None]
    where = wheres[0] if len(wheres) == 1 else Binary("and", *wheres) if wheres else None
    return Einsum(e.target, expr, e.reduce, where, e.loc)


def _pair_positions(target: Access, s: _Split, e: Einsum) -> tuple[int, int]:
    names = [i.name if isinstance(i, Index) else None for i in target.indices]
    if names.count(s.outer) != 1 or names.count(s.inner) != 1:
        raise LoweringError(located(e, f"{e.name} holds {s.outer} or {s.inner} in an index expression"))
    return names.index(s.outer), names.index(s.inner)


def _flattened(e: Einsum, s: _Split, positions: dict[str, tuple[int, int]]) -> Einsum:
    """`e` over m: each (m1, m0) pair of a tiled tensor's indices becomes m, and so does each
    index expression m1*M0 + m0."""

    def pair(indices: tuple[Expr, ...], at: tuple[int, int]) -> tuple[Expr, ...]:
        if indices[at[0]] != Index(s.outer) or indices[at[1]] != Index(s.inner):
            return indices  # read at other indices: left for the check after folding
        return tuple(Index(s.flat) if k == at[0] else i for k, i in enumerate(indices) if k != at[1])

    def replace(node: Expr) -> Expr | None:
        if isinstance(node, Access) and node.tensor in positions:
            indices = pair(node.indices, positions[node.tensor])
            return Access(node.tensor, tuple(rebuild(i, replace) for i in indices), node.loc)
        return Index(s.flat, node.loc) if s.is_flat(node) else None

    target = e.target
    if e.name in positions:
        target = Access(target.tensor, pair(target.indices, positions[e.name]), target.loc)
    where = None if e.where is None else rebuild(e.where, replace)
    return Einsum(target, rebuild(e.expr, replace), e.reduce, where, e.loc)


def _check_bounded(c: Cascade, s: _Split) -> None:
    """Every Einsum over (m1, m0) is absent past M: it reads an input at m1*M0 + m0 where the
    input has M, or a tensor over (m1, m0) that is. Folding then drops only absent points."""
    declared = {d.name: d.indices for d in c.inputs}
    bounded: set[str] = set()

    def bounds(a: Access) -> bool:
        if a.tensor in declared:
            return any(v == s.flat and s.is_flat(i) for v, i in zip(declared[a.tensor], a.indices))
        return a.tensor in bounded and Index(s.outer) in a.indices and Index(s.inner) in a.indices

    for e in topological_einsums(c):
        if {s.outer, s.inner} <= set(e.space):
            if not any(bounds(a) for a in accesses(e.expr) + accesses(e.where)):
                raise LoweringError(located(e, f"{e.name} ranges over {s.outer}, {s.inner} without reading a tensor "
                                               f"over {s.split.rank}: its points past {s.split.rank} in the last tile "
                                               f"are present, so the split does not fold back"))
            bounded.add(e.name)
