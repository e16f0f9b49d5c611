"""Dispatch keys: which compiled kernel and which launch config serve a call.

A call is keyed by (device kind, dtype, shape bucket). The device kind is "cpu" or
"cuda:<capability>" ("cuda:90"); the bucket is `cache.shape_bucket` of the call's extents with the
plan's token ranks (the sequence ranks the kernel tiles and masks) rounded up to a power of two.
Everything a launch specializes on (tile sizes, warps, stages) is a function of the key, and
extents are run-time kernel arguments, so every length inside a bucket reuses one binary.

`STATS` counts the expensive steps (emitter runs, module imports, config resolutions) so tests
and users can see that a new length in a compiled bucket does none of them.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import torch

from einsum_ir.codegen.cache import shape_bucket
from einsum_ir.ir import index_vars, rank_of
from einsum_ir.lowering.plan import Plan, Stage

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.float64: "fp64"}
# Device-table entry for a CUDA device whose name matches none: by compute capability.
CAPABILITY_DEVICES = {(8, 0): "a100", (8, 9): "l4", (9, 0): "h100", (10, 0): "b200"}

STATS: Counter = Counter()  # "emit", "module_load", "config": how often each ran


@dataclass(frozen=True)
class Config:
    """One launch configuration, shared by every stage of a kernel."""

    BLOCK_Q: int
    BLOCK_S: int
    num_warps: int
    num_stages: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.BLOCK_Q}x{self.BLOCK_S} w{self.num_warps} s{self.num_stages}"


# Triton's interpreter runs tiles as numpy arrays: small tiles keep CPU runs fast.
INTERPRETER_CONFIG = Config(16, 16, 4, 1)


@dataclass(frozen=True)
class DispatchKey:
    device: str  # "cpu" or "cuda:90"
    dtype: str  # "bf16", "fp16", "fp32", "fp64"
    bucket: tuple[tuple[str, int], ...]  # sorted (dim, bucketed extent)

    def extents(self) -> dict[str, int]:
        return dict(self.bucket)

    def __str__(self) -> str:
        return f"{self.device} {self.dtype} " + " ".join(f"{d}={n}" for d, n in self.bucket)


def device_kind(device: torch.device) -> str:
    """"cpu", or "cuda:<major><minor>" for a CUDA device."""
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda:{major}{minor}"


def table_device(device: torch.device) -> str:
    """The cost model's device-table key for a CUDA device: by name ("NVIDIA H100 80GB HBM3"
    -> "h100"), else by compute capability."""
    from einsum_ir.cost_model.devices import table

    name = torch.cuda.get_device_name(device).lower()
    for key in table():
        if key != "cpu" and key in name:
            return key
    cap = torch.cuda.get_device_capability(device)
    return CAPABILITY_DEVICES.get(cap, "h100" if cap >= (9, 0) else "a100")


def boxed_ranks(ranks: tuple[str, ...], predicate_vars: set[str]) -> list[str]:
    """The ranks of a tile axis whose tile share follows their extent: all of them for a single
    rank, else those in the predicate (else the last). The others (GQA's R) are packed whole,
    so their exact extent decides the tile and they stay exact in the bucket."""
    if len(ranks) == 1:
        return list(ranks)
    return [v for v in ranks if v in predicate_vars] or [ranks[-1]]


def stage_token_ranks(stage: Stage) -> list[str]:
    pred = set(index_vars(stage.predicate)) if stage.predicate is not None else set()
    return [rank_of(v) for v in boxed_ranks(stage.query, pred) + boxed_ranks(stage.stream, pred)]


def token_ranks(plan: Plan) -> tuple[str, ...]:
    """The plan's sequence ranks (query and key ranks that are tiled by length)."""
    return tuple(dict.fromkeys(r for s in plan.stages for r in stage_token_ranks(s)))


def bucket_of(extents: dict[str, int], tokens: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(shape_bucket(extents, tokens).items()))


def dispatch_key(device: torch.device, dtype: torch.dtype, extents: dict[str, int],
                 tokens: tuple[str, ...]) -> DispatchKey:
    return DispatchKey(device_kind(device), DTYPE_NAMES.get(dtype, str(dtype)),
                       bucket_of(extents, tokens))
