"""Unions of reductions become reductions of unions, so one key loop carries one state.

A softmax over several masked key sets is written per set and joined by union forms
(docs/spec.md, "Unions"): `GM = union_max(G0, G1)` with `G0 = max[m] S0`, `G1 = max[m] S1`;
`O = union_sum(N0, N1) / union_sum(D0, D1)`. Read as written, GM is known only after the key
loop, so the exponentials, which read GM, need a second pass. But a reduction's result
is the reduction over its present points, and a union form is that same reduction over its
present operands, so over one reduced rank

    union_R(reduce_R[m] A_1, ..., reduce_R[m] A_k) = reduce_R[m] union_R(A_1, ..., A_k)

exactly, absent points included: both sides reduce the multiset of every set's present
points, and both are absent where no set has one. After the rewrite GM is one running maximum
over the union of the sets, and D one running denominator, which the online rewrite and the
division deferral then treat as for one set.

The rewrite, to a fixed point:

1. a union form inside a larger expression whose operands read reductions is named as an
   Einsum of its own (`O = union_sum(N0, N1) / union_sum(D0, D1)` gives `O = U0 / U1`);
2. an Einsum that is one union form of reads of reductions of its kind (sum for union_sum, max
   for union_max) over the same reduced indices becomes one reduction: operands with a
   predicate become stream values of their own (`X_u[p,m] = body where pred`, so their
   presence is kept), and a factor common to every operand of a sum that is present everywhere
   (`V[m,f]` in `E0*V`, `E1*V`) moves out of the union (`union_sum(E0, E1) * V`), so the
   sum stays a contraction;
3. Einsums nothing reads any more are dropped.
"""
from __future__ import annotations

from dataclasses import replace

from einsum_ir.functions import UNIONS
from einsum_ir.ir import (
    Access, Binary, Call, Cascade, Einsum, Expr, Index, accesses, index_vars, product_terms, rebuild, substitute,
    walk,
)


def has_unions(exprs) -> bool:
    return any(isinstance(n, Call) and n.fn in UNIONS for x in exprs if x is not None for n in walk(x))


def strip_unions(expr: Expr) -> Expr:
    """`expr` with every union form replaced by its value where every operand is present: what
    a rescale factor is derived from (each present operand takes the same factor)."""
    return rebuild(expr, lambda n: UNIONS[n.fn].present_value(tuple(strip_unions(a) for a in n.args))
                   if isinstance(n, Call) and n.fn in UNIONS else None)


def hoist_unions(c: Cascade) -> Cascade:
    """The rewrite above; `c` itself when nothing applies."""
    if not has_unions(e.expr for e in c.einsums):
        return c
    names = {*c.tensors, *(d.name for d in c.inputs)}
    changed, out = True, c
    while changed:
        changed = False
        for k, e in enumerate(out.einsums):
            new = _name_inner_union(out, e, names) or _hoist(out, e, names)
            if new is not None:
                out = out.replace(einsums=out.einsums[:k] + tuple(new) + out.einsums[k + 1:])
                changed = True
                break
    return c if out is c else _share_masked_copies(_drop_unread(out), names)


def _share_masked_copies(c: Cascade, names: set[str]) -> Cascade:
    """Einsums that compute one right side under different predicates (each key set's scores,
    `S0 = Q*K*scale where A`, `S1 = Q*K*scale where B`) as one unmasked Einsum and a masked
    copy per predicate, so a kernel computes the contraction once."""
    groups: dict[tuple, list[Einsum]] = {}
    for e in c.einsums:
        if e.where is not None and not e.recurrence_var and all(isinstance(i, Index) for i in e.target.indices):
            groups.setdefault((e.expr, e.reduce, tuple(e.lhs_vars)), []).append(e)
    einsums = list(c.einsums)
    for (expr, reduce, lhs), members in groups.items():
        if len(members) < 2 or not set(index_vars(expr)) <= set(lhs) | set(members[0].reduced):
            continue
        if any(set(index_vars(m.where)) - set(lhs) for m in members):  # a predicate on a reduced index
            continue
        shared = Access(_fresh(names, f"{members[0].name}_s"), tuple(Index(v) for v in lhs))
        at = einsums.index(members[0])
        for m in members:
            einsums[einsums.index(m)] = replace(m, expr=shared, reduce="sum")
        einsums.insert(at, Einsum(shared, expr, reduce, loc=members[0].loc))
    return c.replace(einsums=tuple(einsums))


def _fresh(names: set[str], base: str) -> str:
    k = 0
    while f"{base}{k}" in names:
        k += 1
    names.add(f"{base}{k}")
    return f"{base}{k}"


def _reduction_read(c: Cascade, a: Expr) -> Einsum | None:
    """The writer of `a` when `a` reads a (non-iterative) reduction at plain, distinct indices."""
    if not isinstance(a, Access) or a.tensor not in {e.name for e in c.einsums}:
        return None
    w = c.einsum(a.tensor)
    plain = [i.name for i in a.indices if isinstance(i, Index)]
    if w.recurrence_var or not w.reduced or len(plain) != len(a.indices) or len(set(plain)) != len(plain):
        return None
    return w


def _name_inner_union(c: Cascade, e: Einsum, names: set[str]) -> list[Einsum] | None:
    """Step 1: a union of reads of reductions inside a larger expression, as its own Einsum."""
    for node in walk(e.expr):
        if node is e.expr or not (isinstance(node, Call) and node.fn in UNIONS):
            continue
        if not all(_reduction_read(c, a) for a in node.args):
            continue
        lhs = [v for v in e.lhs_vars if v in index_vars(node)]
        if set(index_vars(node)) - set(lhs):  # it reads a reduced index: not one value per left point
            continue
        name = _fresh(names, f"{e.name}_u")
        target = Access(name, tuple(Index(v) for v in lhs))
        expr = rebuild(e.expr, lambda n: target if n is node else None)
        return [Einsum(target, node, loc=node.loc), replace(e, expr=expr)]
    return None


