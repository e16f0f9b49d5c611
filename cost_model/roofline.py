"""Roofline lower bound: time = max over tensor cores, vector units, SFU and memory.

The one-pass bound counts compulsory traffic only. Each extra pass over the key rank costs
more (DESIGN section 5): the M-fibers it revisits were produced by an earlier pass, so it must
either re-read the inputs and recompute them, or spill them to memory and read them back. Both
options are costed per pass from the cascade, and the cheaper one enters the bound.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from einsum_ir.graph import einsum_reads, is_carried_read
from einsum_ir.ir import Cascade, index_vars

from einsum_ir.cost_model import counts as cm
from einsum_ir.cost_model import passes as pm
from einsum_ir.cost_model.devices import Device, get

UNITS = ("tensor", "vector", "sfu", "memory")


@dataclass(frozen=True)
class Work:
    macs: float = 0.0
    vector_ops: float = 0.0
    sfu_ops: float = 0.0
    bytes: float = 0.0

    def __add__(self, o: "Work") -> "Work":
        return Work(self.macs + o.macs, self.vector_ops + o.vector_ops, self.sfu_ops + o.sfu_ops,
                    self.bytes + o.bytes)

    def times(self, d: Device, dtype: str) -> dict[str, float]:
        return {"tensor": 2 * self.macs / d.tensor_rate(dtype), "vector": self.vector_ops / d.vector_ops,
                "sfu": self.sfu_ops / d.sfu_ops, "memory": self.bytes / d.hbm_bandwidth}


@dataclass(frozen=True)
class PassCost:
    """What pass `index` costs beyond the first, by each way to get its M-fibers back."""

    index: int
    reread: dict[str, float]  # inputs read again (bytes)
    recompute: Work  # re-read + recomputed work of the earlier Einsums it needs
    recomputed: tuple[str, ...]
    spill: Work  # write + read back of the intermediates it reads, plus inputs it re-reads
    spilled: tuple[str, ...]
    fiber_bytes: float  # one query row's M-fiber of the spilled tensors (the on-chip option)
    choice: str  # "recompute" or "spill"

    @property
    def chosen(self) -> Work:
        return self.recompute if self.choice == "recompute" else self.spill


@dataclass(frozen=True)
class Roofline:
    device: Device
    dtype: str
    passes: pm.PassReport
    counts: cm.Counts
    one_pass: dict[str, float]  # seconds per unit, compulsory traffic only
    times: dict[str, float]  # seconds per unit, with every extra pass
    pass_costs: tuple[PassCost, ...]

    @property
    def bound_s(self) -> float:
        return max(self.times.values())

    @property
    def binding(self) -> str:
        return max(self.times, key=self.times.get)

    @property
    def one_pass_bound_s(self) -> float:
        return max(self.one_pass.values())

    def __str__(self) -> str:
        d = self.device
        rate = {"tensor": f"{d.tensor_rate(self.dtype) / 1e12:g} TFLOP/s {self.dtype}",
                "vector": f"{d.vector_ops / 1e12:g} Top/s", "sfu": f"{d.sfu_ops / 1e12:g} Top/s",
                "memory": f"{d.hbm_bandwidth / 1e12:g} TB/s"}
        rows = [(u, rate[u], _us(self.one_pass[u]), _us(self.times[u]), "<- binds" if u == self.binding else "")
                for u in UNITS]
        out = [f"Roofline on {d.name}: lower bound {_us(self.bound_s)}, bound by {self.binding}",
               cm.table(("unit", "peak", "1 pass", f"{self.passes.count} pass(es)", ""), rows)]
        for pc in self.pass_costs:
            out.append(f"pass {pc.index}: re-read {_names(pc.reread)} and recompute {', '.join(pc.recomputed) or '-'} "
                       f"({cm.fmt(pc.recompute.bytes)}B, {cm.fmt(pc.recompute.macs)} MACs, "
                       f"{_us(max(pc.recompute.times(d, self.dtype).values()))})"
                       f" | spill {', '.join(pc.spilled) or '-'} ({cm.fmt(pc.spill.bytes)}B, "
                       f"{_us(max(pc.spill.times(d, self.dtype).values()))}) -> {pc.choice}")
            if pc.fiber_bytes:
                rows_fit = int(d.onchip_bytes_per_sm // pc.fiber_bytes)
                out.append(f"  or buffer the M-fiber on chip: {cm.fmt(pc.fiber_bytes)}B per query row, "
                           f"{rows_fit} row(s) fit in one SM's shared memory + registers")
        return "\n".join(out)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1 else f"{seconds:.3f} s"


def _names(sizes: dict[str, float]) -> str:
    return ", ".join(f"{n} ({cm.fmt(b)}B)" for n, b in sizes.items()) or "nothing"


def _num(x) -> float:
    x = sympy.sympify(x)
    if not x.is_number:
        raise ValueError(f"the roofline needs every dim and param bound; {x} still has "
                         f"{', '.join(sorted(map(str, x.free_symbols)))}")
    return float(x)


def roofline(c: Cascade, shapes: dict, device: str | dict | Device = "h100", dtype: str = "bf16",
             rank: str = "M", counts: cm.Counts | None = None) -> Roofline:
    """The bound of the cascade as written, each extra pass costed; or, given `counts` of what a
    lowering runs (every sweep of it counted), the bound of those counts alone."""
    d = get(device)
    lowered = counts is not None
    counts = counts if lowered else cm.count(c, shapes, dtype)
    report = pm.analyze(c, rank)
    base = Work(_num(counts.macs), _num(counts.vector_ops), _num(counts.sfu_ops), _num(counts.compulsory_bytes))
    extents = cm.bind(c, shapes).extents
    extra = () if lowered else range(2, report.count + 1)
    costs = tuple(_pass_cost(c, counts, extents, report, k, d, dtype) for k in extra)
    total = base
    for pc in costs:
        total = total + pc.chosen
    return Roofline(d, dtype, report, counts, base.times(d, dtype), total.times(d, dtype), costs)


def _pass_cost(c: Cascade, counts: cm.Counts, extents: dict, report: pm.PassReport, k: int, d: Device,
               dtype: str) -> PassCost:
    rvars = pm.rank_vars(c, report.ranks)
    width = cm.DTYPE_BYTES[dtype]
    inputs = {x.name for x in c.inputs}
    first_read: dict[str, int] = {}
    for e in c.einsums:
        for a in einsum_reads(e):
            if a.tensor in inputs:
                first_read[a.tensor] = min(first_read.get(a.tensor, k), report.assignment.get(e.name, 0))
    here = [e for e in c.einsums if report.assignment.get(e.name) == k]
    # The M-fibers pass k reads that an earlier pass produced.
    frontier = {a.tensor for e in here for a in einsum_reads(e)
                if not is_carried_read(c, a) and set(index_vars(a)) & rvars
                and a.tensor not in inputs and 0 < report.assignment.get(a.tensor, 0) < k}
    direct = {a.tensor for e in here for a in einsum_reads(e)
              if a.tensor in inputs and set(index_vars(a)) & rvars and first_read[a.tensor] < k}
    # Recompute: walk the frontier's streaming producers back to the inputs.
    recomputed, rereads, todo = [], set(direct), list(frontier)
    while todo:
        name = todo.pop()
        if name in recomputed:
            continue
        recomputed.append(name)
        for a in einsum_reads(c.einsum(name)):
            if a.tensor in inputs:
                if set(index_vars(a)) & rvars:
                    rereads.add(a.tensor)
            elif set(index_vars(a)) & rvars and report.assignment.get(a.tensor, 0) < k:
                todo.append(a.tensor)
    reread = {n: _num(counts.input_bytes[n]) for n in sorted(rereads)}
    work = Work()
    for name in recomputed:
        ec = counts.einsum(name)
        work = work + Work(_num(ec.macs), _num(ec.vector_ops), _num(ec.sfu_ops))
    recompute = work + Work(bytes=sum(reread.values()))
    spill_bytes = sum(2 * _num(counts.footprints[n]) * width / cm.INTERMEDIATE_BYTES for n in frontier)
    spill = Work(bytes=spill_bytes + sum(_num(counts.input_bytes[n]) for n in direct))
    fiber = sum(_fiber(c, extents, n, rvars) for n in frontier)
    t = lambda w: max(w.times(d, dtype).values())  # noqa: E731
    choice = "recompute" if t(recompute) <= t(spill) else "spill"
    return PassCost(k, reread, recompute, tuple(sorted(recomputed)), spill, tuple(sorted(frontier)),
                    fiber, choice)


def _fiber(c: Cascade, extents: dict, name: str, rvars: set[str]) -> float:
    """Bytes (fp32) of one fiber of `name` along the key ranks: one query row's worth."""
    keys = [r for r in c.tensors[name].ranks if r.lower() in rvars]
    size = 1.0
    for r in keys:
        size *= _num(extents[r])
    return cm.INTERMEDIATE_BYTES * size
