"""Argument binding shared by the interpreter and the generated kernels: one check of the
inputs' shapes and one definition of what a derived param (`param scale = 1/sqrt(E)`) evaluates
to, so every backend sees the same extents and scalars.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from einsum_ir.errors import BindError
from einsum_ir.functions import FUNCTIONS, torch_function, torch_operator
from einsum_ir.ir import Binary, Call, Cascade, Expr, Name, Num, Unary, rank_of


def evaluate_params(cascade: Cascade, extents: Mapping[str, int],
                    runtime: Mapping[str, object]) -> dict[str, float | int]:
    """Every param of `cascade`: runtime ones (`param W: int`) converted from `runtime` (ints,
    floats or 0-dim tensors), derived ones evaluated in spec order over the extents and earlier
    params. `runtime` must hold exactly the runtime params; raises BindError otherwise."""
    env: dict[str, float | int] = dict(extents)
    out: dict[str, float | int] = {}
    for p in cascade.params:
        if p.type is not None:
            if p.name not in runtime:
                raise BindError(f"missing param {p.name} ({p.type})")
            value = runtime[p.name]
            value = value.item() if isinstance(value, torch.Tensor) else value
            out[p.name] = int(value) if p.type == "int" else float(value)
        else:
            if p.name in runtime:
                raise BindError(f"param {p.name} is derived in the spec and cannot be passed")
            out[p.name] = _scalar(p.expr, env).item()
        env[p.name] = out[p.name]
    return out


def bind_shapes(cascade: Cascade, args: dict) -> tuple[dict, dict[str, int]]:
    """The input tensors and dims popped from `args` -> (tensors, rank extents). Raises
    BindError on a missing input, a non-tensor, a wrong number of dims or two different extents
    of one rank."""
    tensors, extents, where = {}, {}, {}
    for d in cascade.inputs:
        if d.name not in args:
            raise BindError(f"missing input tensor {d.name}; the cascade takes {', '.join(cascade.input_names)}")
        t = args.pop(d.name)
        if not isinstance(t, torch.Tensor):
            raise BindError(f"input {d.name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != len(d.indices):
            raise BindError(f"input {d.name}[{', '.join(d.indices)}] has {len(d.indices)} dims, but the "
                            f"tensor given has shape {tuple(t.shape)}")
        for k, idx in enumerate(d.indices):
            r = rank_of(idx)
            if r in extents and extents[r] != t.shape[k]:
                raise BindError(f"rank {r} is {extents[r]} in {where[r]} but {t.shape[k]} in {d.name} (dim {k})")
            extents[r], where[r] = int(t.shape[k]), f"{d.name} (dim {k})"
        tensors[d.name] = t
    for d in cascade.dims:
        if d in args:
            size = int(args.pop(d))
            if d in extents and extents[d] != size:
                raise BindError(f"rank {d}={size} given, but {where[d]} has {extents[d]}")
            extents[d] = size
    return tensors, extents


def bind_arguments(cascade: Cascade, args: dict) -> tuple[dict, dict[str, int], dict[str, float | int]]:
    """A generated kernel's call arguments -> (input tensors, rank extents, params); `args` is
    consumed. Raises BindError on a missing, mis-shaped or unexpected argument."""
    tensors, extents = bind_shapes(cascade, args)
    unbound = [d for d in cascade.dims if d not in extents]
    if unbound:
        raise BindError(f"rank(s) {', '.join(unbound)} not bound by any input; pass e.g. {unbound[0]}=128")
    for s in cascade.splits:
        args.pop(s.inner, None)
    runtime = {p.name: args.pop(p.name) for p in cascade.params if p.name in args}
    params = evaluate_params(cascade, extents, runtime)
    if args:
        raise BindError(f"unexpected argument(s) {', '.join(args)}")
    return tensors, extents, params




def _const(value: float) -> torch.Tensor:
    # fp64 so a derived scale is rounded once, when a backend casts it to its compute dtype
    return torch.tensor(value, dtype=torch.int64 if isinstance(value, int) else torch.float64)


def _scalar(expr: Expr, env: Mapping[str, float | int]) -> torch.Tensor:
    """A 0-dim tensor; torch ops (the functions table's own) keep ints as ints like the spec."""
    if isinstance(expr, Num):
        return _const(expr.value)
    if isinstance(expr, Name):
        return _const(env[expr.name])
    if isinstance(expr, Unary) and expr.op == "-":
        return -_scalar(expr.operand, env)
    if isinstance(expr, Binary):
        a, b = _scalar(expr.lhs, env), _scalar(expr.rhs, env)
        return torch_operator(expr.op)(a.double() if expr.op == "/" else a, b)
    if isinstance(expr, Call) and expr.fn in FUNCTIONS:
        args = [_scalar(a, env) for a in expr.args]
        if expr.fn not in ("max", "min"):
            args = [a.double() for a in args]
        return torch_function(expr.fn)(*args)
    raise BindError("a param must be a scalar")
