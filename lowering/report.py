"""What the lowering says about a cascade, for `einsum-ir analyze` and `einsum-ir report`: the
strategy chosen and why the others declined, the rewrites, the plan, and the passes over the
keys before and after the online rewrite."""
from __future__ import annotations

from einsum_ir.cost_model.passes import analyze as passes
from einsum_ir.errors import LoweringError
from einsum_ir.ir import Cascade
from einsum_ir.lowering.grad import grad
from einsum_ir.lowering.merge import derive
from einsum_ir.lowering.online import online
from einsum_ir.lowering.ring import derive as derive_ring
from einsum_ir.lowering.chunked_scan import ScanPlan
from einsum_ir.lowering.split_kv import split_choice
from einsum_ir.lowering.scan_cost import scan_counts
from einsum_ir.lowering.strategy import STRATEGIES, choose, key_loop_plan


COLUMN_LEGEND = {
    "strategy": "the lowering strategy chosen (docs/lowering.md), or why none applies",
    "backward": "whether ei.grad derives a fused backward (einsum-ir grad), or why not",
    "merge": "whether partial states over key ranges and their exact merge are derived "
             "(kern.partial, ei.merge), or why not",
}


def strategy_cell(c: Cascade) -> str:
    plan, declined = choose(c)
    if plan is None:
        return "none: " + "; ".join(f"{d.strategy}: {d.reason}" for d in declined)
    return plan.strategy


def derived_cell(derive, c: Cascade) -> str:
    """"yes" when the derivation (ei.grad, the partial-state merge) applies, else "no: why"."""
    try:
        derive(c)
    except LoweringError as err:
        return f"no: {err}"
    return "yes"


def report_columns(name: str, cascade: Cascade) -> dict[str, str]:
    """The `strategy`, `backward` (a fused backward, lowering/grad.py) and `merge` (partial
    states over key ranges, lowering/merge.py) columns of the catalog report."""
    return {"strategy": strategy_cell(cascade), "backward": derived_cell(grad, cascade),
            "merge": derived_cell(derive, cascade)}


def online_passes(c: Cascade, rank: str = "M") -> str:
    """Passes over `rank` of the cascade's 1-pass form, or why it has none."""
    try:
        return str(passes(online(c, rank, rank + "0"), rank=rank).count)
    except (LoweringError, ValueError) as err:
        return f"- ({err})"


def analyze_section(c: Cascade, shapes: dict | None = None, device: str = "h100", dtype: str = "bf16") -> str:
    """The lowering's part of `einsum-ir analyze`; with every dim bound, the chosen form's work
    and bound beside the cascade as written."""
    plan, declined = choose(c)
    lines = ["Lowering:"]
    tried = [s.name for s in STRATEGIES]
    for d in declined:
        lines.append(f"  strategy {d.strategy!r} declined: {d.reason}")
    if plan is None:
        lines.append(f"  no strategy lowers it ({', '.join(tried)}): the interpreter runs it")
    else:
        lines.append(f"  strategy {plan.strategy!r} (tried in order: {', '.join(tried)})")
        lines += ["  " + line for line in plan.summary().splitlines()[1 + len(declined):]]
        if isinstance(plan, ScanPlan) and shapes is not None:
            lines += scan_choice(c, plan, shapes, device, dtype)
    lines.append(f"  fused backward (einsum-ir grad): {derived_cell(grad, c)}")
    lines.append(f"  partial states (kern.partial, ei.merge): {derived_cell(derive, c)}")
    lines.append(f"  context-parallel ring (ei.context_parallel): {derived_cell(derive_ring, c)}")
    if shapes is not None:
        try:
            lines.append("  " + str(split_choice(c, shapes, device, dtype)))
        except LoweringError as err:
            lines.append(f"  split-KV: not derived ({err})")
    if "M" in c.dims:
        try:
            written = passes(c, rank="M").count
        except ValueError:
            written = "-"
        lines.append(f"  passes over M: {written} as written, {online_passes(c)} in the 1-pass (online) form")
    return "\n".join(lines)


def scan_choice(c: Cascade, plan: ScanPlan, shapes: dict, device: str, dtype: str) -> list[str]:
    """Both forms of a chunked scan's cascade at `shapes`, and why the scan was chosen."""
    from einsum_ir.cost_model.counts import count, fmt
    from einsum_ir.cost_model.roofline import roofline

    scan = scan_counts(plan, shapes, dtype, device)
    written = count(c, shapes, dtype)
    t_scan = roofline(c, shapes, device, dtype, counts=scan).bound_s
    t_written = roofline(c, shapes, device, dtype).bound_s
    try:
        key_loop_plan(c)
        quadratic = "also lowers (stream keys under a query tile)"
    except LoweringError as err:
        quadratic = f"has no key loop ({err})"
    lines = [f"  forms on {device} ({dtype}):",
             f"    chunked scan ({scan.notes[0].split(': ', 1)[1]}): {fmt(scan.flops)} tensor FLOPs, "
             f"{fmt(scan.compulsory_bytes)} bytes, bound {t_scan * 1e6:.1f} us",
             f"    as written: {fmt(written.flops)} tensor FLOPs, bound {t_written * 1e6:.1f} us; the quadratic "
             f"form {quadratic}"]
    why = ("the scan's work grows linearly in N, the written form's with P x M" if plan.causal or plan.rewrites
           else "no product over both P and M: the scan is the form that fuses it")
    lines.append(f"  chosen: chunked scan, tried first: {why}")
    return lines
