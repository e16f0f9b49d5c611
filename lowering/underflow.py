"""Normalized weights scaled row by row, so that a row of tiny weights does not underflow.

A positive map with an exponential tail, f(x) = e^x (1 + O(e^x)) as x -> -inf (softplus,
sigmoid), is 0 in fp32 below about x = -104 (-745 in fp64). When every weight of a row is that
small, a normalization `sum_m f(x) V / sum_m f(x)` computes 0/0, though its value is finite (in
that limit it is softmax of x). Softmax avoids it by subtracting the row's max; f cannot, since
f(x - G) is not a multiple of f(x). What can be done for any f is a factor per row:

    G[p]    = max[m] x[p,m]
    A[p,m]  = f_scaled(x[p,m], max(-G[p], 0))          # e^max(-G, 0) * f(x), the registry's `scaled`

The rewrite is exact: the outputs read the weights only through sums that a factor per row
leaves unchanged (checked symbolically, `lowering.grad.scale_invariant`: `O = AV / AD`). The
factor is 1 in every row whose largest argument is >= 0 (nothing changes where nothing
underflows: for a large positive x, softplus grows like x, and scaling it down by e^-G would
underflow instead), and otherwise it lifts the row's largest weight to e^-G f(G), in [ln 2, 1]
for softplus. The scaled function forms neither e^s nor f(x) (they over- and underflow), so the
weights of a row at -1e4 come out as softmax's. In the kernel G is a running max; sympy derives
the sums' rescale factor `exp(max(-G_new, 0) - max(-G_old, 0))` from the scaled function's
algebra like any other (lowering.online), and ei.grad proves the outputs invariant under G, so
G gets no gradient (lowering.grad.shift_invariant).
"""
from __future__ import annotations

from einsum_ir.functions import FUNCTIONS
from einsum_ir.graph import CascadeGraph
from einsum_ir.ir import Access, Binary, Call, Cascade, Einsum, Index, Num, Unary, index_vars
from einsum_ir.lowering.grad import FreshNames, scale_invariant


def scale_rows(c: Cascade, graph: CascadeGraph) -> Cascade:
    """`c` with every normalized map of a function that has a scaled form scaled per row (see the
    module doc); `c` itself when there is none."""
    names = FreshNames(list(c.tensors) + list(c.dims) + [p.name for p in c.params])
    out: list[Einsum] = []
    changed = False
    for e in c.einsums:
        rows = _normalized_rows(c, graph, e)
        if rows is None:
            out.append(e)
            continue
        changed = True
        (arg,) = e.expr.args
        if not isinstance(arg, Access):  # the argument once, for the max and the weights
            x = Access(names("X" + e.name), e.target.indices)
            out.append(Einsum(x, arg, loc=e.loc))
            arg = x
        g = Access(names("G" + e.name), tuple(Index(v) for v in rows))
        out.append(Einsum(g, arg, "max", _common_where(c, graph, e), e.loc))
        scale = Call("max", (Unary("-", g), Num(0.0)))
        out.append(Einsum(e.target, Call(FUNCTIONS[e.expr.fn].scaled, (arg, scale)), e.reduce, e.where, e.loc))
    return c.replace(einsums=tuple(out)) if changed else c


def _normalized_rows(c: Cascade, graph: CascadeGraph, e: Einsum) -> tuple[str, ...] | None:
    """The index variables of `e`'s rows when `e` is a map f(x) of a function with a scaled form
    whose readers all sum it over the same other ranks and whose outputs are unchanged by a
    factor per row; else None."""
    if (e.reduced or e.recurrence_var is not None or e.name in c.output_names
            or not isinstance(e.expr, Call) or len(e.expr.args) != 1
            or FUNCTIONS.get(e.expr.fn) is None or FUNCTIONS[e.expr.fn].scaled is None
            or not all(isinstance(i, Index) for i in e.target.indices)):
        return None
    readers = [c.einsum(r) for r in graph.readers.get(e.name, ())]
    summed = {frozenset(r.reduced) & frozenset(e.lhs_vars) for r in readers}
    if not readers or any(r.reduce != "sum" for r in readers) or len(summed) != 1 or not next(iter(summed)):
        return None
    rows = tuple(v for v in e.lhs_vars if v not in next(iter(summed)))
    return rows if scale_invariant(c, e.name, rows) else None


def _common_where(c: Cascade, graph: CascadeGraph, e: Einsum):
    """Where the weights are summed: their own predicate and the one all their readers share, so
    that the max is over exactly the points the sums see."""
    wheres = {c.einsum(r).where for r in graph.readers[e.name]}
    shared = wheres.pop() if len(wheres) == 1 else None
    if shared is not None and not set(index_vars(shared)) <= set(e.lhs_vars):
        shared = None  # it reads a feature index: the weights' own presence bounds the max
    parts = [w for w in (e.where, shared) if w is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else Binary("and", parts[0], parts[1])
