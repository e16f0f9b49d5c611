"""Cascade -> cascade rewrites (DESIGN sections 5 and 6). Each is a pure function and keeps the
interpreter's results.

- `partition(c, "M", "M0")`: rank partitioning `split M -> M1 x M0`; inputs over M get blocked
  copies (`BK[.., m1, m0, ..] = K[.., m1*M0+m0, ..]`), intermediates carry (m1, m0).
- `online(c, "M", "M0")`: the 3->1-pass rewrite. After division deferral and partitioning,
  each full reduction over (m1, m0) becomes a local reduction over m0 plus a recurrence over
  m1; a `max` read by `exp(x - max)` becomes a running max, and each sum that depends on it is
  rescaled by the factor sympy derives (`exp(RM[m1] - RM[m1+1])`). On FuseMax's Cascade 4 this
  yields Cascade 5.
- `defer_division(c)`: see `lowering.defer`.
- `fuse_contractions(c)`: `S = sum_e A*B + sum_r C*D` (through a map of two contractions)
  becomes one contraction over a concatenated rank, FlashBias's trick.
"""
from __future__ import annotations

import math

import sympy

from einsum_ir.errors import LoweringError
from einsum_ir.graph import topological_einsums
from einsum_ir.ir import (
    Access, Binary, Call, Cascade, Einsum, Expr, Index, Init, Name, Num, Split, Unary,
    index_vars, product_terms,
)
from einsum_ir.lowering.defer import defer_division, prune
from einsum_ir.lowering.exprs import replace_accesses, substitute, tensors_read, to_sympy

__all__ = ["partition", "online", "defer_division", "fuse_contractions", "prune"]


# ---------------------------------------------------------------------------- partitioning


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

    def fix(a: Access) -> Access:
        name = blocked.get(a.tensor, a.tensor)
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
    if e.is_Integer:
        return Num(int(e))
    if e.is_Number:
        return Num(float(e))
    raise LoweringError(f"cannot write {e} back as an expression")


def online(c: Cascade, rank: str = "M", tile: str = "M0") -> Cascade:
    """The 1-pass form: local reductions per key tile and recurrences over the tiles."""
    c = defer_division(c)
    c = partition(c, rank, tile)
    outer = c.splits[-1].outer
    m1, m0 = outer.lower(), tile.lower()
    full = [e for e in c.einsums if {m1, m0} <= set(e.reduced)]
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
            ratio = _ratio(c, e, online_max, per_tile)
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


def _ratio(c: Cascade, e: Einsum, online_max: set[str], per_tile: set[str]) -> sympy.Expr:
    """E(g_new)/E(g_old) for the summand of `e`, with the online maxima g as symbols."""

    def leaf(a: Access):
        if a.tensor in online_max:
            return sympy.Symbol("G_" + a.tensor)
        ws = c.writers(a.tensor)
        if ws and a.tensor in per_tile and not ws[-1].reduced:
            w = ws[-1]
            mapping = {i.name: j for i, j in zip(w.target.indices, a.indices) if isinstance(i, Index)}
            return to_sympy(substitute(w.expr, mapping), leaf)
        return sympy.Symbol("T_" + a.tensor)

    body = to_sympy(e.expr, leaf)
    gs = [s for s in body.free_symbols if s.name.startswith("G_")]
    if not gs:
        return sympy.Integer(1)
    new = {s: sympy.Symbol(s.name + "_new") for s in gs}
    ratio = sympy.powsimp(sympy.simplify(body.subs(new) / body), force=True)
    if not ratio.free_symbols <= set(gs) | set(new.values()):
        raise LoweringError(f"{e.name} depends on a running maximum other than through exp(-max)")
    # written as exp(old - new): the factor the previous partial sum takes
    return ratio


# ---------------------------------------------------------------------------- contraction fusion


