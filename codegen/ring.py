"""Context parallelism: ring attention for any cascade whose partial states merge, on torch.distributed.

    cp = ei.context_parallel(cascade, group=None, layout="zigzag")
    q, k, v = (cp.shard(n, t) for n, t in (("Q", Q), ("K", K), ("V", V)))   # this rank's shards
    out = cp.unshard(cp(Q=q, K=k, V=v))                                     # the whole output

Every rank holds its shards of the query-side and key-side tensors (cost_model/ring.py: sides
and layouts). Over N steps the key shards circulate: at step s a rank computes with the shard of
rank (r - s) mod N while it sends that shard on to r+1 and receives the next one from r-1
(`batch_isend_irecv`, so the transfer overlaps the compute). Each (query chunk, key chunk) pair
the mask does not leave empty gives a partial state of the ring's shifted cascade
(lowering/ring.py); the states of a query chunk merge exactly (codegen/partial.py), and the
merged state finalizes to the rank's output shard.

Backward (the fused backward of lowering/grad.py): the same ring runs again, with the key
shards travelling with the accumulated gradients of their key-side tensors; per pair, the
backward kernels read the merged forward statistics of the query chunk. Query-side gradients
stay local, key-side ones arrive back at their owner after one more hop, and gradients of
replicated tensors (a per-head slope) are all-reduced.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from einsum_ir.codegen.api import compile as compile_kernel
from einsum_ir.codegen.autograd import run_backward, wants_grad
from einsum_ir.codegen.partial import PartialState, merge
from einsum_ir.cost_model.ring import LAYOUTS, chunks, ring_cost, shard_length
from einsum_ir.errors import BindError, LoweringError
from einsum_ir.ir import Cascade, rank_of
from einsum_ir.lowering.ring import Ring, derive, visits


@dataclass
class RingStats:
    """What the last call did, per ring step (forward, then backward when it ran)."""

    pairs_run: int = 0  # (query chunk, key chunk) pairs computed
    pairs_skipped: int = 0  # pairs the mask leaves empty
    compute_s: list[float] = field(default_factory=list)  # per step: kernels
    wait_s: list[float] = field(default_factory=list)  # per step: waiting for the transfer after the compute
    sent_bytes: int = 0


@dataclass(frozen=True)
class _Layout:
    """One call's shards: global lengths, each rank's chunks of queries and keys, and the
    (query chunk, key chunk) pairs the mask leaves some point in (forward and backward run those)."""

    q_total: int
    k_total: int
    q_chunks: list[list[tuple[int, int]]]
    k_chunks: list[list[tuple[int, int]]]
    visited: frozenset[tuple[tuple[int, int], tuple[int, int]]]


class ContextParallel:
    """Ring attention for `cascade` over the ranks of `group` (see the module docstring)."""

    def __init__(self, cascade: Cascade, group=None, layout: str = "zigzag", query: str | None = None,
                 backend: str = "auto"):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        self.ring: Ring = derive(cascade, query)
        self.kernel = compile_kernel(self.ring.shifted, backend)
        self.group, self.layout = group, layout
        self.stats = RingStats()
        self._last: _Layout | None = None

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    def cost(self, shapes: dict, ranks: int | None = None, device="h100", link="nvlink4", dtype: str = "bf16"):
        """The ring's cost model at `shapes` over `ranks` (default: this group's size): each
        rank's work per step, compute against one key shard's transfer, per-rank memory."""
        r = self.ring
        return ring_cost(r.cascade, shapes, ranks or self.world, self.layout, device, link, dtype,
                         rank_of(r.query), rank_of(r.key))

    # ------------------------------------------------------------------ layout helpers

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of input (or output) `name`, given the whole tensor."""
        axis, kind = self._axis(name)
        if axis is None:
            return full
        spans = chunks(full.shape[axis], self.world, self.layout)[self.rank]
        return torch.cat([full.narrow(axis, lo, hi - lo) for lo, hi in spans], axis)

    def unshard(self, local: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """The whole output `name` (default: the first) from every rank's shard (a collective)."""
        name = name or next(iter(self.ring.output_axes))
        if name not in self.ring.output_axes:
            raise KeyError(f"{name} is not an output of the cascade ({', '.join(self.ring.output_axes)})")
        if self._last is None:
            raise RuntimeError("unshard needs a call first: the layout comes from the call's shards")
        axis, spans = self.ring.output_axes[name], self._last.q_chunks
        if self.world == 1:
            return local
        longest = max(map(shard_length, spans))
        padded = torch.zeros(_with_length(local.shape, axis, longest), dtype=local.dtype, device=local.device)
        padded.narrow(axis, 0, local.shape[axis]).copy_(local)
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded, group=self.group)
        full = torch.empty(_with_length(local.shape, axis, self._last.q_total), dtype=local.dtype, device=local.device)
        for part, rank_spans in zip(gathered, spans):
            at = 0
            for lo, hi in rank_spans:
                full.narrow(axis, lo, hi - lo).copy_(part.narrow(axis, at, hi - lo))
                at += hi - lo
        return full

    def _axis(self, name: str) -> tuple[int | None, str]:
        if name in self.ring.output_axes:
            return self.ring.output_axes[name], "query"
        if name not in self.ring.sides:
            raise KeyError(f"{name} is neither an input nor an output of the cascade")
        side = self.ring.sides[name]
        return side.axis, side.kind

    # ------------------------------------------------------------------ the call

    def __call__(self, **args):
        """This rank's output shard(s), from its shards of the inputs and the runtime params."""
        names = tuple(k for k, v in args.items() if isinstance(v, torch.Tensor))
        static = {k: v for k, v in args.items() if k not in names}
        if wants_grad(args):
            outs = _RingFunction.apply(self, static, names, *(args[k] for k in names))
        else:
            outs = self._forward(args)[0]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _layout(self, args: Mapping) -> _Layout:
        missing = [n for n in self.ring.sides if n not in args]
        if missing:
            raise BindError(f"missing input(s) {', '.join(missing)}")
        lengths = {}
        for kind in ("query", "key"):
            found = {n: args[n].shape[s.axis] for n, s in self.ring.sides.items() if s.kind == kind}
            if len(set(found.values())) > 1:
                raise BindError(f"the {kind}-side shards disagree in length: "
                                + ", ".join(f"{n} {k}" for n, k in found.items()))
            lengths[kind] = next(iter(found.values()), 0)
        mine = torch.tensor([lengths["query"], lengths["key"]], dtype=torch.int64)
        every = [mine]
        if self.world > 1:
            mine = mine.to(_comm_device(self.group))
            every = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(every, mine, group=self.group)
        q_total, k_total = (int(sum(int(t[i]) for t in every)) for i in (0, 1))
        q_chunks, k_chunks = chunks(q_total, self.world, self.layout), chunks(k_total, self.world, self.layout)
        for kind, spans, have in (("query", q_chunks, 0), ("key", k_chunks, 1)):
            want = [shard_length(s) for s in spans]
            got = [int(t[have]) for t in every]
            if want != got:
                raise BindError(f"the {kind} shards have lengths {got} over the ranks; the {self.layout} layout of "
                                f"{sum(got)} gives {want}: cut them with cp.shard")
        scalars = self._scalars(args, q_total, k_total)
        visited = frozenset((a, b) for a in q_chunks[self.rank] for spans in k_chunks for b in spans
                            if visits(self.ring, a, b, scalars))
        return _Layout(q_total, k_total, q_chunks, k_chunks, visited)

    def _scalars(self, args: Mapping, q_total: int, k_total: int) -> dict[str, int]:
        """Dims (the sequence ranks at their global length) and runtime params, for `visits`."""
        c = self.ring.cascade
        scalars = {}
        for d in c.inputs:
            for axis, index in enumerate(d.indices):
                scalars[rank_of(index)] = int(args[d.name].shape[axis])
        scalars[rank_of(self.ring.query)], scalars[rank_of(self.ring.key)] = q_total, k_total
        scalars.update({p.name: args[p.name] for p in c.params if p.type is not None and p.name in args})
        return scalars

    def _forward(self, args: Mapping) -> tuple[tuple[torch.Tensor, ...], list[PartialState]]:
        """(the outputs of this rank, the merged state of each of its query chunks)."""
        r = self.ring
        layout = self._layout(args)
        self._last, self.stats = layout, RingStats()
        q_spans = layout.q_chunks[self.rank]
        query = [self._query_args(args, q_spans, i) for i in range(len(q_spans))]
        states: list[PartialState | None] = [None] * len(q_spans)
        travel = self._travelling(args)
        for step in range(self.world):
            src = (self.rank - step) % self.world
            pending = self._send_keys(travel, layout, src) if step < self.world - 1 else None
            start = time.perf_counter()
            k_spans = layout.k_chunks[src]
            for i, a in enumerate(q_spans):
                for j, b in enumerate(k_spans):
                    if (a, b) not in layout.visited:
                        self.stats.pairs_skipped += 1
                        continue
                    self.stats.pairs_run += 1
                    st = self.kernel.partial(keys=(0, b[1] - b[0]), **query[i], **_narrowed(travel, r, k_spans, j),
                                             **self._offsets(a, b, layout))
                    states[i] = st if states[i] is None else merge(r.shifted, [states[i], st])
            self.stats.compute_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            travel = self._wait(pending) if pending is not None else travel
            self.stats.wait_s.append(time.perf_counter() - start)
        own = self._travelling(args)
        for i, a in enumerate(q_spans):  # a chunk no key reached: the absent state
            if states[i] is None:
                b = layout.k_chunks[self.rank][0]
                states[i] = self.kernel.partial(keys=(0, 0), **query[i], **_narrowed(own, r, layout.k_chunks[self.rank], 0),
                                                **self._offsets(a, b, layout))
        finals = [st.finalize() for st in states]
        finals = [f if isinstance(f, tuple) else (f,) for f in finals]
        outs = tuple(torch.cat([f[k] for f in finals], axis) for k, axis in enumerate(r.output_axes.values()))
        return outs, states

    def _query_args(self, args: Mapping, spans: list[tuple[int, int]], i: int) -> dict:
        """The call's arguments for query chunk i: query-side tensors cut to it, the rest whole
        (key-side tensors come from the ring)."""
        out = {}
        for name, value in args.items():
            side = self.ring.sides.get(name)
            if side is not None and side.kind == "key":
                continue
            out[name] = _cut(value, side.axis, spans, i) if side is not None and side.kind == "query" else value
        return out

    def _offsets(self, a: tuple[int, int], b: tuple[int, int], layout: _Layout) -> dict[str, int]:
        r = self.ring
        return {r.query_offset: a[0], r.key_offset: b[0], r.query_total: layout.q_total, r.key_total: layout.k_total}

    def _travelling(self, args: Mapping) -> dict[str, torch.Tensor]:
        return {n: args[n] for n, s in self.ring.sides.items() if s.kind == "key"}

    # ------------------------------------------------------------------ transfers

    def _exchange(self, send: dict[str, torch.Tensor], lengths: dict[str, int], axes: dict[str, int]):
        """Post sends of `send` to the next rank and receives of the same tensors (with the
        given lengths along `axes`) from the previous one; (the requests, the receive buffers)."""
        nxt, prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        peer = (lambda r: dist.get_global_rank(self.group, r)) if self.group is not None else (lambda r: r)
        ops, buffers = [], {}
        for name, t in send.items():
            buf = torch.empty(_with_length(t.shape, axes[name], lengths[name]), dtype=t.dtype, device=t.device)
            buffers[name] = buf
            if t.numel():
                ops.append(dist.P2POp(dist.isend, t.contiguous(), peer(nxt), self.group))
                self.stats.sent_bytes += t.numel() * t.element_size()
            if buf.numel():
                ops.append(dist.P2POp(dist.irecv, buf, peer(prev), self.group))
        return (dist.batch_isend_irecv(ops) if ops else []), buffers

    def _send_keys(self, travel: dict[str, torch.Tensor], layout: _Layout, src: int):
        """Start passing the key shard of rank `src` on; the next step holds rank src-1's."""
        length = shard_length(layout.k_chunks[(src - 1) % self.world])
        axes = {n: self.ring.sides[n].axis for n in travel}
        return self._exchange(travel, {n: length for n in travel}, axes)

    @staticmethod
    def _wait(pending) -> dict[str, torch.Tensor]:
        requests, buffers = pending
        for req in requests:
            req.wait()
        return buffers

    # ------------------------------------------------------------------ backward

    def _backward(self, args: Mapping, layout: _Layout, outputs: tuple, states: list[PartialState],
                  seeds: tuple) -> dict:
        r = self.ring
        training = self.kernel.training
        try:
            training.build()
        except LoweringError as err:
            raise LoweringError(f"context_parallel trains through the fused backward, which this cascade lacks: "
                                f"{err}") from None
        g = training.gradient
        missing = [n for n in g.saved if n not in r.merge.partial.output_names]
        if missing:
            raise LoweringError(f"the backward saves {', '.join(missing)}, which the partial states do not carry")
        fills = {o.name: o.fill for o in g.forward.outputs}
        q_spans = layout.q_chunks[self.rank]
        query = []
        for i, st in enumerate(states):
            chunk = self._query_args(args, q_spans, i)
            saved = {n: torch.where(st.present(st.merge.partial.tensors[n].ranks), st.values[n],
                                    torch.full((), fills[n], dtype=st.values[n].dtype)) for n in g.saved}
            cut = lambda ts: tuple(None if t is None else _cut(t, axis, q_spans, i)  # noqa: E731
                                   for t, axis in zip(ts, r.output_axes.values()))
            query.append((chunk, cut(outputs), saved, cut(seeds)))
        floats = {n for n, v in args.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
        grads = {n: _accumulator(args[n]) for n in floats if r.sides[n].kind != "key"}
        travel = self._travelling(args)
        key_grads = [n for n in travel if n in floats]
        arriving = None  # the accumulated key-side gradients of the shard this rank holds
        finished: dict[str, torch.Tensor] = {}
        for step in range(self.world):
            src = (self.rank - step) % self.world
            k_spans = layout.k_chunks[src]
            requests = []
            if step < self.world - 1:
                requests.append(self._send_keys(travel, layout, src))
            if step > 0:  # pass on the gradients of the previous step's shard; receive this one's
                requests.append(self._exchange(finished, {n: shard_length(k_spans) for n in finished},
                                               {n: r.sides[n].axis for n in finished}))
            start = time.perf_counter()
            mine = {n: _accumulator(travel[n]) for n in key_grads}
            for i, a in enumerate(q_spans):
                for j, b in enumerate(k_spans):
                    if (a, b) not in layout.visited:
                        continue
                    chunk, outs, saved, seed = query[i]
                    pair = {**chunk, **_narrowed(travel, r, k_spans, j), **self._offsets(a, b, layout)}
                    found = run_backward(training, pair, outs, saved, seed)
                    for n, value in found.items():
                        side = r.sides[n]
                        if side.kind == "query":
                            _cut(grads[n], side.axis, q_spans, i).add_(value)
                        elif side.kind == "key":
                            _cut(mine[n], side.axis, k_spans, j).add_(value)
                        else:
                            grads[n].add_(value)
            self.stats.compute_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            received = [self._wait(p) for p in requests]
            self.stats.wait_s.append(time.perf_counter() - start)
            if step > 0:
                arriving = received[-1]
            finished = {n: mine[n].add_(arriving[n]) if arriving else mine[n] for n in key_grads}
            if step < self.world - 1:
                travel = received[0]
        if self.world > 1 and key_grads:  # one more hop brings each shard's gradients home
            own = shard_length(layout.k_chunks[self.rank])
            finished = self._wait(self._exchange(finished, {n: own for n in finished},
                                                 {n: r.sides[n].axis for n in finished}))
        grads.update(finished)
        for n in grads:
            if r.sides[n].kind == "replicated" and self.world > 1:
                dist.all_reduce(grads[n], group=self.group)
        return {n: grads[n].to(args[n].dtype) for n in grads}


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cp: ContextParallel, static: dict, names: tuple, *tensors):
        args = {**static, **dict(zip(names, tensors))}
        outputs, states = cp._forward(args)
        # the states' values are the saved statistics; their arguments (chunk copies) are not kept
        ctx.states = [replace(st, args={}) for st in states]
        ctx.cp, ctx.static, ctx.names, ctx.layout = cp, static, names, cp._last
        ctx.save_for_backward(*tensors, *outputs)
        return outputs

    @staticmethod
    def backward(ctx, *seeds):
        stored = ctx.saved_tensors
        n = len(ctx.names)
        args = {**ctx.static, **dict(zip(ctx.names, stored[:n]))}
        grads = ctx.cp._backward(args, ctx.layout, stored[n:], ctx.states,
                                 tuple(None if s is None else s.contiguous() for s in seeds))
        return (None, None, None, *(grads.get(x) if t.requires_grad else None for x, t in zip(ctx.names, stored[:n])))


def _accumulator(t: torch.Tensor) -> torch.Tensor:
    """Zeros to sum gradients into, in fp32 or finer."""
    return torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)


def _with_length(shape: torch.Size, axis: int, length: int) -> list[int]:
    return [length if i == axis else s for i, s in enumerate(shape)]


def _cut(t: torch.Tensor, axis: int, spans: list[tuple[int, int]], j: int) -> torch.Tensor:
    """Chunk j of a shard made of `spans`, as a view of `t`."""
    return t.narrow(axis, shard_length(spans[:j]), spans[j][1] - spans[j][0])


def _narrowed(travel: dict[str, torch.Tensor], ring: Ring, spans: list[tuple[int, int]], j: int) -> dict:
    return {n: _cut(t, ring.sides[n].axis, spans, j) for n, t in travel.items()}


def _comm_device(group) -> torch.device:
    """Where a collective's tensors live: CUDA for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
