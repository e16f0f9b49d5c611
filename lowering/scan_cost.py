"""What a chunked scan does, counted (DESIGN section 5): the cost model's Counts of a ScanPlan.

The cost model counts a cascade as written: a causal linear form's P x M scores, quadratic in N.
The scan does something else, and `ei.counts` and `ei.roofline` count that:
- every Einsum a sweep evaluates, once per sweep that evaluates it (maps are recomputed), and
  the epilogue's;
- per causal term and chunk of n positions: the intra-chunk scores `n x n x E` and values
  `n x n x F` (whole tiles: the causal mask is applied after the product), the inter-chunk
  product `n x E x F` and the state update `n x E x F`, plus the decay factors;
- every input once per sweep that loads it, outputs once, states between sweeps.
With a fixed chunk C this is linear in N: about `N (2C(E+F) + 4EF)` FLOPs per head and term.
"""
from __future__ import annotations

import math
from dataclasses import replace

import sympy

from einsum_ir.cost_model import counts as cm
from einsum_ir.functions import FUNCTIONS
from einsum_ir.ir import Call, Cascade, rank_of, walk
from einsum_ir.lowering.chunked_scan import ScanPlan, Term, chunk_size


def scan_counts(plan: ScanPlan, shapes: dict | None, dtype: str = "bf16", device: str = "h100",
                chunk: int | None = None) -> cm.Counts:
    """The work and traffic of `plan` at `shapes`, with `chunk` positions per chunk (default: the
    one `chunk_size` picks for `device`; symbolic `C` when the token extent is)."""
    c = plan.cascade
    b = cm.bind(c, shapes)
    ext = b.extents
    n = ext["P"]
    if chunk is None:
        chunk = chunk_size({"P": int(n), "M": int(ext["M"])}, device) if n.is_number else sympy.Symbol("C")
    chunk = sympy.sympify(chunk)
    as_written = {e.name: e for e in cm.count(c, shapes, dtype).einsums}
    rows: list[cm.EinsumCounts] = []
    loads: dict[str, int] = {}
    for s in plan.sweeps:
        for name in s.loads:
            loads[name] = loads.get(name, 0) + 1
        term_names = {t.einsum for t in s.terms}
        for e in s.prologue + s.maps + s.reductions:
            if e.name in term_names:
                continue
            rows.append(replace(as_written[e.name], name=f"{e.name} (sweep {s.index})"))
        for t in s.terms:  # a reverse sweep walks every position of either rank
            rows += _term_rows(t, s.index, ext, n if not s.reverse else sympy.Max(n, ext["M"]), chunk, plan)
    if plan.epilogue is not None:
        rows += [replace(as_written[e.name], name=f"{e.name} (epilogue)") for e in plan.epilogue.einsums]
    infos = c.tensors
    size = lambda name: math.prod(ext[r] for r in infos[name].ranks)  # noqa: E731
    inputs = {d.name: size(d.name) * cm.DTYPE_BYTES[d.dtype or dtype] * loads.get(d.name, 1) for d in c.inputs}
    outputs = {o.name: size(o.name) * cm.DTYPE_BYTES[dtype] for o in c.outputs}
    states = {name: size(name) * cm.INTERMEDIATE_BYTES for name in plan.intermediates}
    reloads = [f"{d.name} is read by {loads[d.name]} sweeps" for d in c.inputs if loads.get(d.name, 1) > 1]
    notes = [f"counted as the chunked scan runs it: {len(plan.sweeps)} sweep(s), chunks of {chunk}"] + reloads
    return cm.Counts(tuple(rows), inputs, outputs, states, dtype, tuple(notes))


def _term_rows(t: Term, sweep: int, ext: dict, n, chunk, plan: ScanPlan) -> list[cm.EinsumCounts]:
    """The four products of one causal term, summed over the chunks."""
    grid = math.prod(ext[rank_of(v)] for v in plan.grid)
    e_size = math.prod(ext[rank_of(v)] for v in t.contracted)
    f_size = math.prod(ext[rank_of(v)] for v in t.kept)
    full, tail = sympy.floor(n / chunk), sympy.Mod(n, chunk)
    squares = grid * (full * chunk**2 + tail**2)  # the chunks' n x n score tiles
    rows_ = grid * n
    decay_sfu = _sfu(t.decay) if t.decay is not None else 0
    per = []

    def row(what: str, points, macs, vector=0, sfu=0) -> None:
        per.append(cm.EinsumCounts(f"{t.einsum}: {what} (sweep {sweep})", sympy.expand(points), sympy.expand(points),
                                   sympy.expand(macs), sympy.expand(vector), sympy.expand(sfu)))

    # scores q.k^T, then times the decay and the causal mask: two vector ops per score
    row("intra-chunk scores", squares * e_size, squares * e_size, squares * (2 if t.decay is not None else 1),
        squares * decay_sfu)
    if t.key_f is not None:
        row("intra-chunk values", squares * f_size, squares * f_size)
        row("inter-chunk q.H", rows_ * e_size * f_size, rows_ * e_size * f_size, rows_ * f_size)
        row("state update", rows_ * e_size * f_size, rows_ * e_size * f_size,
            grid * sympy.ceiling(n / chunk) * e_size * f_size, 2 * rows_ * decay_sfu)
    else:
        row("intra-chunk row sums", squares, 0, squares)
        row("inter-chunk q.H", rows_ * e_size, rows_ * e_size, rows_)
        row("state update", rows_ * e_size, 0, 2 * rows_ * e_size, 2 * rows_ * decay_sfu)
    return per


def _sfu(expr) -> int:
    return sum(FUNCTIONS[n.fn].sfu_ops for n in walk(expr) if isinstance(n, Call) and n.fn in FUNCTIONS
               and FUNCTIONS[n.fn].cost == "sfu")


def lowered_counts(c: Cascade, shapes: dict | None, dtype: str = "bf16", device: str = "h100") -> cm.Counts:
    """Counts of what the chosen lowering runs: the scan's when it is a chunked scan, else the
    cascade as written (the key loop evaluates every present point of it)."""
    from einsum_ir.lowering.strategy import choose

    plan, _ = choose(c)
    if isinstance(plan, ScanPlan):
        return scan_counts(plan, shapes, dtype, device)
    return cm.count(c, shapes, dtype)



def lowered_roofline(c: Cascade, shapes: dict, device: str = "h100", dtype: str = "bf16"):
    """The roofline of what the chosen lowering runs (see `lowered_counts`)."""
    from einsum_ir.cost_model.roofline import roofline
    from einsum_ir.lowering.strategy import choose

    plan, _ = choose(c)
    if isinstance(plan, ScanPlan):
        return roofline(c, shapes, device, dtype, counts=scan_counts(plan, shapes, dtype, device))
    return roofline(c, shapes, device, dtype)
