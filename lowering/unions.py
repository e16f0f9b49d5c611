"""Union forms for the key loop: unions of reductions become reductions of unions, so one key
loop carries one state, and unions over a key tile become sentinels under a disjunction
(`eliminate_unions`, below), so every later stage sees plain IR.

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
   sum stays a contraction. Only where it gains a loop: the union is read per point of the
   reduced rank (GM inside `exp(S0 - GM)`), or its operands sum values under a maximum over
   that rank (one rescaled accumulator instead of one per set); a union of two score
   contractions over a feature rank stays as it is;
3. Einsums nothing reads any more are dropped, and Einsums that compute one right side under
   different predicates share one unmasked computation (one score contraction for all sets).

A union with an operand known only after the loop (present where a reduction saw a point:
var_sink's `AR`, present in rows that saw a sink) is not hoisted, and a sum over a reduced rank
of one distributes over it instead (`_split_late`): the union then reads final values, which
`eliminate_unions` leaves to the kernels (`after_every_reduction`), to be taken by each value's
presence after the loop.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from einsum_ir.functions import UNIONS
from einsum_ir.ir import (
    Access, Binary, Call, Cascade, Einsum, Expr, Index, Num, accesses, chain, conjuncts, index_vars, product_terms,
    rebuild, substitute, walk,
)
from einsum_ir.lowering.exprs import product
from einsum_ir.lowering.groups import groupings
from einsum_ir.printer import print_expr


def has_unions(exprs: Iterable[Expr | None]) -> bool:
    """Some expression calls a union form."""
    return any(isinstance(n, Call) and n.fn in UNIONS for x in exprs if x is not None for n in walk(x))


def flatten_unions(expr: Expr) -> Expr:
    """`union_max(union_max(a, b), c)` as `union_max(a, b, c)`: one form is associative, and a
    flat union is one reduction over its operands."""
    def flat(n: Expr) -> Expr | None:
        if not (isinstance(n, Call) and n.fn in UNIONS):
            return None
        args: list[Expr] = []
        for a in (flatten_unions(x) for x in n.args):
            args += list(a.args) if isinstance(a, Call) and a.fn == n.fn else [a]
        return Call(n.fn, tuple(args), n.loc)

    return rebuild(expr, flat)


def hoist_unions(c: Cascade) -> Cascade:
    """The rewrite above; `c` itself when nothing applies."""
    if not has_unions(e.expr for e in c.einsums):
        return c
    names = {*c.tensors, *(d.name for d in c.inputs)}
    out = c.replace(einsums=tuple(replace(e, expr=flatten_unions(e.expr)) for e in c.einsums))
    kept: set[str] = set()  # unions of reductions left as they are: an operand is known only after the loop
    changed = True
    while changed:
        changed = False
        for k, e in enumerate(out.einsums):
            new = _name_inner_union(out, e, names) or _split_late(out, e, names)
            hoisted = new is None and e.name not in kept
            if hoisted:
                new = _hoist(out, e, names)
            if new is None:
                continue
            trial = out.replace(einsums=out.einsums[:k] + tuple(new) + out.einsums[k + 1:])
            if hoisted and any(_late_union(trial, n) for x in new for n in walk(x.expr)
                               if isinstance(n, Call) and n.fn in UNIONS):
                kept.add(e.name)
                continue
            out, changed = trial, True
            break
    if out.einsums == c.einsums:
        return c
    return _share_masked_copies(_drop_unread(out), names)


def unions_as_maps(c: Cascade) -> Cascade:
    """A union form inside a reduction (`O = sum_m union_sum(EO, W) * V`) as a map of its own
    (`O_u[p,m] = union_sum(EO, W)`, `O = sum_m O_u * V`), for a key loop that takes unions by
    each point's presence: the reduction then sums where that one value is present, the union
    of its operands' presence, not where all of them are."""
    names = {*c.tensors, *(d.name for d in c.inputs)}
    einsums: list[Einsum] = []
    changed = False
    for e in c.einsums:
        found: list[Call] = []
        if e.reduced and not e.recurrence_var:  # the outermost unions: an inner one is its map's
            rebuild(e.expr, lambda n: found.append(n) or n if isinstance(n, Call) and n.fn in UNIONS else None)
        if not found:
            einsums.append(e)
            continue
        maps: dict[int, Access] = {}
        for node in found:
            space = [v for v in e.lhs_vars + list(e.reduced) if v in index_vars(node)]
            target = Access(_fresh(names, f"{e.name}_u"), tuple(Index(v) for v in dict.fromkeys(space)))
            einsums.append(Einsum(target, node, loc=node.loc))
            maps[id(node)] = target
        einsums.append(replace(e, expr=rebuild(e.expr, lambda n: maps.get(id(n)))))
        changed = True
    return c.replace(einsums=tuple(einsums)) if changed else c


