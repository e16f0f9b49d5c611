"""The outputs of a launch, as the interpreter returns them: shared by every kernel."""
from __future__ import annotations

import torch

from einsum_ir.ir import Cascade


def collect_outputs(cascade: Cascade, buffers: dict, out_dtype: torch.dtype, fp32: frozenset = frozenset()):
    """The cascade's outputs from the stage buffers, in `out_dtype` (those in `fp32` in at least
    fp32: statistics saved for a backward): one tensor or a tuple in output order, like `ei.interpret`."""
    outs = []
    for name in cascade.output_names:
        t = buffers[name]
        want = torch.promote_types(out_dtype, torch.float32) if name in fp32 else out_dtype
        outs.append(t.to(want) if t.dtype != want else t)
    return outs[0] if len(outs) == 1 else tuple(outs)


def interpreted(cascade: Cascade, args: dict, fp32: frozenset = frozenset()):
    """A call's outputs from the interpreter, as a kernel returns them. For a call with an empty
    rank (P=0, M=0, E=0, ...): it has nothing to launch, and the reference semantics say which
    outputs are absent (their fill) and which are empty, so every backend agrees."""
    from einsum_ir.interpreter import interpret

    outs = interpret(cascade, **args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return collect_outputs(cascade, dict(zip(cascade.output_names, outs)), outs[0].dtype, fp32)


def run_epilogue(epilogue: Cascade | None, buffers: dict, params: dict) -> None:
    """A chunked scan's outputs over no token rank (sums across programs of their per-program
    states: the backward's gradient of a per-head decay), into `buffers`, by the interpreter:
    a few ops on tensors of grid size."""
    if epilogue is None:
        return
    from einsum_ir.interpreter import interpret

    outs = interpret(epilogue, **{n: buffers[n] for n in epilogue.input_names},
                     **{p.name: params[p.name] for p in epilogue.params if p.type is not None})
    buffers.update(zip(epilogue.output_names, outs if isinstance(outs, tuple) else (outs,)))
