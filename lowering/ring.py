"""The ring's cascade: attention between one query chunk and one key chunk of a sharded sequence.

A rank of a context-parallel ring holds chunks of the queries and, one step at a time, chunks of
the keys (cost_model/ring.py: layouts, tensor sides). Its kernels see local tensors, indexed
from 0, while the cascade's positions are global: a mask `m <= p`, ALiBi's `p - m`, a derived
param over the key length `log(M)`. So the ring runs a *shifted* cascade, derived from the
user's: every position read as a value (`p`, `m` outside a plain subscript) becomes
`p + q_offset` / `m + k_offset`, and every extent of the two sequence ranks read as a value
becomes the runtime totals `P_total` / `M_total`; a plain subscript `Q[b,h,p,e]` stays local.
A tensor read at an expression of a position (`Sel[b,h,p//BS,m//BS]`) is replicated and is read
at the global position.

Each (query chunk, key chunk) pair then gives a partial state of the shifted cascade
(lowering/merge.py), and the states of one query chunk merge exactly across the ring's steps.
A pair whose chunks the mask leaves empty is skipped by the same key ranges that skip tiles
(`visits`). `derive` declines, with the reason, what a ring cannot shard.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import sympy

from einsum_ir.cost_model.ring import Side, sides
from einsum_ir.errors import LoweringError, located
from einsum_ir.ir import Access, Binary, Cascade, Einsum, Expr, Index, Name, Param, index_vars, rank_of, rebuild
from einsum_ir.lowering.grad import FreshNames
from einsum_ir.lowering.keyranges import KeyLoop
from einsum_ir.lowering.groups import no_key_ranges
from einsum_ir.lowering.merge import Merge, derive as derive_merge
from einsum_ir.lowering.strategy import key_loop_plan
from einsum_ir.lowering.symbolic import evaluate, query_hi, query_lo


@dataclass(frozen=True)
class Ring:
    cascade: Cascade
    shifted: Cascade  # positions global: q -> q + query_offset, k -> k + key_offset, extents -> totals
    merge: Merge  # partial states of the shifted cascade
    query: str  # the sharded query index (p) and key index (m)
    key: str
    query_offset: str  # runtime int params of the shifted cascade
    key_offset: str
    query_total: str
    key_total: str
    sides: Mapping[str, Side]  # input -> how it is sharded
    output_axes: Mapping[str, int]  # output -> its query axis
    loop: KeyLoop  # the forward's key ranges, over global positions
    query_vars: tuple[str, ...]  # every query index of the key loop (GQA's r and p)


def derive(c: Cascade, query: str | None = None) -> Ring:
    """The ring cascade of `c`, sharding the query index `query` (default: the key loop's only
    query index, or the one the mask compares with the keys) and the key loop's key index."""
    plan = key_loop_plan(c)
    if len(plan.stages) != 1:
        raise LoweringError(f"the forward runs {len(plan.stages)} stages; a ring merges one key loop's states")
    (stage,) = plan.stages
    why = no_key_ranges(plan.cascade, stage.grouped)
    if why is not None:  # a key shard is a key range
        raise LoweringError(why)
    if len(stage.stream) != 1:
        raise LoweringError(f"the keys span {len(stage.stream)} ranks ({', '.join(stage.stream)}); a ring shards "
                            f"one key rank")
    (k,) = stage.stream
    q = _query(stage, k, query)
    if rank_of(q) == rank_of(k):
        raise LoweringError(f"{q} and {k} range over one rank {rank_of(q)}; declare the keys over their own "
                            f"rank (K[b,h,m,e] over M)")
    if c.splits or c.inits:
        raise LoweringError("split ranks and recurrences are not sharded by a ring")
    for e in c.einsums:
        if q in e.reduced:
            raise LoweringError(located(e, f"{e.name} sums over the query index {q}: a ring rank holds one shard of "
                                       f"the queries, so it would see part of that sum"))
    output_axes = {}
    for o in c.outputs:
        idx = [i.name if isinstance(i, Index) else None for i in c.einsum(o.name).target.indices]
        if q not in idx:
            raise LoweringError(f"output {o.name} has no query index {q}: it cannot be cut into query shards")
        output_axes[o.name] = idx.index(q)
    names = FreshNames(list(c.tensors) + list(c.dims) + [p.name for p in c.params])
    q_off, k_off = names("q_offset"), names("k_offset")
    q_total, k_total = names(f"{rank_of(q)}_total"), names(f"{rank_of(k)}_total")
    shifted = _shift(c, {q: q_off, k: k_off}, {rank_of(q): q_total, rank_of(k): k_total})
    shifted = shifted.replace(params=tuple(Param(n, type="int") for n in (q_off, k_off, q_total, k_total))
                              + shifted.params, doc="")
    return Ring(c, shifted, derive_merge(shifted), q, k, q_off, k_off, q_total, k_total, sides(c, q, k),
                output_axes, stage.loop, stage.query)


def _query(stage, k: str, query: str | None) -> str:
    if query is not None:
        if query not in stage.query:
            raise LoweringError(f"{query} is not a query index of the key loop ({', '.join(stage.query)})")
        return query
    if len(stage.query) == 1:
        return stage.query[0]
    compared = [v for v in stage.query if stage.predicate is not None and v in index_vars(stage.predicate)]
    if len(compared) == 1:
        return compared[0]
    raise LoweringError(f"the queries span {', '.join(stage.query)}: name the sequence index, "
                        f"e.g. context_parallel(c, query={stage.query[-1]!r})")


def _shift(c: Cascade, offsets: dict[str, str], totals: dict[str, str]) -> Cascade:
    """`c` with positions read as values made global (see the module docstring)."""
    def value(node: Expr) -> Expr | None:
        if isinstance(node, Access):
            return Access(node.tensor, tuple(i if isinstance(i, Index) and i.name in offsets else rebuild(i, value)
                                             for i in node.indices), node.loc)
        if isinstance(node, Index) and node.name in offsets:
            return Binary("+", node, Name(offsets[node.name]))
        if isinstance(node, Name) and node.name in totals:
            return Name(totals[node.name])
        return None

    einsums = tuple(Einsum(e.target, rebuild(e.expr, value), e.reduce, e.where and rebuild(e.where, value), e.loc)
                    for e in c.einsums)
    params = tuple(Param(p.name, rebuild(p.expr, value), p.type, p.loc) if p.expr is not None else p
                   for p in c.params)
    return c.replace(einsums=einsums, params=params)


def visits(ring: Ring, q_span: tuple[int, int], k_span: tuple[int, int], scalars: Mapping[str, int]) -> bool:
    """Whether queries q_span[0] <= q < q_span[1] see any key in k_span (global positions) under
    the mask, by the key loop's ranges; `scalars` binds dims (global extents) and runtime params.
    True when the ranges cannot be evaluated: the step then runs and its kernel skips tiles."""
    if q_span[0] >= q_span[1] or k_span[0] >= k_span[1]:
        return False
    env = {}
    for v in ring.query_vars:
        lo, hi = q_span if v == ring.query else (0, int(scalars[rank_of(v)]))
        env[query_lo(v)], env[query_hi(v)] = sympy.Integer(lo), sympy.Integer(hi - 1)
    try:
        values = evaluate(ring.loop.key_defs, env, lambda s: scalars[s.name])
        bounds = [(int(lo.xreplace(values)), int(hi.xreplace(values)))
                  for seg in ring.loop.key_segments for lo, hi in [seg.extent(ring.key)]]
    except (KeyError, TypeError, ValueError):
        return True
    return any(max(lo, k_span[0]) < min(hi, k_span[1]) for lo, hi in bounds)

