"""The outputs of a launch, as the interpreter returns them: shared by every kernel."""
from __future__ import annotations

import torch

from einsum_ir.ir import Cascade


def collect_outputs(cascade: Cascade, buffers: dict, out_dtype: torch.dtype):
    """The cascade's outputs from the stage buffers, in `out_dtype`: one tensor or a tuple in
    output order, like `ei.interpret`."""
    outs = []
    for name in cascade.output_names:
        t = buffers[name]
        outs.append(t.to(out_dtype) if t.dtype != out_dtype else t)
    return outs[0] if len(outs) == 1 else tuple(outs)