def _hoist(c: Cascade, e: Einsum, names: set[str]) -> list[Einsum] | None:
    """Step 2: `X = union_R(reduce_R[r] A_i ...)` as `X = reduce_R[r] union_R(...)`."""
    call = e.expr
    if not (isinstance(call, Call) and call.fn in UNIONS) or e.reduced or e.where is not None:
        return None
    u = UNIONS[call.fn]
    writers = [_reduction_read(c, a) for a in call.args]
    if not all(w is not None and w.reduce == u.reduce for w in writers):
        return None
    reduced = set(writers[0].reduced)
    if any(set(w.reduced) != reduced for w in writers) or reduced & set(e.lhs_vars):
        return None
    if not (_read_along(c, e.name, reduced) or all(_under_max(c, w, reduced) for w in writers)):
        return None  # nothing gains: a union after the loop over the reduced rank is exact as it is
    out: list[Einsum] = []
    operands: list[Expr] = []
    for a, w in zip(call.args, writers):
        # the writer's left indices as this read names them; its reduced ones keep their names
        rename = {i.name: j for i, j in zip(w.target.indices, a.indices)}
        body = substitute(w.expr, rename)
        if w.where is not None:  # its presence is its predicate's: keep it on a value of its own
            space = [v for v in e.lhs_vars if v in index_vars(body) + index_vars(w.where)]
            space += [v for v in w.reduced if v in index_vars(body) + index_vars(w.where)]
            name = _fresh(names, f"{w.name}_u")
            target = Access(name, tuple(Index(v) for v in space))
            out.append(Einsum(target, body, where=substitute(w.where, rename), loc=w.loc))
            body = target
        operands.append(body)
    union, common = _factor_common(c, u.name, operands)
    space = list(dict.fromkeys([v for v in e.lhs_vars if v in index_vars(union)] +
                               [v for v in sorted(reduced) if v in index_vars(union)]))
    same = next((x for x in c.einsums if x.expr == union and x.where is None and not x.reduced
                 and [i.name for i in x.target.indices if isinstance(i, Index)] == space), None)
    if same is not None:  # one union of the same operands serves every sum (the denominator's too)
        stream = same.target
    else:
        stream = Access(_fresh(names, f"{e.name}_u"), tuple(Index(v) for v in space))
        out.append(Einsum(stream, union, loc=call.loc))
    expr: Expr = stream
    for f in common:
        expr = Binary("*", expr, f)
    out.append(Einsum(e.target, expr, u.reduce, loc=e.loc))
    return out


def _read_along(c: Cascade, name: str, ranks: set[str]) -> bool:
    """Some Einsum downstream of `name` iterates the index variables `ranks` (a maximum read per
    key, `exp(S0 - GM)`): the union must be known inside the loop over them."""
    todo, seen = [name], {name}
    while todo:
        t = todo.pop()
        for e in c.einsums:
            if e.name in seen or t not in {a.tensor for a in accesses(e.expr) + accesses(e.where)}:
                continue
            if set(e.space) & ranks:
                return True
            seen.add(e.name)
            todo.append(e.name)
    return False


def _under_max(c: Cascade, w: Einsum, ranks: set[str]) -> bool:
    """`w` sums values that read a maximum over `ranks` (a softmax's terms under the running
    maximum): one sum of their union is one rescaled accumulator instead of one per set."""
    writers = {e.name: e for e in c.einsums}
    todo, seen = [w], set()
    while todo:
        e = todo.pop()
        for a in accesses(e.expr) + accesses(e.where):
            x = writers.get(a.tensor)
            if x is None or x.name in seen:
                continue
            if x.reduce == "max" and set(x.reduced) == ranks:
                return True
            seen.add(x.name)
            todo.append(x)
    return False


def _factor_common(c: Cascade, form: str, operands: list[Expr]) -> tuple[Expr, list[Expr]]:
    """`union_sum(E0*V, E1*V)` as (`union_sum(E0, E1)`, [V]): a factor of every operand that
    reads only inputs (present everywhere) distributes out of the sum. Other forms keep theirs."""
    unit = Call(form, tuple(operands))
    if form != "union_sum":
        return unit, []
    terms = [product_terms(x) for x in operands]
    if any(len(t) != 1 or t[0][0] != 1.0 for t in terms):
        return unit, []
    factors = [t[0][1] for t in terms]
    inputs = set(c.input_names)
    common = [f for f in factors[0] if not f[0] and all(f in fs for fs in factors[1:])
              and all(a.tensor in inputs for a in accesses(f[1]))]
    if not common:
        return unit, []
    rest = []
    for fs in factors:
        left = list(fs)
        for f in common:
            left.remove(f)
        rest.append(_product(left))
    return Call(form, tuple(rest)), [f[1] for f in common]


def _product(factors: list[tuple[bool, Expr]]) -> Expr:
    from einsum_ir.ir import Num

    out: Expr | None = None
    for reciprocal, f in factors:
        if reciprocal:
            out = Binary("/", out if out is not None else Num(1.0), f)
        else:
            out = f if out is None else Binary("*", out, f)
    return out if out is not None else Num(1.0)


def _drop_unread(c: Cascade) -> Cascade:
    """Without the Einsums whose values nothing reads and no output is."""
    keep = list(c.einsums)
    while True:
        read = {a.tensor for e in keep for a in accesses(e.expr) + accesses(e.where)}
        left = [e for e in keep if e.name in read or e.name in c.output_names]
        if len(left) == len(keep):
            return c.replace(einsums=tuple(left))
        keep = left
