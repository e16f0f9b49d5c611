"""Tile policy: the tiles, warps and stages a stage launches with, from a config and extents.

A `Config` (codegen.dispatch) fixes the query and key tile sizes, warps and pipeline stages.
`stage_tiles` derives every other constexpr of a stage from it: feature blocks (whole head
dims, padded to a power of two) and, for a tile axis over several ranks, per-rank boxes.
"""
from __future__ import annotations

import math

from einsum_ir.codegen import dispatch
from einsum_ir.codegen.dispatch import INTERPRETER_CONFIG, Config
from einsum_ir.errors import LoweringError
from einsum_ir.ir import Name, index_vars, rank_of
from einsum_ir.lowering.plan import Stage, page_flag


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _box(total: int, ranks, extents: dict, prefix: str, square: set) -> dict:
    """Split a power-of-two tile over several ranks (last rank fastest). Ranks outside any
    predicate (GQA's R) are packed whole first; predicate ranks (2-D neighborhoods) share
    the rest as a square-ish box."""
    if len(ranks) == 1:
        return {}
    bits = total.bit_length() - 1
    cap = {v: max(0, next_pow2(extents[rank_of(v)]).bit_length() - 1) for v in ranks}
    out, left = {}, bits
    free = [v for v in ranks if v not in square]
    boxed = dispatch.boxed_ranks(ranks, square)
    for v in free:
        if v in boxed:
            continue
        b = min(cap[v], max(0, left - 4))  # keep at least 16 rows for the other ranks
        out[v] = b
        left -= b
    for i, v in enumerate(boxed):
        if i == len(boxed) - 1:
            b = left
        else:
            b = min(cap[v], -(-left // (len(boxed) - i)))
        out[v] = b
        left -= b
    return {f"{prefix}_{v}": 1 << out[v] for v in ranks}


def default_config(stages: list[Stage], extents: dict, device: str = "cpu") -> Config:
    """The launch config without tuning: the interpreter's small tiles on "cpu", else 128x64
    tiles, 8 warps and 2 stages (64x32, 4 warps past head dim 128)."""
    if device == "cpu":
        return INTERPRETER_CONFIG
    widest = max((max(16, next_pow2(extents[rank_of(f)])) for s in stages for f in s.features),
                 default=16)
    if widest <= 128:
        return Config(128, 64, 8, 2)
    return Config(64, 32, 4, 2)


def stage_tiles(stage: Stage, extents: dict, config: Config) -> dict:
    """Every constexpr and launch option of one stage: the config's tiles, feature blocks
    (whole head dims, padded to a power of two) and per-rank boxes for multi-rank tile axes.
    Pass bucket extents: then the result, and so the binary, is the same for the whole bucket."""
    feats = {f: max(16, next_pow2(extents[rank_of(f)])) for f in stage.features}
    tiles = {**config.as_dict(), **{f"BLOCK_{f.upper()}": b for f, b in feats.items()}}
    in_pred = set(index_vars(stage.predicate)) if stage.predicate is not None else set()
    tiles.update(_box(config.BLOCK_Q, stage.query, extents, "BLOCK_Q", in_pred))
    tiles.update(_box(config.BLOCK_S, stage.stream, extents, "BLOCK_S", in_pred))
    # a page size is not a token rank, so it is exact in the bucket (a param's is unknown here);
    # the in-page loads clamp page ids into their tables, which an empty table has no room for
    nonempty = min(extents.values(), default=1) > 0
    tiles.update({page_flag(d): int(nonempty and d in extents and extents[d] % config.BLOCK_S == 0)
                  for d in stage.page_sizes})
    return tiles


def group_tiles(stage: Stage, values: dict, block_s: int) -> dict:
    """GROUP (keys per group) and BLOCK_G (groups per key tile) of a stage with grouped
    reductions (lowering.groups), from the call's group size; {} without. A key tile starts at a
    multiple of BLOCK_S, so it holds whole groups when the size divides it; Triton reshapes the
    tile into (groups, keys of a group), which needs a power of two."""
    g = stage.grouping
    if g is None:
        return {}
    size = int(values[g.size.name]) if isinstance(g.size, Name) else int(g.size.value)
    if size < 1 or size & (size - 1) or block_s % size:
        raise LoweringError(f"{g.describe()}: a Triton key tile of {block_s} keys holds whole groups of a power of "
                            f"two that divides it, and this call groups {size} keys; use backend 'cpu' (any "
                            f"group size) or a group size of a power of two up to {block_s}")
    return {"GROUP": size, "BLOCK_G": block_s // size}


def choose_tiles(stage: Stage, extents: dict, device: str = "cpu") -> dict:
    """`stage_tiles` under the untuned default config."""
    return stage_tiles(stage, extents, default_config([stage], extents, device))


def query_tiles(stage, extents: dict, tiles: dict) -> int:
    if len(stage.query) == 1:
        return -(-extents[rank_of(stage.query[0])] // tiles["BLOCK_Q"])
    return math.prod(-(-extents[rank_of(v)] // tiles[f"BLOCK_Q_{v}"]) for v in stage.query)


def launch_options(tiles: dict) -> dict:
    """Triton's compile options for a stage: warps, pipeline stages, and FMA fusion asked for
    explicitly (the score scale and the max subtraction fuse into one FMA; Triton's default
    for it is about to change)."""
    return {"num_warps": tiles["num_warps"], "num_stages": tiles["num_stages"], "enable_fp_fusion": True}