def fuse_contractions(c: Cascade, rank: str = "C") -> Cascade:
    """`S = X + Y` with `X = sum_e A*B`, `Y = sum_r C*D` (same kept ranks, two operands each, one
    per side) becomes `S = sum_c AC*BC` over a concatenated rank `rank` of extent E + R, with
    `AC = where(c < E, A[..min(c,E-1)] * k, C[..max(c-E,0)])` and `BC` likewise. Scalar factors
    and signs go to the first side. The new rank must be bound at call time (`C=E+R`)."""
    for s in c.einsums:
        terms = product_terms(s.expr, distribute=True)
        if s.reduced or len(terms) != 2 or any(len(f) != 1 or f[0][0] for _, f in terms):
            continue
        parts = [f[0][1] for _, f in terms]
        if not all(isinstance(p, Access) for p in parts):
            continue
        ws = [c.writers(p.tensor) for p in parts]
        if not all(w and w[-1].reduce == "sum" and len(w[-1].reduced) == 1 and w[-1].where is None for w in ws):
            continue
        xs = [w[-1] for w in ws]
        if any([i.name for i in x.target.indices] != [i.name for i in p.indices] for x, p in zip(xs, parts)):
            continue
        sides = []
        for (sign, _), x in zip(terms, xs):
            side = _two_sides(x)
            if side is None:
                break
            sides.append((sign, x, *side))
        if len(sides) != 2 or rank in c.dims:
            continue
        cv = rank.lower()
        (s1, x1, a1, b1, k1), (s2, x2, a2, b2, k2) = sides
        r1, r2 = x1.reduced[0], x2.reduced[0]
        E1 = Name(r1.upper())
        names = set(c.tensors)

        def fresh(base):
            n, k = base, 2
            while n in names:
                n, k = f"{base}{k}", k + 1
            names.add(n)
            return n

        def concat(name, first: Access, second: Access, scale1: Expr | None, scale2: Expr | None) -> Einsum:
            lo = Binary("<", Index(cv), E1)
            i1 = substitute(first, {r1: Call("min", (Index(cv), Binary("-", E1, Num(1))))})
            i2 = substitute(second, {r2: Call("max", (Binary("-", Index(cv), E1), Num(0)))})
            v1 = i1 if scale1 is None else Binary("*", i1, scale1)
            v2 = i2 if scale2 is None else Binary("*", i2, scale2)
            keep = [i for i in first.indices if not (isinstance(i, Index) and i.name == r1)]
            tgt = Access(name, tuple(keep) + (Index(cv),))
            return Einsum(tgt, Call("where", (lo, v1, v2)))

        k1e = _scale(k1, s1)
        k2e = _scale(k2, s2)
        ac, bc = fresh(a1.tensor + b1.tensor[:0] + "C"), fresh(b1.tensor + "C")
        ea = concat(ac, a1, a2, k1e, k2e)
        eb = concat(bc, b1, b2, None, None)
        fused = Einsum(s.target, Binary("*", ea.target, eb.target), "sum", s.where)
        out = []
        for e in c.einsums:
            if e is s:
                out += [ea, eb, fused]
            else:
                out.append(e)
        return prune(c.replace(dims=c.dims + (rank,), einsums=tuple(out)))
    return c


def _scale(factors: list[Expr], sign: float) -> Expr | None:
    out = None
    for f in factors:
        out = f if out is None else Binary("*", out, f)
    if sign == -1:
        out = Unary("-", out if out is not None else Num(1))
    return out


def _two_sides(x: Einsum):
    """(A access, B access, scalar factors) of `sum_r A*B*k` with r the last index of A and B."""
    terms = product_terms(x.expr, distribute=True)
    if len(terms) != 1 or terms[0][0] != 1:
        return None
    factors = terms[0][1]
    accs = [f for r, f in factors if isinstance(f, Access) and not r]
    rest = [f for r, f in factors if not (isinstance(f, Access) and not r)]
    if len(accs) != 2 or any(r for r, _ in factors) or any(index_vars(f) for f in rest):
        return None
    r = x.reduced[0]
    if not all(a.indices[-1] == Index(r) for a in accs):
        return None
    return accs[0], accs[1], rest
