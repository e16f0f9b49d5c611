"""The 1-pass form of a cascade: rank partitioning and the online rewrite (DESIGN section 5).

- `partition(c, "M", "M0")`: rank partitioning `split M -> M1 x M0`; inputs over M get blocked
  copies (`BK[.., m1, m0, ..] = K[.., m1*M0+m0, ..]`), intermediates carry (m1, m0).
- `online(c, "M", "M0")`: the 3->1-pass rewrite. After division deferral and partitioning,
  each full reduction over (m1, m0) becomes a local reduction over m0 plus a recurrence over
  m1; a `max` read by `exp(x - max)` becomes a running max, and each sum that depends on it is
  rescaled by the factor sympy derives (`exp(RM[m1] - RM[m1+1])`). On FuseMax's Cascade 4 this
  yields Cascade 5. The cost model reports the pass count of this form beside the written one.
- `carried_ratio` / `rescale_ratio`: that factor, derived once for both this rewrite and the
  kernel plans' running accumulators.
"""
from __future__ import annotations

import math

import sympy

from einsum_ir.errors import LoweringError
from einsum_ir.graph import CascadeGraph, cascade_graph, topological_einsums
from einsum_ir.ir import (
    Access, Binary, Call, Cascade, Einsum, Expr, Index, Init, Name, Num, Split, Unary, index_vars, substitute,
)
from einsum_ir.lowering.defer import defer_division
from einsum_ir.lowering.exprs import replace_accesses, tensors_read, to_sympy
from einsum_ir.lowering.groups import groupings
from einsum_ir.lowering.recurrence import fold_recurrences
from einsum_ir.lowering.unions import eliminate_unions, hoist_unions, unions_as_maps


def _split_target(e: Einsum, m: str, m1: str, m0: str) -> Access:
    idx = []
    for i in e.target.indices:
        if isinstance(i, Index) and i.name == m:
            idx += [Index(m1), Index(m0)]
        else:
            idx.append(i)
    return Access(e.target.tensor, tuple(idx))


def partition(c: Cascade, rank: str = "M", tile: str = "M0") -> Cascade:
    """`split rank -> rank1 x tile`: every use of the rank's index becomes (outer, inner)."""
    if rank not in c.dims:
        raise LoweringError(f"no rank {rank} to partition")
    outer = rank + "1" if tile == rank + "0" else tile + "_outer"
    m, m1, m0 = rank.lower(), outer.lower(), tile.lower()
    flat = Binary("+", Binary("*", Index(m1), Name(tile)), Index(m0))
    blocked: dict[str, str] = {}
    new_einsums: list[Einsum] = []
    split_tensors = set()
    for d in c.inputs:
        if m in d.indices:
            name = "B" + d.name
            while name in c.tensors:
                name = "B" + name
            blocked[d.name] = name
            tgt_idx = []
            src_idx = []
            for i in d.indices:
                if i == m:
                    tgt_idx += [Index(m1), Index(m0)]
                    src_idx.append(flat)
                else:
                    tgt_idx.append(Index(i))
                    src_idx.append(Index(i))
            new_einsums.append(Einsum(Access(name, tuple(tgt_idx)), Access(d.name, tuple(src_idx))))
            split_tensors.add(name)
    for e in c.einsums:
        if m in e.lhs_vars:
            split_tensors.add(e.name)

    declared = {d.name: d.indices for d in c.inputs}

    def fix(a: Access) -> Access:
        name = blocked.get(a.tensor, a.tensor)
        if a.tensor in blocked and any(own == m and idx != Index(m) for own, idx in zip(declared[a.tensor], a.indices)):
            name = a.tensor  # read at another rank where it is declared over this one: the input as it is
        if name in split_tensors:
            idx = []
            for i in a.indices:
                if isinstance(i, Index) and i.name == m:
                    idx += [Index(m1), Index(m0)]
                else:
                    idx.append(substitute(i, {m: flat}))
            return Access(name, tuple(idx))
        return Access(name, tuple(substitute(i, {m: flat}) for i in a.indices))

    for e in c.einsums:
        target = _split_target(e, m, m1, m0) if e.name in split_tensors else e.target
        expr = replace_accesses(e.expr, fix)
        expr = substitute(expr, {m: flat}) if m in index_vars(expr) else expr
        where = None
        if e.where is not None:
            where = replace_accesses(e.where, fix)
            where = substitute(where, {m: flat})
        new_einsums.append(Einsum(target, expr, e.reduce, where))
    splits = c.splits + (Split(rank, outer, tile),)
    return c.replace(einsums=tuple(new_einsums), splits=splits)


# ---------------------------------------------------------------------------- online rewrite


