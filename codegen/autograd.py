"""Autograd for generated kernels: the training forward saves O(N) statistics and the fused
backward kernels derived by `ei.grad` (lowering/grad.py) read them.

A kernel called on tensors that require grad records one autograd node (`record`): its
forward runs the training forward (the lowered cascade plus its saved carried values, kept in
fp32); its backward runs the prologue (the row statistics: a few tensor ops per row, through
the interpreter), the backward kernel (one program per key tile, streaming the queries),
compiled by the same backend as the forward, and the epilogue, if any (contributions the kernel
returns apart, such as those of an input read at both token ranks, added: through the
interpreter). A cascade with no derivable backward
falls back to recomputation through the reference interpreter under autograd (exact, but
O(N^2) memory), with the reason logged at WARNING once.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cached_property

import torch

from einsum_ir.errors import LoweringError
from einsum_ir.interpreter import interpret
from einsum_ir.ir import Cascade
from einsum_ir.lowering.grad import Gradient, grad

log = logging.getLogger("einsum_ir")

# backend kernel constructor: (cascade, the tensors it holds in fp32) -> kernel(**args)
Compiler = Callable[[Cascade, frozenset], Callable]


@dataclass
class Training:
    """A cascade's training kernels on one backend, built on first use."""

    cascade: Cascade
    compiler: Compiler

    @cached_property
    def gradient(self) -> Gradient:
        return grad(self.cascade)

    @cached_property
    def forward(self) -> Callable:
        return self.compiler(self.gradient.forward, self.gradient.fp32)

    @cached_property
    def backward(self) -> tuple[Callable, ...]:
        return tuple(self.compiler(b, self.gradient.fp32) for b in self.gradient.backward)

    def build(self) -> None:
        """Derive and compile everything now (raises LoweringError when there is no fused backward)."""
        _ = self.forward, self.backward


def training_forward(t: Training, args: Mapping) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """(the cascade's outputs, the saved values by name) for one call."""
    g = t.gradient
    outs = t.forward(**args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return outs[:len(g.outputs)], dict(zip(g.saved, outs[len(g.outputs):]))


def run_backward(t: Training, args: Mapping, outputs: tuple, saved: Mapping, seeds: tuple) -> dict[str, torch.Tensor]:
    """Input name -> gradient, from the outputs' gradients `seeds` (None: zero)."""
    g = t.gradient
    values = dict(args)
    values.update(saved)
    values.update(zip(g.outputs, outputs))
    for o, out, seed in zip(g.outputs, outputs, seeds):
        values[g.seeds[o]] = torch.zeros_like(out) if seed is None else seed
    runtime = {n: args[n] for n in (p.name for p in t.cascade.params if p.type is not None)}
    declared = lambda c: {p.name: runtime[p.name] for p in c.params if p.type is not None}  # noqa: E731
    if g.prologue is not None:  # per-row values: a few tensor ops over (rows x head dim), in fp32 or finer
        result = interpret(g.prologue, **{d.name: _at_least_fp32(values[d.name]) for d in g.prologue.inputs},
                           **declared(g.prologue))
        values.update(zip(g.prologue.output_names, result if isinstance(result, tuple) else (result,)))
    for kern, b in zip(t.backward, g.backward):
        result = kern(**{d.name: values[d.name] for d in b.inputs}, **declared(b))
        values.update(zip(b.output_names, result if isinstance(result, tuple) else (result,)))
    if g.epilogue is not None:  # contributions the kernel returns apart, added: O(N) values
        result = interpret(g.epilogue, **{d.name: values[d.name] for d in g.epilogue.inputs})
        values.update(zip(g.epilogue.output_names, result if isinstance(result, tuple) else (result,)))
    grads = {x: values[name].to(args[x].dtype) for x, name in g.grads.items()}
    for x in g.zero:
        grads[x] = torch.zeros_like(args[x])
    return grads


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32)) if t.is_floating_point() else t


