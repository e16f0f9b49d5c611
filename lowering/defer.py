"""Division deferral past a contraction (DESIGN section 5: `O = (SN*V)/SD` merges passes 2, 3).

A sum over rank(s) R whose summand reads a full reduction D over R (D has no R index) cannot
be computed in the same traversal of R that computes D. But a factor without R indices
commutes with the sum: `sum_m (SN/SD)*V = (sum_m SN*V) / SD`. The rewrite

1. inlines map Einsums (no reduction) whose values read such a D into the contraction that
   reads them (`A = SN/SD; O = A*V` becomes `O = SN/SD*V`), a map's predicate joining the
   contraction's (it sums where the map is present);
2. expands the summand into signed terms of factors; in each term the factors with no R
   index that read D move out;
3. writes `Z_num_k = sum_R inner_k` (one per term, keeping the predicate) and
   `Z = sum_k outer_k * Z_num_k`. More than one term is the split of a contraction over a sum
   of normalized terms.

It is exact under absent-point semantics: the numerator is absent exactly where the
original sum is, and so is D. A sum whose terms are present at different points, or whose
term is constant along a summed rank, is left whole (`_split_is_exact`): the lowering then
refuses it rather than count the wrong points.
"""
from __future__ import annotations

from einsum_ir.graph import CascadeGraph, cascade_graph
from einsum_ir.ir import Access, Cascade, Einsum, Index, chain, index_vars, product_terms, substitute
from einsum_ir.lowering.exprs import product, replace_accesses, summation, tensors_read
from einsum_ir.validate import PresenceAnalysis


def _reduction_over(c: Cascade, graph: CascadeGraph, ranks: set[str]) -> set[str]:
    """Tensors that are (transitively) computed from a reduction over any of `ranks` (index vars)
    and do not themselves carry those indices."""
    out = set()
    reducers = [e.name for e in c.einsums if set(e.reduced) & ranks]
    for r in reducers:
        for t in {r} | graph.descendants[r]:
            writers = c.writers(t)
            if writers and not (set(writers[-1].lhs_vars) & ranks):
                out.add(t)
    return out


def _is_plain_map(e: Einsum) -> bool:
    return not e.reduced and e.recurrence_var is None and all(isinstance(i, Index) for i in e.target.indices)


def _inline(c: Cascade, graph: CascadeGraph, expr, barrier: set[str], ranks: set[str], where: list):
    """Inline maps over `ranks` that (transitively) read a barrier tensor. A map's predicate
    joins `where` (as read): the sum then runs over the points where the map is present."""

    def reads_barrier(name: str) -> bool:
        return bool((graph.ancestors[name] | {name}) & barrier)

    def fn(a: Access):
        writers = c.writers(a.tensor)
        if not writers:
            return a
        w = writers[-1]
        if _is_plain_map(w) and set(w.lhs_vars) & ranks and reads_barrier(a.tensor) and a.tensor not in barrier:
            mapping = {i.name: idx for i, idx in zip(w.target.indices, a.indices)}
            inner: list = []
            body = _inline(c, graph, substitute(w.expr, mapping), barrier, ranks, inner)
            if _has_outer(body, barrier, ranks):
                where.extend(inner + ([substitute(w.where, mapping)] if w.where is not None else []))
                return body
        return a

    return replace_accesses(expr, fn)


def _has_outer(expr, barrier: set[str], ranks: set[str]) -> bool:
    return any(not (set(index_vars(f)) & ranks) and set(tensors_read(f)) & barrier
               for _, factors in product_terms(expr, distribute=True) for _, f in factors)


def _fresh(c: Cascade, base: str, taken: set[str]) -> str:
    names = set(c.tensors) | taken
    name, k = base, 1
    while name in names:
        k += 1
        name = f"{base}{k}"
    taken.add(name)
    return name


def defer_division(c: Cascade, graph: CascadeGraph | None = None) -> Cascade:
    """Move factors that read full reductions over a contraction's summed ranks out of the sum."""
    graph = graph or cascade_graph(c)
    new: list[Einsum] = []
    taken: set[str] = set()
    changed = False
    presence = PresenceAnalysis(c, list(graph.order))
    for e in c.einsums:
        ranks = set(e.reduced)
        if e.reduce != "sum" or not ranks or e.recurrence_var is not None:
            new.append(e)
            continue
        barrier = _reduction_over(c, graph, ranks)
        predicates = [] if e.where is None else [e.where]
        expr = _inline(c, graph, e.expr, barrier, ranks, predicates)
        terms = product_terms(expr, distribute=True)
        split = []
        for sign, factors in terms:
            outer = [f for f in factors if not (set(index_vars(f[1])) & ranks)
                     and set(tensors_read(f[1])) & barrier]
            inner = [f for f in factors if f not in outer]
            split.append((sign, outer, inner))
        if not any(outer for _, outer, _ in split):
            new.append(e)
            continue
        if not _split_is_exact(c, split, ranks, presence):
            new.append(e)  # left whole: the plan refuses it, where a split would miscount
            continue
        changed = True
        lhs = e.target
        parts = []
        for k, (sign, outer, inner) in enumerate(split):
            num = _fresh(c, f"{e.name}_num" if len(split) == 1 else f"{e.name}_num{k}", taken)
            num_access = Access(num, lhs.indices)
            new.append(Einsum(num_access, product(inner), "sum", chain("and", predicates) if predicates else None))
            parts.append(product(outer + [(False, num_access)], sign))
        new.append(Einsum(lhs, summation(parts), "sum", None))
    if not changed:
        return c
    return prune(c.replace(einsums=tuple(new)))


def _split_is_exact(c: Cascade, split: list, ranks: set[str], presence: PresenceAnalysis) -> bool:
    """Whether each numerator sums over the original sum's points: every term's inner part
    varies along every summed rank (a term constant along m counts its points, which
    `Z_num = sum_m 1` would not), and with several terms, all are present at the same points
    (the original sums where all of them are; each numerator only where its own term is)."""
    if any(not ranks <= {v for _, f in inner for v in index_vars(f)} for _, _, inner in split):
        return False
    return len({presence.of(product(outer + inner)) for _, outer, inner in split}) == 1


def prune(c: Cascade) -> Cascade:
    """Drop Einsums whose results are neither outputs nor read."""
    while True:
        read = {t for e in c.einsums for t in tensors_read(e.expr) + tensors_read(e.where)}
        keep = tuple(e for e in c.einsums if e.name in read or e.name in c.output_names)
        if len(keep) == len(c.einsums):
            return c
        c = c.replace(einsums=keep)
