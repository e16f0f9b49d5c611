"""`einsum-ir analyze` and `einsum-ir simulate`: the cost model from the command line.

The lead's entry point (einsum_ir/cli.py) calls `add_commands(subparsers)`.
"""
from __future__ import annotations

import argparse
import math
import time
from fractions import Fraction

from einsum_ir.variants import load_spec

from einsum_ir.cost_model import api
from einsum_ir.cost_model.counts import fmt
from einsum_ir.cost_model.devices import links
from einsum_ir.cost_model.ring import LAYOUTS, ring_cost

ASSIGN_HELP = ("comma-separated NAME=INT bindings of dims and runtime params, e.g. "
               "B=1,H=16,P=8192,M=8192,E=128,F=128,W=512 (params may also go in --params)")
TENSOR_HELP = ("the values of an input tensor that a mask reads, NAME=SPEC (repeat for several): a comma "
               "list of numbers in row-major order (Len=3,5,7), random:P[:SEED] for entries that are 1 "
               "(true) with probability P at a fixed seed (default 0; Sel=random:0.1), or a file saved "
               "with torch.save (Sel=mask.pt); the shape is the declared one, at --shapes, of at most "
               "16,777,216 entries")


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
    p.add_argument("--tensor", action="append", default=[], metavar="NAME=SPEC", help=TENSOR_HELP)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_assignments(text: str, option: str = "--shapes") -> dict[str, int | float]:
    """`NAME=NUMBER,...` -> {NAME: int or float}; an integer stays exact (`P=9007199254740993`),
    `1e12` is an int too. Raises ValueError, naming the option, on anything else."""
    out: dict[str, int | float] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, value = (x.strip() for x in item.partition("="))
        if not sep or not name:
            raise ValueError(f"{option}: expected NAME=VALUE, got {item!r}")
        out[name] = _number(value, f"{option} {item}")
    return out


def _number(text: str, what: str) -> int | float:
    """An integer exactly as written (`1e30` is 10**30, not the nearest double), else a float."""
    try:
        if "/" in text:  # Fraction would read 8/2; a shape is a number, not an expression
            raise ValueError(text)
        exact = Fraction(text.strip())
    except ValueError:
        try:
            return float(text)  # nan, inf: the binding rejects them by name
        except ValueError:
            raise ValueError(f"{what}: {text!r} is not a number") from None
    return int(exact) if exact.denominator == 1 else float(exact)


def _shapes(args, c) -> dict:
    shapes = {**parse_assignments(args.shapes), **parse_assignments(args.params, "--params")}
    return {**shapes, **tensor_values(c, shapes, args.tensor)}


MAX_TENSOR_ENTRIES = 1 << 24  # entries a --tensor value may have (TENSOR_HELP says so); each block is evaluated


def tensor_values(c, shapes: dict, specs: list[str]) -> dict:
    """`--tensor NAME=SPEC` options -> {NAME: numpy array} of the declared shape and dtype
    (TENSOR_HELP says what SPEC may be). numpy is imported only when there are some, torch only
    for a saved file. Raises ValueError naming the option on a bad one, and on a declared shape
    of more than MAX_TENSOR_ENTRIES entries before building anything."""
    if not specs:
        return {}
    import numpy as np

    out = {}
    for spec in specs:
        name, sep, value = (x.strip() for x in spec.partition("="))
        decl = next((d for d in c.inputs if d.name == name), None)
        if not sep or decl is None:
            raise ValueError(f"--tensor {spec}: expected NAME=SPEC for an input of the spec "
                             f"({', '.join(c.input_names) or 'it has none'})")
        unbound = [i.upper() for i in decl.indices if i.upper() not in shapes]
        if unbound:
            raise ValueError(f"--tensor {spec}: --shapes must give {', '.join(unbound)}, the extents of {name}")
        shape = [int(shapes[i.upper()]) for i in decl.indices]
        entries = math.prod(shape)
        if entries > MAX_TENSOR_ENTRIES:
            raise ValueError(f"--tensor {spec}: {name}[{','.join(decl.indices)}] has "
                             f"{' x '.join(map(str, shape))} = {entries:.3g} entries at --shapes, more than the "
                             f"{MAX_TENSOR_ENTRIES:,} a command-line tensor may have; use smaller shapes or "
                             f"larger blocks")
        dtype = decl.dtype or "fp32"
        if value.startswith("random:"):
            p, _, seed = value[len("random:"):].partition(":")
            try:
                prob, seed_value = float(p), int(seed or 0)
            except ValueError:
                raise ValueError(f"--tensor {spec}: random:P[:SEED] takes a probability and an integer seed") from None
            if not 0 <= prob <= 1:
                raise ValueError(f"--tensor {spec}: the probability {prob} is not between 0 and 1")
            if seed_value < 0:
                raise ValueError(f"--tensor {spec}: the seed {seed_value} is negative")
            rng, t = np.random.default_rng(seed_value), np.empty(entries, dtype=bool)
            for start in range(0, entries, 1 << 22):  # in chunks: the floats never all exist at once
                t[start:start + (1 << 22)] = rng.random(min(1 << 22, entries - start), dtype=np.float32) < prob
            t = t.reshape(shape)
        elif value.endswith(".pt"):
            t = _saved_tensor(spec, value, decl, shape)
        else:
            t = np.array([_number(x.strip(), f"--tensor {spec}") for x in value.split(",")])
            if t.size == entries:
                t = t.reshape(shape)
        if list(t.shape) != shape:
            raise _shape_error(spec, decl, shape, t.shape)
        out[name] = t != 0 if dtype == "bool" else t.astype(NUMPY_DTYPES.get(dtype, np.float64))
    return out


