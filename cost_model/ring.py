"""Context parallelism's layout and cost: how a ring over N ranks splits a cascade's work.

The query and key sequences are cut into chunks, chunk i covering [i*C, min((i+1)*C, n)) with
C = ceil(n / chunks) (so trailing chunks may be empty). `contiguous` gives rank r chunk r of N;
`zigzag` cuts 2N chunks and gives rank r chunks r and 2N-1-r, so that under a causal mask every
rank holds one early and one late chunk of queries and the ranks' work evens out. At ring step
s, rank r holds the key shard of rank (r - s) mod N; it sends that shard on to rank r+1 while it
computes, so a step costs max(compute, transfer of one key shard over the link).

A tensor's *side* says how it is sharded: a `query` tensor (read with the query index as one of
its subscripts: Q, a per-query bias) is cut along that axis and stays on its rank; a `key`
tensor (K, V, per-key tensors) is cut along its key axis and travels round the ring; a
`replicated` one (per-head slopes, lengths, a block-selection table read at positions) is whole
on every rank. A tensor read at both a query and a key subscript has no side.

`ring_cost` counts each rank's work per step with the tile simulator (tiles = chunks), so the
imbalance of a layout is visible before anything runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from einsum_ir.errors import LoweringError, located
from einsum_ir.ir import Access, Cascade, Index, rank_of, walk

from einsum_ir.cost_model import counts as cm
from einsum_ir.cost_model.devices import Device, Link, get, get_link
from einsum_ir.cost_model.roofline import roofline

LAYOUTS = ("contiguous", "zigzag")


def chunks(n: int, ranks: int, layout: str) -> list[list[tuple[int, int]]]:
    """Per rank, the [start, stop) spans of its shard of a length-n sequence, in shard order."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if ranks < 1:
        raise ValueError(f"a ring needs at least one rank, got {ranks}")
    count = ranks * (2 if layout == "zigzag" else 1)
    size = chunk_size(n, ranks, layout)
    span = [(min(i * size, n), min((i + 1) * size, n)) for i in range(count)]
    if layout == "contiguous":
        return [[span[r]] for r in range(ranks)]
    return [[span[r], span[count - 1 - r]] for r in range(ranks)]


