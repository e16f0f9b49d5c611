"""Autotuning of launch configs: candidates, pruning without a GPU, timing on one.

1. `candidates()`: BLOCK_Q x BLOCK_S x num_warps x num_stages.
2. `prune()` (pure): per candidate, the shared memory and registers it needs (estimates from the
   plan's tiles) against the device table, spills measured ahead of time when given, and an
   estimated time (roofline over the padded tiles, divided by the wave efficiency the
   occupancy allows). Candidates over a limit are dropped with the reason; the rest are ranked
   by estimated time and the best `top_k` survive.
3. `pruned_best()`: the best survivor whose AOT compile (codegen.aot, cached) does not spill.
4. On a GPU, `choose()` times the survivors on the call's own tensors (CUDA events) and stores
   the winner in the on-disk cache (kind "choice"), keyed by cascade, device, dtype and bucket.

Split-KV (several CTAs per query tile for short queries) is not generated: the emitter has no
cross-CTA combine of partial softmax states yet (see docs/runtime.md).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from einsum_ir.codegen import cache
from einsum_ir.codegen.dispatch import Config, DispatchKey
from einsum_ir.cost_model.devices import Device, get
from einsum_ir.ir import Access, Index, accesses, rank_of

BLOCK_Q = (64, 128)
BLOCK_S = (32, 64, 128)
WARPS = (4, 8)
STAGES = (2, 3, 4)
TOP_K = 4
SMALLEST = Config(min(BLOCK_Q), min(BLOCK_S), min(WARPS), min(STAGES))
MAX_REGISTERS = 255  # per thread: more spills to local memory
MAX_WARPS_PER_SM = 64  # sm_80 / sm_90
# per-CTA shared memory the hardware can give one block (the rest of the SM's is reserved)
SMEM_RESERVED = 1024
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
VECTOR_OPS_PER_SCORE = 4
BASE_REGISTERS = 40  # indices, pointers, loop state: a rough allowance


@dataclass(frozen=True)
class Verdict:
    """One candidate's estimates and fate: `reason` is None for a survivor."""

    config: Config
    shared_bytes: int
    registers: int  # estimate, or AOT-measured when known
    est_us: float  # estimated kernel time; lower is better
    reason: str | None = None
    measured: bool = False  # registers / spills from an AOT compile


def candidates() -> list[Config]:
    """Every config to consider, in a fixed order."""
    return [Config(q, s, w, st) for q, s, w, st in itertools.product(BLOCK_Q, BLOCK_S, WARPS, STAGES)]


def _blocks(stage, extents: dict, config: Config) -> dict[str, int]:
    """Tile extent per rank name: query/stream ranks share their axis tile, features whole."""
    from einsum_ir.codegen.tiles import stage_tiles

    tiles = stage_tiles(stage, extents, config)
    out = {rank_of(f): tiles[f"BLOCK_{f.upper()}"] for f in stage.features}
    for axis, ranks in (("Q", stage.query), ("S", stage.stream)):
        for v in ranks:
            out[rank_of(v)] = tiles.get(f"BLOCK_{axis}_{v}", tiles[f"BLOCK_{axis}"])
    return out


def _reads(stage) -> list[tuple[str, Access]]:
    """Each tensor the stage loads, with one access of it (the first)."""
    out: dict[str, Access] = {}
    for e in stage.einsums:
        for a in accesses(e.expr) + accesses(e.where):
            if a.tensor in stage.loads:
                out.setdefault(a.tensor, a)
    return list(out.items())