def _split_late(c: Cascade, e: Einsum, names: set[str]) -> list[Einsum] | None:
    """Step 2, the other way: a sum over a union whose operands are known only after the loop
    (`O = sum_m union_sum(AK, AR) * V`, AR present only in rows that saw a sink) as the union
    of the operands' sums, `O = union_sum(sum_m AK * V, sum_m AR * V)`: exact, since both sum
    every present point of every operand (and are absent where none has one), and the union
    then reads final values after the loop, where their presence is known."""
    if e.reduce != "sum" or not e.reduced or e.recurrence_var:
        return None
    terms = product_terms(e.expr)
    if len(terms) != 1:
        return None
    sign, factors = terms[0]
    unions = [f for recip, f in factors if not recip and isinstance(f, Call) and f.fn == "union_sum"]
    if len(unions) != 1 or not _late_union(c, unions[0]):
        return None
    rest = [f for f in factors if f[1] is not unions[0]]
    parts = []
    for x in unions[0].args:
        target = Access(_fresh(names, f"{e.name}_u"), e.target.indices)
        parts.append(replace(e, target=target, expr=product([(False, x)] + rest, sign)))
    return parts + [Einsum(e.target, Call("union_sum", tuple(p.target for p in parts), unions[0].loc), loc=e.loc)]


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


# ---------------------------------------------------------------------------- union elimination
#
# In a key loop, presence is carried by predicates: a stream value is present where its guards
# hold. A union operand whose presence is exactly its guards' conjunction can instead hold a
# sentinel where a guard fails that the chain up to the union turns into the union's identity
# (a score of -inf: union_max sees -inf, exp(-inf - GM) = 0 is union_sum's identity), and the
# union becomes the plain operation under the predicate "some operand's guards hold":
#
#     S0 = S where A;  S1 = S where B;  U = union_max(S0, S1)
#  -> S0 = where(A, S, -inf);  S1 = where(B, S, -inf);  U = max(S0, S1) where A or B
#
# exact, and plain IR for every later stage (the emitters, the absence analysis, the backward).
# Sentinels are chosen by the absence analysis's abstract values (lowering.absence), from the
# function registry, never by pattern.


