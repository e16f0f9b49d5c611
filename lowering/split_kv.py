"""Split-KV decode: the keys cut into splits, one partial state per split, then a combine.

For a short query (decode: P of 1 to 16) the ordinary grid, (query tiles) x (batch, heads), has
too few programs to fill a GPU. Split-KV also splits the key range: split s holds keys
[s*KS, min(s*KS + KS, M)), each program computes one split's partial state, and a combine
merges the states per row by the merge rules and runs the finish (lowering/merge.py).

Nothing here is templated. `derive_split(c)` takes the merge's *partial* cascade (the carried
reductions restricted to `key_lo <= m < key_hi`, returning the carried values and the count)
and gives every Einsum inside its key loop (each one over the key rank, and each one reading
such a value) a split index `s` over a new rank, first in its target, with the key range
written `s*KS <= m and m < s*KS + KS`: the split count is that rank's extent and KS (keys per
split) a runtime param. A score `S[s,b,h,p,m]` whose operands lack s keeps s as a remaining rank,
so stream_keys puts it in the grid, and `s*KS <= m` reads a grid index: a per-program value of
the bounds (lowering/keyranges.py), so each program loops over its own split's key tiles. The
result is an ordinary cascade that every backend lowers; its outputs are the carried values and
the count stacked over the splits, which `Merge.rules` combine (codegen/combine.py).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from einsum_ir.cost_model.split_choice import SplitChoice, choose_splits
from einsum_ir.errors import LoweringError
from einsum_ir.ir import Access, Binary, Cascade, Expr, Index, Name, Param, conjuncts, rank_of, rebuild
from einsum_ir.lowering.exprs import tensors_read
from einsum_ir.lowering.grad import FreshNames
from einsum_ir.lowering.merge import Merge, derive
from einsum_ir.lowering.strategy import key_loop_plan


@dataclass(frozen=True)
class SplitKV:
    merge: Merge
    cascade: Cascade  # the partial cascade over splits: outputs the carried values and count over (s, rows...)
    split: str  # the split index variable (first index of every output)
    splits: str  # its rank: the number of splits, a dim bound per call
    keys_per_split: str  # KS, a runtime int param
    key_rank: str  # the rank the splits cut (M)


def derive_split(c: Cascade) -> SplitKV:
    """The split-KV partial cascade of `c` (LoweringError, from `derive`, when `c` has no
    partial states)."""
    m = _one_key_rank(derive(c))
    p = m.partial
    (k,) = m.keys
    taken = list(p.tensors) + list(p.dims) + [x.name for x in p.params] + [v for e in p.einsums for v in e.space]
    names = FreshNames(taken + [t.lower() for t in taken] + [t.upper() for t in taken])
    rank = names("SK")  # the splits of the keys; its index is the lower-case name, fresh too
    s, ks = rank.lower(), names("KS")
    start = Binary("*", Index(s), Name(ks))
    bounds = {m.key_lo: start, m.key_hi: Binary("+", start, Name(ks))}
    in_split = Binary("and", Binary(">=", Index(k), start), Binary("<", Index(k), bounds[m.key_hi]))

    def split_range(node: Expr) -> Expr | None:
        return bounds.get(node.name) if isinstance(node, Name) else None

    over: set[str] = set()  # the Einsums that get the split index
    einsums = []
    for e in p.einsums:
        reads = set(tensors_read(e.expr)) | set(tensors_read(e.where))
        if k not in e.space and not reads & over:
            einsums.append(e)  # before the key loop: one value for every split
            continue
        over.add(e.name)

        def add_split(node: Expr) -> Expr | None:
            if isinstance(node, Access) and node.tensor in over:
                return Access(node.tensor, (Index(s),) + tuple(rebuild(i, add_split) for i in node.indices), node.loc)
            return None

        where = rebuild(e.where, split_range) if e.where is not None else None
        if k in e.space and not reads & over and not set(conjuncts(in_split)) <= set(conjuncts(where)):
            # a value over the keys read from no split's value (a score from Q and K) is split
            # s's at its keys only: the range puts s in its space
            where = in_split if where is None else Binary("and", where, in_split)
        target = Access(e.target.tensor, (Index(s),) + e.target.indices, e.target.loc)
        einsums.append(replace(e, target=target, expr=rebuild(e.expr, add_split),
                               where=rebuild(where, add_split) if where is not None else None))
    params = tuple(x for x in p.params if x.name not in (m.key_lo, m.key_hi)) + (Param(ks, type="int"),)
    split = p.replace(dims=(rank,) + p.dims, einsums=tuple(einsums), params=params, doc="")
    return SplitKV(m, split, s, rank, ks, rank_of(k))


def split_choice(c: Cascade, shapes: Mapping[str, int], device: str = "h100", dtype: str = "bf16") -> SplitChoice:
    """The cost model's split count for `c` at `shapes` on `device` (cost_model/split_choice.py),
    from the key loop's grid, query and key ranks and the states the merge keeps; a key's bytes
    are taken as one element per feature rank of the loop (E + F: its key and value rows, however
    they are stored, a paged cache too). LoweringError when `c` has no partial states."""
    m = _one_key_rank(derive(c))
    plan = key_loop_plan(c)
    stage = plan.stages[m.stage]
    ext = {r: int(shapes[r]) for r in plan.cascade.dims if r in shapes}
    grid = math.prod(ext[rank_of(v)] for v in stage.grid)
    queries = math.prod(ext[rank_of(v)] for v in stage.query)
    keys = ext[rank_of(stage.stream[0])]
    # per grid point: every carried value over the query rows and features, and the count
    state = sum(math.prod(ext[rank_of(v)] for v in r.indices if v not in stage.grid) for r in m.rules) + queries
    width = {"fp32": 4, "fp64": 8}.get(dtype, 2)
    kv = keys * sum(ext[rank_of(f)] for f in stage.features) * width
    return choose_splits(grid, queries, keys, 4 * state, kv, device)


def _one_key_rank(m: Merge) -> Merge:
    """`m`, when its keys are one rank of a key loop: what split-KV cuts."""
    if m.stage is None:
        raise LoweringError("split-KV splits the keys of a key loop, and this cascade has none (the chunked scan "
                            "runs it); its states over key ranges are kern.partial's, merged by ei.merge")
    if len(m.keys) != 1:
        raise LoweringError(f"the keys span {len(m.keys)} ranks ({', '.join(m.keys)}); split-KV cuts one key rank")
    return m
