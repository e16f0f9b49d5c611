"""Subcommands of `einsum-ir` from the codegen layer: `einsum-ir cache info|clear` and
`einsum-ir tune SPEC --shapes ...`.

Imported lazily by einsum_ir.cli, which calls `add_commands(subparsers)`. At import this module
needs only the standard library and codegen.cache, so the cache commands work without Triton;
`tune` imports the lowering and the autotuner when it runs.
"""
from __future__ import annotations

import argparse
import sys

from einsum_ir.codegen import cache


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    if n < 1024:
        return f"{n} B"
    if n < 1024 ** 2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 ** 2:.1f} MiB"


def format_info(report: dict) -> str:
    """The text `einsum-ir cache info` prints for a `cache.info()` report."""
    state = "enabled" if report["enabled"] else "disabled by EINSUM_IR_CACHE"
    lines = [f"einsum-ir cache: {report['location']} ({state})"]
    rows = [(kind, k["entries"], k["bytes"]) for kind, k in report["kinds"].items()]
    rows.append(("total", report["entries"], report["bytes"]))
    width = max(len(name) for name, _, _ in rows)
    lines += [f"  {name.ljust(width)}  {n:6d} entries  {human_bytes(size):>10}"
              for name, n, size in rows]
    return "\n".join(lines)


def cmd_cache_info(args: argparse.Namespace) -> int:
    try:
        print(format_info(cache.info()))
    except OSError as err:
        print(f"einsum-ir: cannot read the cache: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_cache_clear(args: argparse.Namespace) -> int:
    try:
        removed = cache.clear()
    except OSError as err:
        print(f"einsum-ir: cannot clear the cache: {err}", file=sys.stderr)
        return 1
    print(f"removed {removed} entries from {cache.cache_dir()}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """The candidate table with prune reasons; on a GPU, timings and the winner."""
    from einsum_ir.codegen import autotune
    from einsum_ir.codegen.dispatch import bucket_of
    from einsum_ir.codegen.kernel import compile_triton
    from einsum_ir.cost_model.cli import parse_assignments
    from einsum_ir.variants import load_spec

    kern = compile_triton(load_spec(args.spec))
    shapes = parse_assignments(args.shapes)
    runtime = parse_assignments(args.params)
    # tuning is per shape bucket: prune at the bucket's extents, as the runtime does
    bucket = dict(bucket_of(kern._extents_from_shapes(shapes), kern.token_ranks))
    extents = kern._extents_from_shapes(shapes)
    verdicts = autotune.prune(kern.plan, bucket, args.device, args.dtype, top_k=args.top_k)
    keep = autotune.survivors(verdicts)
    if args.aot and keep:  # measured registers / spills of the survivors (cached)
        from einsum_ir.codegen.aot import resource_usage_batch

        target = autotune.target_of(args.device)
        usage = dict(zip(keep, resource_usage_batch(
            [(kern, extents, args.dtype, target, cfg) for cfg in keep])))
        verdicts = autotune.prune(kern.plan, bucket, args.device, args.dtype, top_k=args.top_k,
                                  usage=usage)
        keep = autotune.survivors(verdicts)
    timings = _time_on_gpu(kern, extents, runtime, args.dtype, keep) if keep else {}
    print(f"{args.spec} on {args.device} ({args.dtype}), {shapes}, bucket {bucket}:")
    print(autotune.format_table(verdicts, timings))
    if timings:
        best = min(timings, key=timings.get)
        print(f"winner (timed): {best} {timings[best]:.3f} ms")
    elif keep:
        print(f"pruned-best (no GPU to time on): {keep[0]}")
    else:
        print("no candidate survives pruning")
        return 1
    return 0


def _time_on_gpu(kern, extents: dict, runtime: dict, dtype: str, configs: list) -> dict:
    """Timings of `configs` on random inputs when a CUDA GPU is present, else {}."""
    import torch

    if not torch.cuda.is_available():
        return {}
    from einsum_ir.codegen.autotune import time_configs
    from einsum_ir.codegen.kernel import TORCH_DTYPES

    args = dict(runtime)
    for d in kern.cascade.inputs:
        shape = [extents[r] for r in kern.cascade.tensors[d.name].ranks]
        if d.dtype in ("bool", "int8"):
            args[d.name] = torch.ones(shape, dtype=torch.bool, device="cuda")
        else:
            args[d.name] = torch.randn(shape, dtype=TORCH_DTYPES[dtype], device="cuda")
    return time_configs(lambda cfg: kern.run(args, cfg), configs)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `cache info`, `cache clear` and `tune` on the `einsum-ir` subparsers."""
    p = subparsers.add_parser(
        "cache", help="the on-disk cache of generated kernels, choices and AOT facts",
        description="The on-disk cache of generated kernel sources, autotuning choices and "
                    "AOT compile facts. "
                    "Location: $EINSUM_IR_CACHE_DIR (default ~/.cache/einsum_ir); "
                    "EINSUM_IR_CACHE=0 disables it.")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("info", help="location, entries per kind, size").set_defaults(
        func=cmd_cache_info)
    actions.add_parser("clear", help="delete every entry").set_defaults(func=cmd_cache_clear)
    t = subparsers.add_parser(
        "tune", help="autotuning candidates, prune reasons and (on a GPU) timings",
        description="List the launch configs the autotuner considers for SPEC at --shapes on "
                    "--device: shared memory, registers, estimated time and why each is "
                    "dropped. On a machine with a CUDA GPU the survivors are timed.")
    t.add_argument("spec", help="a .ein file or a catalog variant name")
    t.add_argument("--shapes", required=True, help="every dim, e.g. B=1,H=8,P=4096,M=4096,E=64,F=64")
    t.add_argument("--params", default="", help="runtime params for GPU timing, e.g. W=512")
    t.add_argument("--device", default="h100", help="device-table key (default h100)")
    t.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    t.add_argument("--top-k", type=int, default=4, help="survivors kept by estimate (default 4)")
    t.add_argument("--no-aot", dest="aot", action="store_false",
                   help="skip the AOT compile of the survivors (registers, spills)")
    t.set_defaults(func=cmd_tune)
