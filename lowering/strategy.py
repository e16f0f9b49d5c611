"""Lowering strategies: the ways a cascade can become kernels, tried in order (DESIGN section 6).

A strategy is one module with a name and a `lower(cascade) -> Plan` that raises LoweringError
with its reason when it does not apply. `choose` tries them in order and keeps the first plan,
with the reasons of those that declined before it; `build_plan` is the same but raises when
every strategy declines, naming each one's reason.

Today, in order: "chunked scan" (lowering.chunked_scan: linear, decayed and gated forms in
O(N), by reassociation; it declines whatever a nonlinearity couples), then "stream keys under
a query tile" (lowering.stream_keys), the FlashAttention-shaped forward; it lowers the
backward's cascades too (lowering.grad), streaming the queries under a key tile. Split-KV
decode (lowering.split_kv) is not an entry here: its split count depends on the call's shape
and device, so the kernels choose it per call on top of the key loop's plan, deriving the split
kernel from the partial states. The derivations that need one key loop
(partial states, split-KV, the context-parallel ring, the backward of a forward the key loop runs) ask
for the key loop's plan (`key_loop_plan`): a linear form's scan has no per-row states to
merge, so they use its quadratic form where it has one (partial states of linear attention
written with its states are taken from the cascade as written, lowering/merge.py); its backward
is differentiated and scanned instead.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache

from einsum_ir.errors import LoweringError
from einsum_ir.ir import Binary, Cascade, Einsum, Expr, Index, Name, Num, accesses, conjuncts
from einsum_ir.validate import PresenceAnalysis, implies
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


def bounded_shifts(c: Cascade) -> Cascade:
    """Reads at a shifted index (`K[b,h,m+1,e]`, `X[p-1]`) are absent past the tensor's extent,
    as the interpreter has them (DESIGN section 2); this states that as a predicate of the
    reading Einsum, so that no kernel takes the zero a masked load gives there for a present
    value. It applies to a cascade as written, once: `ei.compile` and `ei.grad` call it (the
    cascades the lowering derives keep what it stated, and the lowering may rely on a map
    being present everywhere its readers are)."""
    einsums, changed = [], False
    presence = None
    for e in c.einsums:
        bounds: list[Expr] = []
        for a in accesses(e.expr):
            if c.tensors[a.tensor].iterative:  # a recurrence's steps: one more than the rank's extent
                continue
            for idx, rank in zip(a.indices, c.tensors[a.tensor].ranks):
                shift = _shift(idx)
                bound = None if not shift else Binary("<", idx, Name(rank)) if shift > 0 else Binary(">=", idx, Num(0))
                if bound is None or bound in bounds or bound in conjuncts(e.where):
                    continue
                presence = presence or PresenceAnalysis(c)
                if not _readers_exclude(c, e, bound, presence):
                    bounds.append(bound)
        for b in bounds:
            e = replace(e, where=b if e.where is None else Binary("and", e.where, b))
            changed = True
        einsums.append(e)
    return c.replace(einsums=tuple(einsums)) if changed else c


def _readers_exclude(c: Cascade, e: Einsum, bound: Expr, presence) -> bool:
    """A map whose every reader, at its own indices, is present only where `bound` holds (the
    spec already says `m + 1 < M` there): its value past the extent is never used."""
    if e.reduced:
        return False
    readers = [r for r in c.einsums if e.name in (a.tensor for a in accesses(r.expr))]
    own = tuple(Index(v) for v in e.lhs_vars)
    for r in readers:
        if any(a.tensor == e.name and a.indices != own for a in accesses(r.expr)):
            return False
        if not implies(frozenset(conjuncts(r.where)) | presence.of(r.expr), bound):
            return False
    return bool(readers)


def _shift(idx: Expr) -> float:
    """k for an index `v + k` or `v - k` (0 for anything else)."""
    if isinstance(idx, Binary) and idx.op in ("+", "-"):
        if isinstance(idx.lhs, Index) and isinstance(idx.rhs, Num):
            return float(idx.rhs.value) * (1 if idx.op == "+" else -1)
        if idx.op == "+" and isinstance(idx.rhs, Index) and isinstance(idx.lhs, Num):
            return float(idx.lhs.value)
    return 0.0


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

