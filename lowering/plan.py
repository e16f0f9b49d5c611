"""Kernel plans: plain, backend-neutral data that the emitters print (DESIGN section 6).

A plan is made by a lowering strategy (lowering.strategy). It holds the cascade as lowered
(after its rewrites) and one `Stage` per kernel launch. Nothing here is code in any target
language: loop bounds and segments are sympy expressions (lowering.symbolic), masks and values
are IR expressions, and each emitter spells them in its own language.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import sympy

from einsum_ir.cost_model.passes import rank_vars, resolve_ranks
from einsum_ir.ir import Access, Binary, Cascade, Einsum, Expr, Index, Name, walk
from einsum_ir.lowering.groups import Grouping
from einsum_ir.lowering.keyranges import KeyLoop
from einsum_ir.printer import print_expr

KINDS = ("prologue", "key_side", "stream", "group", "carried", "tile_sum", "epilogue")


def page_flag(size: str) -> str:
    """The name of the launch constant that says every key tile lies in one page of `size`
    keys (`Stage.page_sizes`)."""
    return f"IN_PAGE_{size}"


@dataclass(frozen=True)
class PresenceGroup:
    """Carried reductions that are present at the same rows: those whose summands share the same
    guards. After the loop a row is present when a point of it was; `maximum` (a running max of
    the group, present iff > -inf) answers that for free, else `counter` counts it."""

    guards: frozenset[str]
    members: tuple[str, ...]
    maximum: str | None
    counter: str | None


@dataclass(frozen=True)
class Stage:
    """One kernel launch: a grid of (query tiles) x (grid ranks), each program looping over key
    tiles. Einsum classes: `prologue` (no key rank, before the loop), `key_side` (key rank, no
    query rank), `stream` (both), `group` (reduces the key tile's keys group by group into a
    value per group, read back at each key of the group: lowering.groups), `carried` (reduces
    the key rank: a loop-carried accumulator), `tile_sum` (keeps the key rank and sums the
    query rank: each program adds its key tile's share to the output, atomically), `epilogue`
    (after the loop)."""

    index: int
    stream: tuple[str, ...]  # key index variables (one tile axis)
    query: tuple[str, ...]  # query index variables (one tile axis)
    grid: tuple[str, ...]  # one program per value (batch, heads)
    features: tuple[str, ...]  # held whole in a tile (head dims)
    einsums: tuple[Einsum, ...]
    kinds: Mapping[str, str]
    online: tuple[str, ...]  # carried maxima read inside the loop: running maxima
    rescale: Mapping[str, sympy.Expr]  # carried sum -> factor when its maxima grow (1: none)
    loads: tuple[str, ...]
    stores: tuple[str, ...]
    atomic: frozenset[str]  # summed across programs (a grid or query rank reduced): atomic adds
    tile_stores: Mapping[str, tuple[str, ...]]  # stream outputs written tile by tile (a gradient over
    # both token ranks) -> the guards that decide where they are present
    predicate: Expr | None  # guards every carried reduction: what the key loop skips by
    loop: KeyLoop
    guards: Mapping[str, Expr]  # masked tiles: stream Einsum -> where its points are present
    # absent points as values (lowering.absence): in-loop value -> (sentinel, the guards applied
    # there); None: masks travel with the values instead
    sentinels: Mapping[str, tuple[float, tuple[str, ...]]] | None
    self_masked: Mapping[str, Expr]  # carried reductions that apply their own mask in masked tiles
    groups: tuple[PresenceGroup, ...]
    last_use: Mapping[str, str]  # in-loop value -> the last in-loop Einsum that reads it
    bounds: Mapping[str, float] = field(default_factory=dict)  # in-loop map -> a bound on |value|
    # where present (lowering.bounds): what may be cast to fp16 for a dot
    grouped: Mapping[str, Grouping] = field(default_factory=dict)  # `group` Einsums: how they group
    # the keys (lowering.groups); the key tiles are aligned to the groups
    by_presence: bool = False  # values carry their presence point by point in every tile (unions
    # and grouped reductions in the loop: no sentinel or predicate states it); each carried
    # reduction is seen where its summand is present
    # bounds left to the masks (a page id in range: lowering.stream_keys) that decide nothing
    # else: `checked_loop` is the key loop had they held, whose full tiles are full where one
    # test of the tile finds `tile_checks` true at every point (masked where not). An emitter
    # that does not test tiles runs `loop`, every tile masked.
    tile_checks: Expr | None = None
    checked_loop: KeyLoop | None = None

    def kind(self, name: str) -> str:
        return self.kinds[name]

    def of_kind(self, *kinds: str) -> tuple[Einsum, ...]:
        return tuple(e for e in self.einsums if self.kinds[e.name] in kinds)

    @property
    def tensors(self) -> tuple[str, ...]:
        """The tensors the stage's kernel reads or writes outside itself, in argument order."""
        sums = tuple(e.name for e in self.of_kind("tile_sum"))
        return tuple(dict.fromkeys(self.loads + self.stores + tuple(self.tile_stores) + sums))

    @property
    def summed_across_programs(self) -> frozenset[str]:
        """Outputs several programs add into (atomic carried sums and tile sums): they start at 0, in fp32."""
        return self.atomic | {e.name for e in self.of_kind("tile_sum")}

    @cached_property  # read by every launch's tiles: derived once
    def page_sizes(self) -> tuple[str, ...]:
        """The names D (dims) that an index position reads the key as `m // D` with: a paged
        cache's page of D keys, `Kc[Tbl[b, m // T], m % T, ...]`, for one key rank. A key tile
        starts at a multiple of its size, so where that size divides D the tile lies in one
        page: `m // D` is one value per tile (one page-table read), and `m % D` the tile's
        offset in the page plus the lane."""
        if len(self.stream) != 1:
            return ()
        key = Index(self.stream[0])
        found = [n.rhs.name for e in self.einsums for a in walk(e.expr) if isinstance(a, Access)
                 for i in a.indices for n in walk(i)
                 if isinstance(n, Binary) and n.op == "//" and n.lhs == key and isinstance(n.rhs, Name)]
        return tuple(dict.fromkeys(found))

    @property
    def grouping(self) -> Grouping | None:
        """How the stage's grouped reductions group its keys, all alike (lowering.stream_keys
        checks it); None when it has none."""
        return next(iter(self.grouped.values()), None)

    def group_of(self, name: str) -> PresenceGroup | None:
        return next((g for g in self.groups if name in g.members), None)

    def summary(self) -> str:
        lines = [f"stage {self.index}: stream {','.join(self.stream)} | query {','.join(self.query)}"
                 f" | grid {','.join(self.grid) or '-'} | features {','.join(self.features) or '-'}"]
        for e in self.einsums:
            extra = " (online max)" if e.name in self.online else ""
            if self.rescale.get(e.name, 1) != 1:
                extra = f" (rescaled by {self.rescale[e.name]})"
            if e.name in self.atomic:
                extra = " (summed across programs: atomic)"
            if e.name in self.tile_stores:
                extra = " (written tile by tile)"
            if self.sentinels and e.name in self.sentinels:
                value, guards = self.sentinels[e.name]
                extra = f" (absent points = {value}: {', '.join(guards)})"
            lines.append(f"  {self.kinds[e.name]:9s} {e.name}{extra}")
        lines.append(f"  keys: {self.loop.describe()}")
        if self.checked_loop is not None:
            full = sum(not seg.masked for seg in self.checked_loop.tile_segments)
            lines.append(f"  tested tiles: {full} loop(s) unmasked where {print_expr(self.tile_checks)} holds in the tile")
        for name, mask in self.guards.items():
            lines.append(f"  masked tiles: {name} present where {print_expr(mask)}")
        if self.sentinels is None and self.guards:
            lines.append("  masked tiles carry presence masks (no sentinel value is exact here)")
        return "\n".join(lines)


@dataclass(frozen=True)
class Declined:
    """A strategy that did not lower the cascade, and why."""

    strategy: str
    reason: str


@dataclass(frozen=True)
class Plan:
    strategy: str
    cascade: Cascade  # the cascade as lowered: the stages refer to its Einsums
    stages: tuple[Stage, ...]
    intermediates: tuple[str, ...]  # tensors materialized between stages (fp32)
    rewrites: tuple[str, ...] = ()  # the rewrites that made `cascade`, in order
    declined: tuple[Declined, ...] = field(default=())  # strategies tried before this one

    def passes(self, rank: str = "M") -> int:
        """Traversals of `rank` (FuseMax passes, `ei.passes`) the plan runs: one per stage that
        streams it, each a single loop over its tiles (running maxima keep it one)."""
        streamed = rank_vars(self.cascade, resolve_ranks(self.cascade, rank))
        return sum(1 for s in self.stages if set(s.stream) & streamed)

    def summary(self) -> str:
        head = [f"strategy: {self.strategy}"]
        head += [f"  declined: {d.strategy}: {d.reason}" for d in self.declined]
        if self.rewrites:
            head.append(f"rewrites: {', '.join(self.rewrites)}")
        return "\n".join(head + [s.summary() for s in self.stages])