def _stage_needs(plan, stage, extents: dict, config: Config, dtype: str) -> dict:
    """Shared bytes, registers/thread, padded work and traffic of one stage under `config`."""
    c = plan.cascade
    blocks = _blocks(stage, extents, config)
    qranks = {rank_of(v) for v in stage.query}
    sranks = {rank_of(v) for v in stage.stream}
    inputs = set(c.input_names)
    operand_bytes = tile_bytes = query_bytes = scratch = 0
    score_tile = config.BLOCK_Q * config.BLOCK_S * 4
    for t, access in _reads(stage):
        ranks = c.tensors[t].ranks
        elems = math.prod(blocks.get(r, 1) for r in ranks)
        size = elems * (DTYPE_BYTES.get(dtype, 2) if t in inputs else 4)
        if not all(isinstance(i, Index) for i in access.indices):
            scratch += score_tile  # a gathered tile is not pipelined; its layout change needs room
        elif sranks & set(ranks) and qranks & set(ranks):
            tile_bytes += size  # an elementwise [query, key] tile (a bias)
        elif sranks & set(ranks):
            operand_bytes += size  # a key-side matrix operand (K, V)
        elif qranks & set(ranks):
            query_bytes += size
    # Triton's pipeliner keeps num_stages copies of each matrix operand loaded in the key loop and
    # num_stages - 1 of each other tile (measured against the compiled metadata: tests/test_dispatch)
    shared = config.num_stages * operand_bytes + (config.num_stages - 1) * tile_bytes + query_bytes + scratch
    acc = 0
    for e in stage.einsums:
        if stage.kind(e.name) == "carried":
            acc += math.prod(blocks.get(rank_of(v), 1) for v in e.lhs_vars if rank_of(v) not in
                             {rank_of(g) for g in stage.grid})
    # carried accumulators plus the fp32 score tile and its probabilities, spread over threads
    regs = BASE_REGISTERS + (acc + 2 * config.BLOCK_Q * config.BLOCK_S) // (32 * config.num_warps)
    nq = math.prod(-(-extents[rank_of(v)] // blocks[rank_of(v)]) for v in stage.query)
    ns = math.prod(-(-extents[rank_of(v)] // blocks[rank_of(v)]) for v in stage.stream)
    grid = math.prod(extents[rank_of(v)] for v in stage.grid)
    feat = sum(blocks[rank_of(f)] for f in stage.features)
    return {"shared": shared, "regs": regs, "ctas": nq * grid,
            "flops": 2 * nq * ns * grid * config.BLOCK_Q * config.BLOCK_S * max(feat, 16),
            "exps": nq * ns * grid * config.BLOCK_Q * config.BLOCK_S,
            # per key tile: a few ALU ops per score (scale, mask, max, subtract) and the
            # rescale of every accumulator, which is why long key tiles pay off
            "vector": nq * ns * grid * (VECTOR_OPS_PER_SCORE * config.BLOCK_Q * config.BLOCK_S + acc),
            "bytes": grid * nq * (ns * (operand_bytes + tile_bytes) + query_bytes)}


def estimate(plan, extents: dict, config: Config, device: Device, dtype: str = "bf16",
             usage: dict | None = None) -> Verdict:
    """A config's shared memory, registers and estimated time on `device`; `reason` says why
    it cannot run well there (None if it can). `usage` (AOT: registers, spills, shared_bytes)
    replaces the estimates when given."""
    needs = [_stage_needs(plan, s, extents, config, dtype) for s in plan.stages]
    shared = max(n["shared"] for n in needs)
    regs = max(n["regs"] for n in needs)
    if usage is not None:
        shared, regs = max(shared, usage["shared_bytes"]), usage["registers"]
    limit = device.smem_per_sm - SMEM_RESERVED
    reason = None
    if usage is not None and usage["spills"]:
        reason = f"spills {usage['spills']} B (AOT)"
    elif shared > limit:
        reason = f"shared memory {shared // 1024} KiB > {limit // 1024} KiB"
    elif regs > MAX_REGISTERS:
        reason = f"~{regs} registers/thread > {MAX_REGISTERS}"
    threads = 32 * config.num_warps
    per_sm = min(limit // max(shared, 1), device.registers_per_sm // (min(regs, MAX_REGISTERS) * threads),
                 MAX_WARPS_PER_SM // config.num_warps)
    per_sm = max(per_sm, 1)
    total = 0.0
    for n in needs:
        # roofline over the padded tiles: tensor cores (a warpgroup wants >= 64 rows of its
        # own), exp and ALU work, memory; then idle SMs in the last wave and unhidden latency
        rows = config.BLOCK_Q / max(1, config.num_warps // 4)
        mma = device.tensor_rate(dtype) * min(1.0, rows / 64)
        t = max(n["flops"] / mma, n["exps"] / device.sfu_ops + n["vector"] / device.vector_ops,
                n["bytes"] / device.hbm_bandwidth)
        slots = device.sms * per_sm
        waves = -(-n["ctas"] // slots)
        t /= n["ctas"] / (waves * slots)
        t *= 1 + 0.25 / ((config.num_stages - 1) * per_sm)
        total += t
    return Verdict(config, shared, regs, total * 1e6, reason, usage is not None)


def prune(plan, extents: dict, device: str | Device, dtype: str = "bf16",
          configs: list[Config] | None = None, top_k: int = TOP_K,
          usage: dict[Config, dict] | None = None) -> list[Verdict]:
    """Every candidate with its verdict, survivors first (fastest estimate first). Pure: no
    compile, no GPU; `usage` maps configs to AOT facts already measured."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k {top_k!r}: keep at least one candidate (a positive integer)")
    dev = get(device)
    usage = usage or {}
    verdicts = [estimate(plan, extents, cfg, dev, dtype, usage.get(cfg))
                for cfg in (configs or candidates())]
    ok = sorted((v for v in verdicts if v.reason is None), key=lambda v: v.est_us)
    out = ok[:top_k]
    out += [Verdict(v.config, v.shared_bytes, v.registers, v.est_us,
                    f"not in the top {top_k} estimates", v.measured) for v in ok[top_k:]]
    return out + sorted((v for v in verdicts if v.reason is not None), key=lambda v: v.est_us)


def survivors(verdicts: list[Verdict]) -> list[Config]:
    return [v.config for v in verdicts if v.reason is None]


def target_of(device: str | Device) -> str:
    """The AOT target of a device-table entry (compute capability from its documentation)."""
    key = get(device).key
    return {"a100": "sm_80", "l4": "sm_89", "rtx4090": "sm_89", "b200": "sm_100"}.get(key, "sm_90")


def pruned_best(kern, extents: dict, device: str | Device = "h100", dtype: str = "bf16",
                aot: bool = True, top_k: int = TOP_K) -> Config:
    """The config pruning picks with no GPU timing: the best estimate among the survivors; with
    `aot`, the first of them (in estimate order) that compiles for the device without spills
    (each compile is cached on disk, kind "aot")."""
    verdicts = prune(kern.plan, extents, device, dtype, top_k=top_k)
    best = survivors(verdicts)
    if not best:
        raise ValueError(f"no candidate config fits {get(device).key}: {verdicts[0].reason}")
    if not aot:
        return best[0]
    from einsum_ir.codegen.aot import resource_usage

    for cfg in best:
        if resource_usage(kern, extents, dtype, target_of(device), config=cfg)["spills"] == 0:
            return cfg
    return best[0]


def time_configs(run: Callable[[Config], object], configs: list[Config], reps: int = 5
                 ) -> dict[Config, float]:
    """Median milliseconds of `run(config)` per config on the current CUDA device; a config
    that fails to compile or launch gets inf (if all fail, the first error is raised). The
    first call compiles and is not timed."""
    import torch

    out, first_error = {}, None
    for cfg in configs:
        try:
            run(cfg)
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run(cfg)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            out[cfg] = sorted(times)[len(times) // 2]
        except Exception as err:  # noqa: BLE001 - a candidate that cannot run simply loses
            out[cfg] = math.inf
            first_error = first_error or err
    if first_error is not None and not any(map(math.isfinite, out.values())):
        raise first_error
    return out


def choice_key(kern, key: DispatchKey) -> str:
    return cache.key(str(kern.cascade), "choice", key.device, key.dtype, key.extents())


def choose(kern, key: DispatchKey, run: Callable[[Config], object], device: str) -> Config:
    """The winner for a CUDA dispatch key: from the on-disk cache, else the pruned survivors
    timed with `run` (this call's tensors) and stored. `device` is the device-table key."""

    def build() -> dict:
        verdicts = prune(kern.plan, key.extents(), device, key.dtype)
        # nothing fits by the estimates: time the smallest candidate rather than give up
        ms = time_configs(run, survivors(verdicts) or [SMALLEST])
        best = min(ms, key=ms.get)
        return {"config": best.as_dict(), "device": device,
                "timings_ms": {str(c): t for c, t in ms.items() if math.isfinite(t)}}

    return Config(**cache.get_or_build("choice", choice_key(kern, key), build)["config"])


def format_table(verdicts: list[Verdict], timings: dict[Config, float] | None = None) -> str:
    """The candidate table `einsum-ir tune` prints."""
    timings = timings or {}
    rows = [("config", "smem KiB", "regs", "est us", "measured ms", "verdict")]
    for v in verdicts:
        ms = timings.get(v.config)
        rows.append((str(v.config), f"{v.shared_bytes / 1024:.0f}",
                     f"{v.registers}" + (" (aot)" if v.measured else ""), f"{v.est_us:.1f}",
                     "-" if ms is None else f"{ms:.3f}", v.reason or "keep"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)
