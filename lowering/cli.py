"""`einsum-ir grad`: the backward of a cascade from the command line.

Prints the training forward, the backward prologue and the backward cascade (`ei.grad`), how
the backward lowers (its plan), its passes over the streamed rank, and with `--shapes` the cost
model's counts and roofline for forward and backward side by side; with `--q-tile/--kv-tile`
the tile simulation of the backward's key-tile programs. The lead's entry point
(einsum_ir/cli.py) calls `add_commands(subparsers)`.
"""
from __future__ import annotations

import argparse

from einsum_ir.cost_model import api as cost
from einsum_ir.cost_model.cli import ASSIGN_HELP, parse_assignments
from einsum_ir.cost_model.counts import fmt
from einsum_ir.errors import LoweringError
from einsum_ir.variants import load_spec

from einsum_ir.lowering.grad import Gradient, grad
from einsum_ir.lowering.plan import Plan
from einsum_ir.lowering.scan_cost import lowered_counts, lowered_roofline
from einsum_ir.lowering.strategy import build_plan


def add_commands(subparsers) -> None:
    g = subparsers.add_parser("grad", help="the backward cascades of a cascade (reverse-mode, derived)",
                              description="Print the training forward (which saves O(N) values), the "
                                          "backward's row-statistic prologue and its key-tile cascade, "
                                          "how it lowers, and with --shapes its cost next to the forward's.")
    g.add_argument("spec", help="a .ein file or a catalog variant name")
    g.add_argument("--shapes", help=ASSIGN_HELP)
    g.add_argument("--device", default="h100", help="device key for the roofline (default h100)")
    g.add_argument("--dtype", default="bf16", help="element type of inputs and outputs (default bf16)")
    g.add_argument("--q-tile", help="tile of the backward's programs (the keys), e.g. M=128")
    g.add_argument("--kv-tile", help="tile of the streamed queries, e.g. P=64")
    g.set_defaults(func=run_grad)


def run_grad(args: argparse.Namespace) -> int:
    c = load_spec(args.spec)
    g = grad(c)
    print(g)
    print()
    print(summary(g))
    for b in g.backward:
        plan = build_plan(b)
        print()
        print(f"lowering ({plan.strategy}):")
        print("\n".join(plan.summary().splitlines()[1:]))
        if isinstance(plan, Plan):  # a key loop: its passes over the streamed rank
            stream = ",".join(r.upper() for r in plan.stages[0].stream)
            print()
            print(cost.passes(b, rank=stream))
    if not args.shapes:
        return 0
    shapes = parse_assignments(args.shapes)
    print()
    print(cost_table(g, shapes, args.device, args.dtype))
    if args.q_tile and args.kv_tile:
        for b in g.backward:
            print()
            print(cost.simulate(b, shapes, device=args.device, q_tile=parse_assignments(args.q_tile),
                                kv_tile=parse_assignments(args.kv_tile), dtype=args.dtype))
    return 0


def summary(g: Gradient) -> str:
    lines = ["gradients: " + ", ".join(f"{x} -> {n}" for x, n in g.grads.items())]
    if g.zero:
        lines.append("identically zero: " + ", ".join(g.zero))
    if g.shift_only:
        lines.append("no gradient through " + ", ".join(g.shift_only) + ": maxima that only shift an "
                     "exponential (the outputs do not change when they do)")
    lines.append("saved by the forward: " + (", ".join(g.saved) or "nothing beyond the outputs") +
                 "; the backward reads the outputs " + ", ".join(g.outputs))
    return "\n".join(lines)


def cost_table(g: Gradient, shapes: dict, device: str, dtype: str) -> str:
    """Counts and roofline bounds of forward, prologue, backward and epilogue, side by side, as their
    lowerings run them (a chunked scan's are linear in N)."""
    parts = [("forward", g.forward)] + ([("prologue", g.prologue)] if g.prologue is not None else []) + \
        [("backward", b) for b in g.backward] + ([("epilogue", g.epilogue)] if g.epilogue is not None else [])
    rows = [("", "TC FLOPs", "vector ops", "SFU ops", "compulsory bytes", f"bound on {device}")]
    for label, c in parts:
        counts = lowered_counts(c, shapes, dtype=dtype, device=device)
        try:
            bound = lowered_roofline(c, shapes, device=device, dtype=dtype)
            time = f"{bound.bound_s * 1e6:.1f} us ({bound.binding})"
        except (LoweringError, ValueError, KeyError) as err:
            time = f"n/a ({err})"
        rows.append((label, fmt(counts.flops), fmt(counts.vector_ops), fmt(counts.sfu_ops),
                     fmt(counts.compulsory_bytes), time))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if k else cell.ljust(w) for k, (cell, w) in enumerate(zip(r, widths)))
                     for r in rows)