def _from_sympy(e: sympy.Expr, sym: dict) -> Expr:
    if isinstance(e, sympy.Symbol):
        return sym[e.name]
    if isinstance(e, sympy.exp):
        return Call("exp", (_from_sympy(e.args[0], sym),))
    if isinstance(e, sympy.Add):
        out = _from_sympy(e.args[0], sym)
        for a in e.args[1:]:
            if a.could_extract_minus_sign():
                out = Binary("-", out, _from_sympy(-a, sym))
            else:
                out = Binary("+", out, _from_sympy(a, sym))
        return out
    if isinstance(e, sympy.Mul):
        if e.args[0] == -1:
            return Unary("-", _from_sympy(sympy.Mul(*e.args[1:]), sym))
        out = _from_sympy(e.args[0], sym)
        for a in e.args[1:]:
            out = Binary("*", out, _from_sympy(a, sym))
        return out
    if isinstance(e, sympy.Pow) and e.args[1] == -1:
        return Binary("/", Num(1), _from_sympy(e.args[0], sym))
    if isinstance(e, sympy.Pow) and e.args[0] == 2:
        return Call("exp2", (_from_sympy(e.args[1], sym),))
    if e.is_Integer:
        return Num(int(e))
    if e.is_Number:
        return Num(float(e))
    raise LoweringError(f"cannot write {e} back as an expression")


def prepare(c: Cascade) -> tuple[Cascade, tuple[str, ...], CascadeGraph]:
    """The rewrites the key loop applies before it plans (unions of reductions hoisted and
    unions eliminated, lowering.unions; recurrences folded, lowering.recurrence; divisions
    deferred, lowering.defer), the names of those that changed `c`, and the dependency graph
    of the result. The 1-pass form starts from the same cascade, so the pass count of that
    form is the count of what the plan runs. LoweringError (located) when a union cannot be
    eliminated."""
    rewrites: list[str] = []
    hoisted = hoist_unions(c)
    if hoisted is not c:
        rewrites.append("unions of reductions as reductions of unions")
        c = hoisted
    # grouped reductions (lowering.groups) are known only inside each key tile, with their
    # presence point by point, which no predicate states: unions stay, taken by presence there
    by_presence = bool(groupings(c))
    plain, union_reason = (unions_as_maps(c), None) if by_presence else eliminate_unions(c)
    if union_reason is not None:
        raise LoweringError(union_reason)
    if plain is not c:
        rewrites.append("unions in reductions as maps, taken by presence" if by_presence
                        else "unions as sentinels under a disjunction")
        c = plain
    folded = fold_recurrences(c)
    if folded is not c:
        rewrites.append("recurrence folding")
        c = folded
    graph = cascade_graph(c)
    deferred = defer_division(c, graph)
    if deferred is not c:
        rewrites.append("division deferral")
        c, graph = deferred, cascade_graph(deferred)
    return c, tuple(rewrites), graph


def online(c: Cascade, rank: str = "M", tile: str = "M0") -> Cascade:
    """The 1-pass form: local reductions per key tile and recurrences over the tiles, after the
    key loop's own rewrites (`prepare`)."""
    c = prepare(c)[0]
    grouped = set(groupings(c))  # complete inside the key tile that holds the group: not carried
    c = partition(c, rank, tile)
    outer = c.splits[-1].outer
    m1, m0 = outer.lower(), tile.lower()
    full = [e for e in c.einsums if {m1, m0} <= set(e.reduced) and e.name not in grouped]
    if not full:
        return c
    names = set(c.tensors)

    def fresh(base: str) -> str:
        n, k = base, 2
        while n in names:
            n, k = f"{base}{k}", k + 1
        names.add(n)
        return n

    local = {e.name: fresh("L" + e.name) for e in full}
    running = {e.name: fresh("R" + e.name) for e in full}
    full_names = set(local)
    # which Einsums run per tile (read m1) vs after the loop
    per_tile = {e.name for e in c.einsums if m1 in e.lhs_vars}

    step_now, step_next = Index(m1), Binary("+", Index(m1), Num(1))
    final = Name(outer)

    def reads(expr, at_step: Expr):
        def fn(a: Access):
            if a.tensor in full_names:
                return Access(running[a.tensor], tuple(a.indices) + (at_step,))
            return a
        return replace_accesses(expr, fn)

    # online maxima: full max reductions read per tile
    online_max = {e.name for e in full if e.reduce == "max"
                  and any(e.name in tensors_read(w.expr) for w in c.einsums if w.name in per_tile)}
    out: list[Einsum] = []
    inits: list[Init] = list(c.inits)
    ratio_names: dict[str, str] = {}
    for e in topological_einsums(c):
        if e.name in full_names:
            L = local[e.name]
            lt = Access(L, tuple(e.target.indices) + (step_now,))
            body = reads(e.expr, step_next)
            out.append(Einsum(lt, body, e.reduce, e.where and reads(e.where, step_next)))
            R = running[e.name]
            inits.append(Init(Access(R, tuple(e.target.indices) + (Num(0),)),
                              Num(-math.inf) if e.reduce == "max" else Num(0)))
            prev = Access(R, tuple(e.target.indices) + (step_now,))
            nxt = Access(R, tuple(e.target.indices) + (step_next,))
            if e.reduce == "max":
                out.append(Einsum(nxt, Call("max", (prev, lt))))
                continue
            if e.reduce != "sum":
                raise LoweringError(f"{e.name}: only sum and max reductions have an online form")
            ratio = carried_ratio(c, e, online_max, grouped, per_tile)
            if ratio == 1:
                out.append(Einsum(nxt, Binary("+", lt, prev)))
                continue
            gs = sorted(s.name for s in ratio.free_symbols)
            # the ratio is per query row: index it like the maximum it rescales
            gname = [x[2:] for x in gs if not x.endswith("_new")][0]
            gidx = c.einsum(gname).target.indices
            key = str(ratio)
            if key not in ratio_names:
                pr = fresh("PR" + running[gname][1:])
                ratio_names[key] = pr
                sym = {}
                for x in gs:
                    base = x[2:].removesuffix("_new")
                    sym[x] = Access(running[base], tuple(c.einsum(base).target.indices) +
                                    (step_next if x.endswith("_new") else step_now,))
                out.append(Einsum(Access(pr, tuple(gidx) + (step_now,)), _from_sympy(ratio, sym)))
            pr_acc = Access(ratio_names[key], tuple(gidx) + (step_now,))
            scaled = fresh("P" + e.name)
            sa = Access(scaled, tuple(e.target.indices) + (step_now,))
            out.append(Einsum(sa, Binary("*", prev, pr_acc)))
            out.append(Einsum(nxt, Binary("+", lt, sa)))
            continue
        if e.name in per_tile:
            out.append(Einsum(e.target, reads(e.expr, step_next), e.reduce,
                              e.where and reads(e.where, step_next)))
        else:
            out.append(Einsum(e.target, reads(e.expr, final), e.reduce, e.where and reads(e.where, final)))
    return c.replace(einsums=tuple(out), inits=tuple(inits))


