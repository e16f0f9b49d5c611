"""Lowering strategies: the ways a cascade can become kernels, tried in order (DESIGN section 6).

A strategy is one module with a name and a `lower(cascade) -> Plan` that raises LoweringError
with its reason when it does not apply. `choose` tries them in order and keeps the first plan,
with the reasons of those that declined before it; `build_plan` is the same but raises when
every strategy declines, naming each one's reason.

Today, in order: "chunked scan" (lowering.chunked_scan: linear, decayed and gated forms in
O(N), by reassociation; it declines whatever a nonlinearity couples), then "stream keys under
a query tile" (lowering.stream_keys), the FlashAttention-shaped forward; it lowers the
backward's cascades too (lowering.grad), streaming the queries under a key tile. Split-KV
decode is to come, as one more module in `STRATEGIES`. The derivations that need one key loop
(the backward, partial states, the context-parallel ring) ask for the key loop's plan
(`key_loop_plan`): a linear form's scan has no per-row states to merge, so they use its
quadratic form.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache

from einsum_ir.errors import LoweringError
from einsum_ir.ir import Cascade
import einsum_ir.lowering.chunked_scan as chunked_scan
import einsum_ir.lowering.stream_keys as stream_keys
from einsum_ir.lowering.chunked_scan import ScanPlan
from einsum_ir.lowering.plan import Declined, Plan


@dataclass(frozen=True)
class Strategy:
    name: str
    lower: Callable[[Cascade], Plan | ScanPlan]


@lru_cache(maxsize=64)
def key_loop_plan(c: Cascade) -> Plan:
    """The plan of "stream keys under a query tile" (LoweringError with its reason): what the
    backward, the partial states and the ring derive from, whichever strategy runs the forward.
    Remembered per cascade, like `choose`, which tries it through this same cache."""
    return stream_keys.lower(c)


STRATEGIES: tuple[Strategy, ...] = (
    Strategy(chunked_scan.NAME, chunked_scan.lower),
    Strategy(stream_keys.NAME, key_loop_plan),
)


@lru_cache(maxsize=64)
def choose(c: Cascade) -> tuple[Plan | ScanPlan | None, tuple[Declined, ...]]:
    """The first strategy's plan (with the earlier ones' reasons), or None and every reason.
    Remembered per cascade (plans are frozen): `einsum-ir analyze` asks for the plan, the
    backward, the merge and the ring, and each derivation starts from the same plan."""
    declined: list[Declined] = []
    for s in STRATEGIES:
        try:
            plan = s.lower(c)
        except LoweringError as err:
            declined.append(Declined(s.name, str(err)))
            continue
        return replace(plan, declined=tuple(declined)), tuple(declined)
    return None, tuple(declined)


def build_plan(c: Cascade) -> Plan | ScanPlan:
    """The plan of the first strategy that lowers `c`; LoweringError with every reason if none."""
    plan, declined = choose(c)
    if plan is None:
        if len(declined) == 1:
            raise LoweringError(declined[0].reason)
        raise LoweringError("; ".join(f"{d.strategy}: {d.reason}" for d in declined))
    return plan

