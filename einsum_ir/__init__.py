"""einsum-ir: attention variants as cascades of extended Einsums.

The IR layer: ranks, tensors, Einsums and cascades; the spec language (`parse`, `load`,
`str(cascade)`); the Python builder; validation; the dependency graph; the reference
interpreter; and the variant catalog. Upper layers (cost model, lowering, codegen) are
reached through the facade functions below, which import them lazily.
"""
from __future__ import annotations

from einsum_ir import variants
from einsum_ir.errors import BindError, LoweringError, SpecError
from einsum_ir.ir import Cascade, Einsum
from einsum_ir.parser import load, parse

__all__ = [
    "BindError", "Cascade", "Einsum", "LoweringError", "SpecError",
    "compile", "context_parallel", "counts", "from_torch", "grad", "interpret", "load", "merge", "parse", "passes",
    "roofline", "simulate",
    "variants",
]


# The facade: one call per job. Upper layers are imported on first use, so `import einsum_ir`
# stays light and the layering (einsum_ir <- cost_model <- lowering <- codegen) holds.

def interpret(cascade: Cascade, **args):
    """The reference interpreter (`einsum_ir.interpreter`; imported on first use, since it
    needs torch): inputs and runtime params by name; one tensor, or a tuple in output order."""
    from einsum_ir.interpreter import interpret as run

    return run(cascade, **args)


def passes(cascade: Cascade, rank: str = "M"):
    """FuseMax pass analysis over `rank`: `.count`, `.boundaries`, `.explanation`."""
    from einsum_ir.cost_model.api import passes as run

    return run(cascade, rank=rank)


def counts(cascade: Cascade, shapes: dict, dtype: str = "bf16", as_written: bool = False):
    """Work and traffic per Einsum and in total: MACs, vector and SFU ops, bytes. Counted as
    the chosen lowering runs it (a chunked scan's chunks and states: linear in N), or, with
    `as_written`, every present point of the cascade as written."""
    if as_written:
        from einsum_ir.cost_model.api import counts as run

        return run(cascade, shapes, dtype=dtype)
    from einsum_ir.lowering.scan_cost import lowered_counts

    return lowered_counts(cascade, shapes, dtype)


def roofline(cascade: Cascade, shapes: dict, device: str = "h100", dtype: str = "bf16", as_written: bool = False):
    """Lower-bound time on `device` and the binding unit, of what the chosen lowering runs
    (or, with `as_written`, of the cascade as written and its passes)."""
    from einsum_ir.cost_model.api import roofline as run

    if as_written:
        return run(cascade, shapes, device=device, dtype=dtype)
    from einsum_ir.lowering.scan_cost import lowered_roofline

    return lowered_roofline(cascade, shapes, device, dtype)


def simulate(cascade: Cascade, shapes: dict, device: str = "h100", q_tile: dict | None = None,
             kv_tile: dict | None = None, dtype: str = "bf16"):
    """Tile-level sparsity simulation: `.tile_speedup`, `.flop_speedup`, `.estimated_speedup`."""
    from einsum_ir.cost_model.api import simulate as run

    return run(cascade, shapes, device=device, q_tile=q_tile, kv_tile=kv_tile, dtype=dtype)


def grad(cascade: Cascade):
    """Reverse-mode differentiation as a cascade transformation: `.forward` (the training forward,
    saving O(N) values), `.prologue` and `.backward` (cascades), `.grads` (input -> gradient)."""
    from einsum_ir.lowering.grad import grad as run

    return run(cascade)


def merge(cascade: Cascade, states):
    """The partial state over the union of `states` (each from `kern.partial(keys=(lo, hi), ...)`
    of a kernel of `cascade`, over disjoint key ranges), merged exactly; `.finalize()` it."""
    from einsum_ir.codegen.partial import merge as run

    return run(cascade, states)


def compile(cascade: Cascade, backend: str = "auto", split_kv: int | None = None):  # noqa: A001 - the API's chosen name
    """A callable kernel for `cascade`: backend "auto", "triton", "cpu" or "reference";
    `split_kv` splits the keys of every call (None: as the cost model picks per shape)."""
    from einsum_ir.codegen.api import compile as run

    return run(cascade, backend=backend, split_kv=split_kv)


def context_parallel(cascade: Cascade, group=None, layout: str = "zigzag", query: str | None = None,
                     backend: str = "auto"):
    """Ring attention over the ranks of a torch.distributed `group`: `cp(**local_shards)` gives this
    rank's output shard; `cp.shard(name, full)` and `cp.unshard(out)` do the layout
    ("zigzag" or "contiguous"). Any cascade whose partial states merge; trains through its
    fused backward."""
    from einsum_ir.codegen.ring import ContextParallel

    return ContextParallel(cascade, group=group, layout=layout, query=query, backend=backend)


def from_torch(module_or_fn, *example_inputs, **options) -> Cascade:
    """Raise plain-PyTorch attention into a cascade via torch-mlir (the `mlir` extra)."""
    from einsum_ir.frontends.mlir_import import from_torch as run

    return run(module_or_fn, *example_inputs, **options)