def carried_ratio(c: Cascade, e: Einsum, maxima: set[str], grouped: set[str], pointwise: set[str]) -> sympy.Expr:
    """`rescale_ratio` of the running reduction `e`, its summand read through the tensors it
    reads: a running maximum in `maxima` is the symbol G_X; a tensor in `pointwise` (computed
    per key point) or a sum in `grouped` (a sum of points that all scale alike scales alike) is
    its own expression; any other tensor, or one that reads no maximum, is a constant T_X.
    Raises LoweringError for any other reduction over values that depend on a maximum."""

    moving: dict[str, frozenset[str]] = {}

    def maxima_read(t: str) -> frozenset[str]:
        if t not in moving:
            moving[t] = frozenset()  # a recurrence reads itself
            ws = c.writers(t)
            moving[t] = frozenset({t} & maxima).union(
                *(maxima_read(r) for w in ws if t not in maxima for r in tensors_read(w.expr)))
        return moving[t]

    def leaf(a: Access) -> sympy.Expr:
        t = a.tensor
        if t in maxima:
            return sympy.Symbol("G_" + t)
        if t not in pointwise | grouped or not maxima_read(t):
            return sympy.Symbol("T_" + t)
        w = c.einsum(t)
        if w.reduced and not (t in grouped and w.reduce == "sum"):
            raise LoweringError(f"{t} reduces over {','.join(w.reduced)} a value that depends on the "
                                f"running maximum {sorted(maxima_read(t))}")
        mapping = {i.name: j for i, j in zip(w.target.indices, a.indices) if isinstance(i, Index)}
        return to_sympy(substitute(w.expr, mapping), leaf)

    return rescale_ratio(e.name, to_sympy(e.expr, leaf), e.reduce)


def rescale_ratio(name: str, body: sympy.Expr, reduce: str = "sum") -> sympy.Expr:
    """The factor a running reduction named `name` takes when the running maxima it depends on
    grow: body(g_new) / body(g_old), where `body` is its summand in sympy with each maximum
    `X` as the symbol `G_X` (and the new one as `G_X_new`). 1 when it reads none. Raises
    LoweringError when the summand depends on a maximum other than through a factor like
    exp(-max) (then no rescaling can keep the sum exact)."""
    gs = sorted((s for s in body.free_symbols if s.name.startswith("G_")), key=str)
    if not gs:
        return sympy.Integer(1)
    if reduce == "max":
        raise LoweringError(f"{name} takes a max over values that depend on the running maximum "
                            f"{gs[0].name[2:]}; no online form")
    new = {g: sympy.Symbol(g.name + "_new") for g in gs}
    ratio = sympy.powsimp(sympy.simplify(sympy.powsimp(body.subs(new) / body, force=True)), force=True)
    if not ratio.free_symbols <= set(gs) | set(new.values()):
        names = ", ".join(g.name[2:] for g in gs)
        raise LoweringError(f"{name} depends on the running maximum {names} other than through a "
                            f"factor exp(-max): the online rewrite does not apply (ratio {ratio})")
    return ratio