def eliminate_unions(c: Cascade) -> tuple[Cascade, str | None]:
    """`c` without union forms when every one can be eliminated as above, and None; else `c`
    and the located reason for the first one that cannot."""
    from einsum_ir.errors import located
    from einsum_ir.lowering.absence import SENTINELS, abstract
    from einsum_ir.validate import PresenceAnalysis, describe_presence

    if not has_unions(e.expr for e in c.einsums):
        return c, None
    later = after_every_reduction(c)
    unions = [(e, n) for e in c.einsums if e.name not in later
              for n in walk(e.expr) if isinstance(n, Call) and n.fn in UNIONS]
    if not unions:
        return c, None
    writers = {e.name: e for e in c.einsums}
    analysis = PresenceAnalysis(c)

    def roots(expr: Expr) -> list[str]:
        return _guard_roots(expr, writers)

    def why(e: Einsum, node: Call, text: str) -> str:
        return located(node, f"{e.name}: {print_expr(node)} {text}")

    operand_roots: dict[int, list[str]] = {}
    for e, node in unions:
        if e.recurrence_var or any(isinstance(n, Call) and n.fn in UNIONS for a in node.args for n in walk(a)):
            return c, why(e, node, "is nested in a union or a recurrence; the key loop carries flat unions")
        for x in node.args:
            rs = roots(x)
            if _known_late(x, writers, analysis):
                ranks = sorted({v for y in node.args for a in accesses(y) if a.tensor in writers
                                for v in writers[a.tensor].reduced})
                if len(ranks) > 1:  # sets over different key ranks (full-resolution and pooled keys)
                    return c, why(e, node, f"joins reductions over different ranks ({', '.join(ranks)}); one key "
                                           f"loop streams one rank, and merging the states of one loop per rank "
                                           f"is not derived yet, so this union runs on the interpreter "
                                           f"(backend 'reference', or 'auto')")
                return c, why(e, node, f"combines values whose presence is known only after a loop ({print_expr(x)} is "
                                       f"present where {describe_presence(analysis.of(x))}); a key-stream kernel "
                                       f"carries presence as predicates over the keys, so this union runs on the "
                                       f"interpreter (backend 'reference', or 'auto')")
            operand_roots[id(x)] = rs
    guarded = list(dict.fromkeys(r for rs in operand_roots.values() for r in rs))
    for r in guarded:
        reader = _read_outside_unions(c, r, set(operand_roots))
        if reader is not None:
            what = "is an output" if reader == r else f"reaches {reader} outside the union forms it feeds"
            return c, located(writers[r], f"{r} is guarded by a predicate and {what}; its absent points cannot "
                                          f"hold a sentinel, and a key-stream kernel carries presence no other "
                                          f"way, so this runs on the interpreter (backend 'reference', or 'auto')")
    choice = _sentinels(c, unions, operand_roots, guarded, writers, abstract, SENTINELS)
    if choice is None:
        e, node = unions[0]
        return c, why(e, node, "has operands that no sentinel (-inf or 0) turns into its identity")
    einsums: list[Einsum] = []
    names = {*c.tensors, *(d.name for d in c.inputs)}
    for e in c.einsums:
        if e.name in choice:
            sentinel = Num(choice[e.name])
            lhs = Access(e.name, e.target.indices)
            if e.reduced:  # the contraction without its predicate, then the select
                inner = Access(_fresh(names, f"{e.name}_s"), e.target.indices)
                einsums.append(replace(e, target=inner, where=None))
                einsums.append(Einsum(lhs, Call("where", (e.where, inner, sentinel)), loc=e.loc))
            else:
                einsums.append(Einsum(lhs, Call("where", (e.where, e.expr, sentinel)), loc=e.loc))
            continue
        mine = [n for n in walk(e.expr) if isinstance(n, Call) and n.fn in UNIONS]
        if not mine:
            einsums.append(e)
            continue
        where = list(conjuncts(e.where))
        for node in mine:
            parts = [[a for r in operand_roots[id(x)] for a in conjuncts(writers[r].where)] for x in node.args]
            if all(parts):  # present where some operand's guards hold; else everywhere
                where.append(_or([_and(p) for p in parts]))
        expr = rebuild(e.expr, lambda n: UNIONS[n.fn].present_value(n.args)
                       if isinstance(n, Call) and n.fn in UNIONS else None)
        einsums.append(replace(e, expr=expr, where=_and(where) if where else None))
    return c.replace(einsums=tuple(einsums)), None


def _guard_roots(expr: Expr, writers: dict[str, Einsum]) -> list[str]:
    """The guarded values whose predicates make `expr` absent, up through maps."""
    out: list[str] = []
    for a in accesses(expr):
        w = writers.get(a.tensor)
        if w is None:
            continue
        if w.where is not None and not set(index_vars(w.where)) - set(w.lhs_vars) and a.tensor not in out:
            out.append(a.tensor)
        if not w.reduced and not w.recurrence_var:
            out += [r for r in _guard_roots(w.expr, writers) if r not in out]
    return out


