"""The cost model's public entry points; `einsum_ir`'s facade delegates to exactly these."""
from __future__ import annotations

from numbers import Integral
from typing import TYPE_CHECKING

from einsum_ir.ir import Cascade

from einsum_ir.cost_model import counts as _counts
from einsum_ir.cost_model import passes as _passes
from einsum_ir.cost_model import roofline as _roofline
from einsum_ir.cost_model.devices import Device

if TYPE_CHECKING:  # the simulator needs torch; analyze does not, so it is imported when called
    from einsum_ir.cost_model import simulate as _simulate


def passes(cascade: Cascade, rank: str = "M") -> _passes.PassReport:
    """FuseMax pass analysis over `rank`: `.count`, `.boundaries`, `.explanation`."""
    return _passes.analyze(cascade, rank)


def counts(cascade: Cascade, shapes: dict | None = None, dtype: str = "bf16") -> _counts.Counts:
    """Work and traffic per Einsum and in total; dims missing from `shapes` stay symbolic."""
    return _counts.count(cascade, shapes, dtype)


def roofline(cascade: Cascade, shapes: dict, device: str | dict | Device = "h100",
             dtype: str = "bf16") -> _roofline.Roofline:
    """Lower-bound time on `device`, the binding unit, and what each extra pass costs."""
    return _roofline.roofline(cascade, shapes, device, dtype)


def simulate(cascade: Cascade, shapes: dict, device: str | dict | Device = "h100", q_tile: dict | None = None,
             kv_tile: dict | None = None, dtype: str = "bf16") -> _simulate.SimResult:
    """Tile-level sparsity: `.tile_speedup`, `.flop_speedup`, `.estimated_speedup`, `.classes`."""
    for option, tile in (("q_tile", q_tile), ("kv_tile", kv_tile)):
        for rank, size in (tile or {}).items():
            if rank not in cascade.dims:
                raise ValueError(f"{option} {rank}={size}: {rank} is not a dim of the cascade "
                                 f"({', '.join(cascade.dims)})")
            if isinstance(size, bool) or not isinstance(size, Integral) or size < 1:
                raise ValueError(f"{option} {rank}={size}: a tile size is a positive integer")
    from einsum_ir.cost_model import simulate as _simulate

    return _simulate.simulate(cascade, shapes, device, q_tile, kv_tile, dtype)
