"""Columns the catalog report shows for each variant: the tiled CPU path's max error against
the interpreter at a small shape (or why it does not apply), fused or not (and why), the sm_90
registers / spills of the generated kernel at head dims 64 and 128 (AOT, cached on disk), and
the launch config the autotuner's pruning picks for H100 at head dim 64 ("pruned-best": the
best estimate that compiles without spills; no GPU timing)."""
from __future__ import annotations

from einsum_ir.errors import LoweringError
from einsum_ir.ir import Cascade, Name
from einsum_ir.lowering.groups import groupings

DEFAULT_SHAPES = {"B": 1, "H": 8, "G": 2, "R": 4, "N": 64, "P": 4096, "M": 4096,
                  "PX": 64, "PY": 64, "MX": 64, "MY": 64, "PB": 64, "MB": 64}
OTHER_DIM = 16
DEFAULT_GROUP = 16  # keys per group of a grouped reduction (landmark's block): divides every key tile


def default_shapes(cascade: Cascade, head_dim: int) -> dict:
    """Dims of the report's shapes, and a group size (a constexpr of Triton's key tiles) for each
    grouped reduction's parameter."""
    shapes = {}
    for d in cascade.dims:
        if d in ("E", "F"):
            shapes[d] = head_dim
        else:
            shapes[d] = DEFAULT_SHAPES.get(d, OTHER_DIM)
    for g in groupings(cascade).values():
        if isinstance(g.size, Name):
            shapes.setdefault(g.size.name, DEFAULT_GROUP)
    return shapes


CONFIG_COLUMN = "config (h100, pruned-best)"
COLUMN_LEGEND = {
    "cpu path": "max abs error of the tiled CPU path against the interpreter on small inputs, "
                "or why it does not apply",
    "fused": "whether a generated Triton kernel exists, or why not",
    "sm90_d64": "registers/spills per thread of that kernel compiled ahead of time for sm_90, "
                "head dims 64, at " + " ".join(f"{d}={n}" for d, n in DEFAULT_SHAPES.items())
                + f" (the dims a variant has; any other dim {OTHER_DIM})",
    "sm90_d128": "the same at head dims 128",
    CONFIG_COLUMN: "the launch config (query x key tile, warps, stages) the autotuner's pruning "
                   "picks for H100 at head dims 64, untimed; for a chunked scan its chunk, feature "
                   "block and warps",
}


def cpu_path_cell(name: str, cascade: Cascade) -> str:
    """Max |CPU path - interpreter| on the catalog's small example inputs."""
    from einsum_ir.interpreter import interpret
    from einsum_ir.codegen.cpu_emit import compile_cpu
    from einsum_ir.variants.formulas import example_args, max_error

    try:
        kern = compile_cpu(cascade)
    except LoweringError as err:
        return f"no: {err}"
    args = example_args(name, size="rect")
    return f"{max_error(kern(**args), interpret(cascade, **args)):.1e}"


def report_columns(name: str, cascade: Cascade, aot: bool = True) -> dict[str, str]:
    """{"cpu path": "<max error>" | "no: <reason>", "fused": "yes" | "no: <reason>",
    "sm90_d64": "regs/spills", "sm90_d128": ..., CONFIG_COLUMN: "128x64 w8 s2"}."""
    cpu = {"cpu path": cpu_path_cell(name, cascade)}
    return cpu | _triton_columns(cascade, aot)


def _triton_columns(cascade: Cascade, aot: bool) -> dict[str, str]:
    try:
        from einsum_ir.codegen.kernel import compile_triton

        kern = compile_triton(cascade)
    except LoweringError as err:
        return {"fused": f"no: {err}", "sm90_d64": "-", "sm90_d128": "-", CONFIG_COLUMN: "-"}
    cols = {"fused": "yes"}
    for d in (64, 128):
        key = f"sm90_d{d}"
        if not aot:
            cols[key] = "n/a"
            continue
        try:
            u = kern.resource_usage(default_shapes(cascade, d), dtype="bf16", target="sm_90")
            cols[key] = f"{u['registers']}/{u['spills']}"
        except ImportError:
            cols[key] = "n/a"
        except Exception as err:  # a compile failure is worth showing, not hiding
            cols[key] = f"error: {type(err).__name__}"
    cols[CONFIG_COLUMN] = _config_cell(kern, default_shapes(cascade, 64), aot)
    return cols


def _config_cell(kern, shapes: dict, aot: bool) -> str:
    try:
        return kern.launch_summary(shapes, "h100", aot=aot)
    except ImportError:
        return "n/a"
    except Exception as err:  # noqa: BLE001 - as above: a failure is worth showing
        return f"error: {type(err).__name__}"