NUMPY_DTYPES = {"int64": "int64", "int32": "int32", "int16": "int16", "int8": "int8", "fp64": "float64",
                "fp32": "float32", "fp16": "float16"}


def _shape_error(spec: str, decl, shape: list[int], got) -> ValueError:
    return ValueError(f"--tensor {spec}: {decl.name}[{','.join(decl.indices)}] has shape {tuple(shape)} at "
                      f"--shapes, but the values give {tuple(got)}")


def _saved_tensor(spec: str, path: str, decl, shape: list[int]):
    """A tensor saved with torch.save, as a numpy array; memory-mapped, so an oversized one is
    refused before it is read."""
    import torch

    try:  # weights_only: a file holds tensors, never code to run
        t = torch.load(path, weights_only=True, mmap=True)
    except OSError:
        raise  # a missing or unreadable file: the command line's one-line OS error
    except Exception as err:  # torch.load fails on other bytes with KeyError, pickle errors, ...
        first = (str(err).splitlines() or [""])[0][:120]  # torch's own messages run to pages
        raise ValueError(f"--tensor {spec}: {path} is not a tensor saved with torch.save "
                         f"({type(err).__name__}: {first})") from None
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"--tensor {spec}: {path} holds a {type(t).__name__}, not a tensor")
    if list(t.shape) != shape:  # before reading it
        raise _shape_error(spec, decl, shape, t.shape)
    return (t.double() if t.is_floating_point() else t).numpy()


def _unbound(c, shapes: dict) -> list[str]:
    """Dims and runtime params the command line left out."""
    runtime = [p.name for p in c.params if p.type is not None]
    return [name for name in [*c.dims, *runtime] if name not in shapes]


def run_analyze(args) -> int:
    c = load_spec(args.spec)
    shapes = _shapes(args, c)
    counts = api.counts(c, shapes, dtype=args.dtype)  # first: a bad shape is an error before any output
    print(api.passes(c, rank=args.rank))
    print()
    print(counts)
    print(f"tensor-core FLOPs {fmt(counts.flops)}, vector ops {fmt(counts.vector_ops)}, "
          f"SFU ops {fmt(counts.sfu_ops)}, compulsory bytes {fmt(counts.compulsory_bytes)}")
    print()
    missing = _unbound(c, shapes)
    if missing:  # counts stay symbolic in what is missing; a time bound needs numbers
        print(f"roofline: needs {', '.join(missing)}; add them to --shapes for a bound on {args.device}")
        _sections(args, c, None)
        return 0
    print(api.roofline(c, shapes, device=args.device, dtype=args.dtype))
    if args.cp:
        print()
        print(ring_cost(c, shapes, args.cp, args.layout, args.device, args.link, args.dtype, args.query_rank,
                        args.rank))
    _sections(args, c, shapes)
    return 0


def _sections(args, c, shapes: dict | None) -> None:
    """The upper layers' sections (the lowering's), which the top-level CLI passes in; `shapes`
    when they bind every dim and runtime param."""
    for section in getattr(args, "sections", ()):
        print()
        print(section(c, shapes, args.device, args.dtype))


def run_simulate(args) -> int:
    c = load_spec(args.spec)
    shapes = _shapes(args, c)
    missing = _unbound(c, shapes)
    if missing:
        raise ValueError(f"--shapes lacks {', '.join(missing)}: the simulator needs every dim and "
                         f"runtime param of {args.spec} ({', '.join([*c.dims, *(p.name for p in c.params if p.type)])})")
    start = time.perf_counter()
    result = api.simulate(c, shapes, device=args.device, q_tile=parse_assignments(args.q_tile, "--q-tile"),
                          kv_tile=parse_assignments(args.kv_tile, "--kv-tile"), dtype=args.dtype)
    print(result)
    print(f"  simulated in {time.perf_counter() - start:.2f} s")
    if args.plot:
        from einsum_ir.cost_model.simulate import plot_tile_map

        plot_tile_map(result, args.plot)
        print(f"  tile map written to {args.plot}")
    return 0