def chunk_size(n: int, ranks: int, layout: str) -> int:
    """C: the length of every chunk but the trailing ones."""
    return max(1, -(-n // (ranks * (2 if layout == "zigzag" else 1))))


def shard_length(spans: list[tuple[int, int]]) -> int:
    """How many positions a shard (or the first chunks of one) holds."""
    return sum(hi - lo for lo, hi in spans)


@dataclass(frozen=True)
class Side:
    kind: str  # "query", "key" or "replicated"
    axis: int | None = None  # the sharded axis of a query or key tensor


def sides(c: Cascade, query: str, key: str) -> dict[str, Side]:
    """The side of every input of `c` for a ring over query index `query` and key index `key`
    (LoweringError, located, for a tensor that a ring cannot shard)."""
    axes: dict[str, dict[int, set]] = {}  # input -> axis -> the plain indices it is read at (None: other)
    reads: dict[str, Access] = {}
    inputs = set(c.input_names)
    for e in c.einsums:
        for node in [n for x in (e.expr, e.where) if x is not None for n in walk(x)]:
            if not isinstance(node, Access) or node.tensor not in inputs:
                continue
            reads.setdefault(node.tensor, node)
            for axis, sub in enumerate(node.indices):
                plain = sub.name if isinstance(sub, Index) and sub.name in (query, key) else None
                seen = axes.setdefault(node.tensor, {}).setdefault(axis, set())
                seen.add(plain)
                if len(seen) > 1:
                    raise LoweringError(located(node, f"{node.tensor}'s axis {axis + 1} is read at "
                                                  f"{' and at '.join(sorted(str(v or 'another index') for v in seen))}: "
                                                  f"a ring shards an axis by one index"))
    out = {}
    for name in c.input_names:
        plain = {v: a for a, kinds in axes.get(name, {}).items() for v in kinds if v is not None}
        if query in plain and key in plain:
            raise LoweringError(located(reads[name], f"{name} is read at both a query ({query}) and a key ({key}) "
                                                 f"subscript: a ring shards it along neither; compute it from "
                                                 f"per-query and per-key factors (as flashbias_lowrank does) or "
                                                 f"from the positions"))
        if query in plain:
            out[name] = Side("query", plain[query])
        elif key in plain:
            out[name] = Side("key", plain[key])
        else:
            out[name] = Side("replicated")
    return out



@dataclass(frozen=True)
class RingCost:
    """A ring's work and time per rank and step, and its per-rank memory."""

    ranks: int
    layout: str
    device: Device
    link: Link
    points: tuple[tuple[float, ...], ...]  # [rank][step]: present (query, key) points computed
    pairs: tuple[tuple[tuple[int, int], ...], ...]  # [rank][step]: (chunk pairs visited, chunk pairs)
    compute_s: tuple[tuple[float, ...], ...]  # [rank][step]: roofline share of the step's points
    transfer_s: float  # one key shard (the largest) over the link
    rank_bytes: float  # inputs, outputs and the two key-shard buffers of the busiest rank
    single_bytes: float  # inputs and outputs on one device

    @property
    def rank_work(self) -> tuple[float, ...]:
        return tuple(sum(row) for row in self.points)

    @property
    def imbalance(self) -> float:
        """The busiest rank's work over the mean (1: balanced)."""
        work = self.rank_work
        mean = sum(work) / len(work)
        return max(work) / mean if mean else 1.0

    def hidden(self, rank: int, step: int) -> bool:
        """Whether the step's send of a key shard hides behind its compute (the last step sends nothing)."""
        return step == self.ranks - 1 or self.compute_s[rank][step] >= self.transfer_s

    @property
    def time_s(self) -> float:
        """The ring's time: per step, every rank waits for the slowest one's compute or transfer."""
        total = 0.0
        for s in range(self.ranks):
            send = self.transfer_s if s < self.ranks - 1 else 0.0
            total += max(max(self.compute_s[r][s] for r in range(self.ranks)), send)
        return total

    def __str__(self) -> str:
        work = self.rank_work
        total = sum(work) or 1.0
        rows = []
        for r in range(self.ranks):
            visited = sum(v for v, _ in self.pairs[r])
            hidden = sum(self.hidden(r, s) for s in range(self.ranks))
            rows.append((str(r), f"{100 * work[r] / total:.1f}%", f"{visited}/{sum(n for _, n in self.pairs[r])}",
                         _us(max(self.compute_s[r])), f"{hidden}/{self.ranks}"))
        head = (f"Ring over {self.ranks} ranks ({self.layout}) on {self.device.name}, {self.link.name} "
                f"({self.link.bandwidth / 1e9:g} GB/s per direction)")
        lines = [head, cm.table(("rank", "work", "chunk pairs visited", "slowest step", "steps hiding the send"),
                                rows)]
        lines.append(f"  imbalance {self.imbalance:.2f} (busiest rank / mean); one key shard takes "
                     f"{_us(self.transfer_s)} to send; ring time {_us(self.time_s)}")
        every = all(self.hidden(r, s) for r in range(self.ranks) for s in range(self.ranks))
        lines.append("  communication is hidden behind compute at every step" if every else
                     "  communication is exposed where a step computes less than one shard's transfer "
                     "(fewer points, a faster link or a longer sequence hide it)")
        lines.append(f"  memory per rank {cm.fmt(self.rank_bytes)}B (inputs, outputs and two key-shard buffers) "
                     f"against {cm.fmt(self.single_bytes)}B on one device: {self.single_bytes / self.rank_bytes:.2f}x "
                     f"less")
        return "\n".join(lines)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1 else f"{seconds:.3f} s"


def ring_cost(c: Cascade, shapes: dict, ranks: int, layout: str = "zigzag", device: str | dict | Device = "h100",
              link: str | Link = "nvlink4", dtype: str = "bf16", query: str = "P", key: str = "M") -> RingCost:
    """Each rank's work and time per ring step for `c` at `shapes`, queries along dim `query`
    and keys along dim `key` cut into `layout` shards over `ranks` ranks."""
    d, net = get(device), get_link(link)
    for dim in (query, key):
        if dim not in c.dims:
            raise ValueError(f"{dim} is not a dim of the cascade ({', '.join(c.dims)}); name the query and "
                             f"key dims")
    n_q, n_k = int(shapes[query]), int(shapes[key])
    q_chunks, k_chunks = chunks(n_q, ranks, layout), chunks(n_k, ranks, layout)
    cq, ck = chunk_size(n_q, ranks, layout), chunk_size(n_k, ranks, layout)
    from einsum_ir.cost_model.simulate import simulate  # torch: only for --cp, not every analyze

    sim = simulate(c, shapes, d, q_tile={query: cq}, kv_tile={key: ck}, dtype=dtype)
    tiles_q = math.ceil(n_q / cq) if n_q else 0
    grid = sim.points.reshape(-1, tiles_q, sim.n_kv_tiles).sum(0) if tiles_q and sim.n_kv_tiles else None
    bound = roofline(c, shapes, d, dtype).bound_s
    present = float(grid.sum()) if grid is not None else 0.0

    def pair(a: tuple[int, int], b: tuple[int, int]) -> float:
        if a[0] == a[1] or b[0] == b[1] or grid is None:
            return 0.0
        return float(grid[a[0] // cq, b[0] // ck])

    points, pairs, compute = [], [], []
    for r in range(ranks):
        row_points, row_pairs = [], []
        for s in range(ranks):
            found = [pair(a, b) for a in q_chunks[r] for b in k_chunks[(r - s) % ranks]]
            row_points.append(sum(found))
            row_pairs.append((sum(x > 0 for x in found), len(found)))
        points.append(tuple(row_points))
        pairs.append(tuple(row_pairs))
        compute.append(tuple(bound * x / present if present else 0.0 for x in row_points))
    counts = cm.count(c, shapes, dtype)
    side = sides(c, query.lower(), key.lower())
    by_side = {kind: sum(float(b) for n, b in counts.input_bytes.items() if side[n].kind == kind)
               for kind in ("query", "key", "replicated")}
    outputs = float(sum(counts.output_bytes.values()))
    longest_k = max(map(shard_length, k_chunks)) / n_k if n_k else 0.0
    longest_q = max(map(shard_length, q_chunks)) / n_q if n_q else 0.0
    shard = by_side["key"] * longest_k
    rank_bytes = (by_side["query"] + outputs) * longest_q + 3 * shard + by_side["replicated"]
    return RingCost(ranks, layout, d, net, tuple(points), tuple(pairs), tuple(compute), shard / net.bandwidth,
                    rank_bytes, sum(by_side.values()) + outputs)