def _known_late(x: Expr, writers: dict[str, Einsum], analysis) -> bool:
    """The union operand `x` is present where more than its guards hold: where some reduction
    it reads has a point (var_sink's `AR`, present only where the row saw a sink), which a key
    loop knows only after the loop."""
    from einsum_ir.validate import implies

    have = frozenset(a for r in _guard_roots(x, writers) for a in conjuncts(writers[r].where))
    return not all(implies(have, atom) for atom in analysis.of(x))


def _late_union(c: Cascade, node: Call) -> bool:
    """Some operand of the union `node` (a node of `c`) is known late (`_known_late`)."""
    from einsum_ir.validate import PresenceAnalysis

    writers = {e.name: e for e in c.einsums}
    analysis = PresenceAnalysis(c, tile_local=frozenset(groupings(c)))
    return any(_known_late(x, writers, analysis) for x in node.args)


def after_every_reduction(c: Cascade) -> set[str]:
    """The Einsums that reduce nothing and that no reduction reads, directly or through maps:
    they run after every loop, on final values whose presence the loops know (a carried value
    is present where a point of it was), so a union there is left for the kernels to evaluate
    by that presence rather than eliminated."""
    from einsum_ir.graph import cascade_graph

    ancestors = cascade_graph(c).ancestors
    feeding = {a for e in c.einsums if e.reduced or e.recurrence_var for a in ancestors[e.name]}
    return {e.name for e in c.einsums if not e.reduced and not e.recurrence_var and e.name not in feeding}


def _sentinels(c, unions, operand_roots, guarded, writers, abstract, sentinels) -> dict[str, float] | None:
    """A sentinel per guarded value such that, with any set of its guards failing, every union
    operand reading it evaluates to the union's identity; None when no choice does."""
    import itertools

    from einsum_ir.graph import topological_einsums

    order = [e.name for e in topological_einsums(c)]
    for values in itertools.product(sentinels, repeat=len(guarded)):
        choice = dict(zip(guarded, values))
        if all(_operand_is_identity(x, UNIONS[node.fn].identity, operand_roots[id(x)], choice, writers, order,
                                    abstract)
               for _, node in unions for x in node.args):
            return choice
    return None


def _operand_is_identity(x, identity, rs, choice, writers, order, abstract) -> bool:
    import itertools

    for k in range(1, len(rs) + 1):
        for failing in itertools.combinations(rs, k):
            values = {r: choice[r] for r in failing}
            for name in order:  # maps between the guards and the operand, in cascade order
                w = writers[name]
                if name not in values and not w.reduced and any(a.tensor in values for a in accesses(w.expr)):
                    values[name] = abstract(w.expr, values)
            # a value read on the way that no guard reaches (a running maximum) is a finite number
            if abstract(x, values) != identity:
                return False
    return True


def _read_outside_unions(c: Cascade, name: str, operands: set[int]) -> str | None:
    """The first use of `name` that does not reach a union operand through maps only (an
    Einsum, or `name` itself where it is an output), or None when every use does."""
    if name in c.output_names:
        return name
    for e in c.einsums:
        if name not in {a.tensor for a in accesses(e.expr) + accesses(e.where)}:
            continue
        if name in {a.tensor for a in accesses(e.where)}:
            return e.name
        inside = [a for n in walk(e.expr) if isinstance(n, Call) and n.fn in UNIONS
                  for x in n.args if id(x) in operands for a in accesses(x) if a.tensor == name]
        every = [a for a in accesses(e.expr) if a.tensor == name]
        if len(inside) == len(every):
            continue
        if e.reduced or e.recurrence_var:
            return e.name
        further = _read_outside_unions(c, e.name, operands)
        if further is not None:
            return further
    return None


def _and(parts: list[Expr]) -> Expr:
    return chain("and", parts)


def _or(parts: list[Expr]) -> Expr:
    return chain("or", parts)