def recompute_gradients(cascade: Cascade, args: Mapping, seeds: tuple) -> dict[str, torch.Tensor]:
    """Input name -> gradient by running the reference interpreter under autograd (the fallback)."""
    with _autograd_recording():
        leaves = {k: (v.detach().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in args.items()}
        outs = interpret(cascade, **leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, s) for o, s in zip(outs, seeds) if s is not None]
        wanted = [k for k in cascade.input_names if isinstance(leaves[k], torch.Tensor) and leaves[k].requires_grad]
        found = torch.autograd.grad([o for o, _ in pairs], [leaves[k] for k in wanted], [s for _, s in pairs],
                                    allow_unused=True)
    return {k: torch.zeros_like(args[k]) if g is None else g for k, g in zip(wanted, found)}


def _autograd_recording() -> ExitStack:
    """Let autograd record, even inside a custom op's implementation.

    torch.library runs an implementation below the Autograd dispatch keys (they are in the
    thread-local exclude set), so a recomputation there builds no graph. This lifts the
    exclusion of the Autograd keys only (autocast stays excluded) and turns grad mode on.
    """
    keys = torch._C.DispatchKey
    autograd = (torch._C.DispatchKeySet(keys.AutogradFunctionality) |
                torch._C.DispatchKeySet(keys.AutogradOther) |
                torch._C.DispatchKeySet(keys.AutogradNestedTensor))
    stack = ExitStack()
    stack.enter_context(torch._C._ForceDispatchKeyGuard(
        torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set() - autograd))
    stack.enter_context(torch.enable_grad())
    return stack


def wants_grad(args: Mapping) -> bool:
    """Whether a call should record an autograd node."""
    return torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in args.values())


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, training: Training, static: dict, names: tuple, *tensors):
        args = {**static, **dict(zip(names, tensors))}
        outputs, saved = training_forward(training, args)
        ctx.training, ctx.static, ctx.names, ctx.saved_names = training, static, names, tuple(saved)
        ctx.n_outputs = len(outputs)
        ctx.save_for_backward(*tensors, *outputs, *saved.values())
        return outputs

    @staticmethod
    def backward(ctx, *seeds):
        stored = ctx.saved_tensors
        n, k = len(ctx.names), ctx.n_outputs
        args = {**ctx.static, **dict(zip(ctx.names, stored[:n]))}
        grads = run_backward(ctx.training, args, stored[n:n + k], dict(zip(ctx.saved_names, stored[n + k:])),
                             tuple(s.contiguous() if s is not None else None for s in seeds))
        return (None, None, None, *(grads.get(x) if t.requires_grad else None
                                    for x, t in zip(ctx.names, stored[:n])))


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: Callable, cascade: Cascade, static: dict, names: tuple, *tensors):
        args = {**static, **dict(zip(names, tensors))}
        outs = kernel(**args)
        ctx.cascade, ctx.static, ctx.names = cascade, static, names
        ctx.save_for_backward(*tensors)
        return outs if isinstance(outs, tuple) else (outs,)

    @staticmethod
    def backward(ctx, *seeds):
        tensors = ctx.saved_tensors
        args = {**ctx.static, **dict(zip(ctx.names, tensors))}
        grads = recompute_gradients(ctx.cascade, args, seeds)
        return (None, None, None, None, *(grads.get(x) if t.requires_grad else None
                                          for x, t in zip(ctx.names, tensors)))


def record(kernel, training: Training, run: Callable[[dict], object], args: dict):
    """Call `run(args)` as one differentiable node: fused backward when `training` builds, else
    recomputation (the reason logged at WARNING, once per kernel)."""
    names = tuple(k for k, v in args.items() if isinstance(v, torch.Tensor))
    static = {k: v for k, v in args.items() if k not in names}
    try:
        training.build()
    except LoweringError as err:
        if not getattr(kernel, "_warned_backward", False):
            kernel._warned_backward = True
            log.warning("no fused backward for this cascade; gradients recompute it through the "
                        "reference interpreter (O(N^2) memory): %s", err)
        outs = _Recomputed.apply(lambda **a: run(a), training.cascade, static, names, *(args[k] for k in names))
    else:
        outs = _Fused.apply(training, static, names, *(args[k] for k in names))
    return outs[0] if len(outs) == 1 else tuple(outs)
