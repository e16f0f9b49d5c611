"""`einsum-ir analyze` and `einsum-ir simulate`: the cost model from the command line.

The lead's entry point (einsum_ir/cli.py) calls `add_commands(subparsers)`.
"""
from __future__ import annotations

import argparse
import time

from einsum_ir.variants import load_spec

from einsum_ir.cost_model import api
from einsum_ir.cost_model.counts import fmt
from einsum_ir.cost_model.devices import links
from einsum_ir.cost_model.ring import LAYOUTS, ring_cost

ASSIGN_HELP = ("comma-separated NAME=INT bindings of dims and runtime params, e.g. "
               "B=1,H=16,P=8192,M=8192,E=128,F=128,W=512 (params may also go in --params)")


def add_commands(subparsers) -> None:
    a = subparsers.add_parser("analyze", help="passes, op/byte counts and the roofline bound of a cascade",
                              description="Print the FuseMax pass analysis, per-Einsum counts and the "
                                          "roofline lower bound with its binding unit.")
    _common(a)
    a.add_argument("--rank", default="M", help="rank whose passes are counted (default M; 'MX,MY' for several)")
    a.add_argument("--cp", type=_positive, metavar="N",
                   help="also cost a context-parallel ring over N ranks: per-rank work, compute against the "
                        "transfer of one key shard per step, per-rank memory")
    a.add_argument("--layout", default="zigzag", choices=LAYOUTS, help="the ring's sharding (default zigzag)")
    a.add_argument("--link", default="nvlink4",
                   help=f"the ring's interconnect: {', '.join(links())} (default nvlink4)")
    a.add_argument("--query-rank", default="P", help="the query rank the ring shards (default P; keys: --rank)")
    a.set_defaults(func=run_analyze)
    s = subparsers.add_parser("simulate", help="tile-level sparsity simulation of a cascade's predicates",
                              description="Classify every (Q tile, KV tile) pair as full, partial or skipped "
                                          "and report tile, FLOP and estimated speedups.")
    _common(s)
    s.add_argument("--q-tile", required=True, help="Q tile per token rank, e.g. P=128 or PX=16,PY=16")
    s.add_argument("--kv-tile", required=True, help="KV tile per token rank, e.g. M=64 or MX=16,MY=8")
    s.add_argument("--plot", help="save a tile-map heatmap (PNG) to this path")
    s.set_defaults(func=run_simulate)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="a .ein file or a catalog variant name (einsum_ir.variants.names())")
    p.add_argument("--shapes", required=True, help=ASSIGN_HELP)
    p.add_argument("--params", default="", help="more NAME=VALUE bindings for runtime params, e.g. W=512")
    p.add_argument("--device", default="h100", help="device key (a100, h100, h200, b200, l4, rtx4090, cpu) "
                                                    "or a YAML file of device entries")
    p.add_argument("--dtype", default="bf16", help="element type of inputs and outputs (default bf16)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_assignments(text: str) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: expected NAME=VALUE, got {item!r}")
        number = float(value)
        out[name.strip()] = int(number) if number.is_integer() else number
    return out


def _shapes(args) -> dict:
    return {**parse_assignments(args.shapes), **parse_assignments(args.params)}


def _unbound(c, shapes: dict) -> list[str]:
    """Dims and runtime params the command line left out."""
    runtime = [p.name for p in c.params if p.type is not None]
    return [name for name in [*c.dims, *runtime] if name not in shapes]


def run_analyze(args) -> int:
    c = load_spec(args.spec)
    shapes = _shapes(args)
    print(api.passes(c, rank=args.rank))
    print()
    counts = api.counts(c, shapes, dtype=args.dtype)
    print(counts)
    print(f"tensor-core FLOPs {fmt(counts.flops)}, vector ops {fmt(counts.vector_ops)}, "
          f"SFU ops {fmt(counts.sfu_ops)}, compulsory bytes {fmt(counts.compulsory_bytes)}")
    print()
    missing = _unbound(c, shapes)
    if missing:  # counts stay symbolic in what is missing; a time bound needs numbers
        print(f"roofline: needs {', '.join(missing)}; add them to --shapes for a bound on {args.device}")
        _sections(args, c)
        return 0
    print(api.roofline(c, shapes, device=args.device, dtype=args.dtype))
    if args.cp:
        print()
        print(ring_cost(c, shapes, args.cp, args.layout, args.device, args.link, args.dtype, args.query_rank,
                        args.rank))
    _sections(args, c)
    return 0


def _sections(args, c) -> None:
    """The upper layers' sections (the lowering's), which the top-level CLI passes in."""
    for section in getattr(args, "sections", ()):
        print()
        print(section(c))


def run_simulate(args) -> int:
    c = load_spec(args.spec)
    missing = _unbound(c, _shapes(args))
    if missing:
        raise ValueError(f"--shapes lacks {', '.join(missing)}: the simulator needs every dim and "
                         f"runtime param of {args.spec} ({', '.join([*c.dims, *(p.name for p in c.params if p.type)])})")
    start = time.perf_counter()
    result = api.simulate(c, _shapes(args), device=args.device, q_tile=parse_assignments(args.q_tile),
                          kv_tile=parse_assignments(args.kv_tile), dtype=args.dtype)
    print(result)
    print(f"  simulated in {time.perf_counter() - start:.2f} s")
    if args.plot:
        from einsum_ir.cost_model.simulate import plot_tile_map

        plot_tile_map(result, args.plot)
        print(f"  tile map written to {args.plot}")
    return 0
