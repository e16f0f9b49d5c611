"""Extra columns for the catalog report (`einsum-ir report`): passes and the H100 bound."""
from __future__ import annotations

from einsum_ir.ir import Cascade

from einsum_ir.cost_model import api

# The report's default shape: one batch, 16 heads, 8K queries and keys, head dims 128. GQA
# splits the 16 query heads into 4 groups of 4 (R doubles as a low-rank bias's rank), 2-D
# layouts are 90x90 (8100 tokens), agent attention has 64 agents.
DEFAULT_DIMS = {"B": 1, "H": 16, "P": 8192, "M": 8192, "E": 128, "F": 128, "G": 4, "R": 4,
                "N": 64, "PX": 90, "PY": 90, "MX": 90, "MY": 90}
OTHER_DIM = 128  # any other dim (e.g. selection blocks PB, MB)
INT_PARAM = 64  # runtime int params: windows, strides, block sizes, sink counts
FLOAT_PARAM = 1.0

COLUMN_LEGEND = {
    "passes (M)": "FuseMax passes over the keys M, as written",
    "H100 bound": "roofline lower bound on H100 in bf16, at " + " ".join(f"{d}={n}" for d, n in DEFAULT_DIMS.items())
                  + f" (the dims a variant has; any other dim {OTHER_DIM}, int params {INT_PARAM}, "
                    f"float params {FLOAT_PARAM:g})",
    "binds": "the unit that sets the bound (tensor, vector, sfu, memory), or why there is none",
}


def default_shapes(c: Cascade) -> dict:
    shapes = {d: DEFAULT_DIMS.get(d, OTHER_DIM) for d in c.dims}
    for p in c.params:
        if p.type is not None:
            shapes[p.name] = INT_PARAM if p.type == "int" else FLOAT_PARAM
    return shapes


def report_columns(name: str, cascade: Cascade) -> dict[str, str]:
    """`passes (M)`, `H100 bound` and `binds` for one catalog row; errors become the cell text."""
    try:
        passes = str(api.passes(cascade, rank="M").count)
    except ValueError:
        passes = "-"
    try:
        r = api.roofline(cascade, default_shapes(cascade), device="h100")
        bound, binds = f"{r.bound_s * 1e6:.1f} us", r.binding
    except ValueError as err:  # e.g. a predicate that needs tensor data
        bound, binds = "-", str(err).split(";")[0]
    return {"passes (M)": passes, "H100 bound": bound, "binds": binds}

