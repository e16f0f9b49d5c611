"""Lowering: cascade rewrites and lowering strategies that turn a cascade into kernel plans.

- `strategy`: the ordered strategies, `choose` and `build_plan`;
- `stream_keys`: the FlashAttention-shaped forward strategy;
- `plan`: the plan data every emitter prints; `keyranges`: key loop bounds and segments;
  `absence`: absent points as sentinel values; `symbolic`: the integer arithmetic of bounds;
- rewrites: `defer` (division deferral), `base2` (exp to exp2 with log2 e folded into scores),
  `online` (rank partitioning and the 1-pass form, and the rescale factors it derives).
"""
from einsum_ir.lowering.defer import defer_division
from einsum_ir.lowering.online import online, partition
from einsum_ir.lowering.plan import Declined, Plan, Stage
from einsum_ir.lowering.strategy import STRATEGIES, build_plan, choose

__all__ = ["Declined", "Plan", "STRATEGIES", "Stage", "build_plan", "choose", "defer_division", "online",
           "partition"]
