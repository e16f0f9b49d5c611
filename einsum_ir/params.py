"""Argument binding shared by the interpreter and the generated kernels: one check of the
inputs' shapes and of their dtype (one, by torch's promotion), of the runtime params by their declared type, and one definition of
what a derived param (`param scale = 1/sqrt(E)`) evaluates to, so every backend sees the same
extents and scalars and rejects the same arguments (docs/spec.md, "Calling a cascade").
"""
from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping
from functools import reduce
from typing import TYPE_CHECKING

from einsum_ir.builtins import PREDICATES
from einsum_ir.errors import BindError, located
from einsum_ir.functions import FUNCTIONS, torch_function, torch_operator
from einsum_ir.ir import Access, Binary, Call, Cascade, Expr, Index, Name, Num, Param, Unary, rank_of, walk
from einsum_ir.printer import print_expr
from einsum_ir.validate import cross_rank_mismatch

if TYPE_CHECKING:  # torch is imported where tensors are bound: `runtime_value` serves the
    import torch   # torch-free cost model too (einsum-ir analyze checks params the same way)

INT64 = (-(1 << 63), (1 << 63) - 1)


def runtime_value(p: Param, value: object) -> int | float:
    """A runtime param's call-time value (a number or a one-element tensor), checked by its
    declared type: `int` takes an integer (8 or 8.0, never 2.5: nothing is truncated) that fits
    in int64, `float` a finite number. Raises BindError naming the param otherwise."""
    torch = sys.modules.get("torch")  # a tensor exists only if torch is imported
    if torch is not None and isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise BindError(f"param {p.name} ({p.type}) takes one number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BindError(f"param {p.name} ({p.type}) takes a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise BindError(f"param {p.name}={value!r}: {'an int' if p.type == 'int' else 'a float'} param takes a finite number")
    if p.type == "float":
        return float(value)
    if not isinstance(value, numbers.Integral) and not float(value).is_integer():
        raise BindError(f"param {p.name}={value!r}: declared int, so it takes an integer; round it "
                        f"yourself (e.g. {p.name}={round(value)}) or declare 'param {p.name}: float'")
    if not INT64[0] <= int(value) <= INT64[1]:
        raise BindError(f"param {p.name}={value!r}: an int param takes an integer that fits in int64 "
                        f"({INT64[0]} to {INT64[1]})")
    return int(value)


def evaluate_params(cascade: Cascade, extents: Mapping[str, int],
                    runtime: Mapping[str, object]) -> dict[str, float | int]:
    """Every param of `cascade`: runtime ones (`param W: int`) checked by `runtime_value`,
    derived ones evaluated in spec order over the extents and earlier params, each finite (a
    located BindError for `1/0` or `sqrt(-1)`); then the arguments of predicate builtins
    (`nbhd`'s window, stride and dilation). `runtime` must hold exactly the runtime params;
    raises BindError otherwise."""
    key = _call_key(cascade, extents, runtime)
    known = _EVALUATED.get(key) if key else None
    if known is not None:
        return dict(known[1])
    env: dict[str, float | int] = dict(extents)
    out: dict[str, float | int] = {}
    for p in cascade.params:
        if p.type is not None:
            if p.name not in runtime:
                raise BindError(f"missing param {p.name} ({p.type})")
            out[p.name] = runtime_value(p, runtime[p.name])
        else:
            if p.name in runtime:
                raise BindError(f"param {p.name} is derived in the spec and cannot be passed")
            out[p.name] = _derived(p, env)
        env[p.name] = out[p.name]
    _check_builtin_arguments(cascade, env)
    if key:
        if len(_EVALUATED) >= 512:
            _EVALUATED.clear()
        _EVALUATED[key] = (cascade, dict(out))  # holding the cascade keeps its id unique
    return out


# Calls of one kernel repeat the same extents and params (a decode step per layer and token):
# their params, checked and derived once, by (cascade id, extents, runtime numbers).
_EVALUATED: dict[tuple, tuple[Cascade, dict[str, float | int]]] = {}


def _call_key(cascade: Cascade, extents: Mapping[str, int], runtime: Mapping[str, object]) -> tuple | None:
    if not all(type(v) in (int, float) for v in runtime.values()):
        return None  # a tensor-valued param is read (and checked) at every call
    return id(cascade), tuple(extents.items()), tuple(runtime.items())


def _derived(p: Param, env: Mapping[str, float | int]) -> float | int:
    """A derived param's value; a located BindError when it is not a finite number here."""
    names = sorted({n.name for n in walk(p.expr) if isinstance(n, Name)})
    where = f" with {', '.join(f'{n}={env[n]}' for n in names)}" if names else ""
    try:
        value = _scalar(p.expr, env).item()
    except (RuntimeError, ZeroDivisionError) as err:  # an integer // or % by 0
        raise BindError(located(p, f"param {p.name} = {print_expr(p.expr)} cannot be evaluated{where}: "
                                   f"{err}")) from None
    if not math.isfinite(value):
        raise BindError(located(p, f"param {p.name} = {print_expr(p.expr)} is {value}{where}; a derived "
                                   f"param must be a finite number"))
    return value


def _check_builtin_arguments(cascade: Cascade, env: Mapping[str, float | int]) -> None:
    """Each predicate builtin's rule for its scalar arguments (`nbhd`: window >= 1, 1 <= stride
    <= window, dilation >= 1), with the values of this call."""
    for e in cascade.einsums:
        for node in walk(e.expr) if e.where is None else [*walk(e.expr), *walk(e.where)]:
            if not (isinstance(node, Call) and node.fn in PREDICATES):
                continue
            values = tuple(None if any(isinstance(x, (Index, Access)) for x in walk(a)) else _scalar(a, env).item()
                           for a in node.args)
            problem = PREDICATES[node.fn].check(node.args, values)
            if problem:
                raise BindError(located(node, f"{print_expr(node)}: {problem}"))


def result_dtype(tensors: Mapping[str, torch.Tensor], held: frozenset = frozenset()) -> torch.dtype:
    """The outputs' dtype: torch's promotion over the floating inputs (fp16 Q with fp32 K gives
    fp32, as fp16 * fp32 does in torch), not counting those a derived kernel holds in fp32 by
    design (`held`: saved row statistics beside fp16 gradients); float32 without any."""
    import torch

    floats = [t.dtype for n, t in tensors.items() if t.is_floating_point() and n not in held]
    floats = floats or [t.dtype for t in tensors.values() if t.is_floating_point()]
    return reduce(torch.promote_types, floats) if floats else torch.float32


def _tensor(name: str, value: object) -> torch.Tensor:
    import torch

    if isinstance(value, torch.Tensor):
        return value
    kind = type(value).__name__
    hint = {"ndarray": "torch.from_numpy(x)", "list": "torch.tensor(x)", "tuple": "torch.tensor(x)"}.get(kind)
    raise BindError(f"input {name} must be a torch.Tensor, got {kind}" + (f"; pass {hint}" if hint else ""))


def bind_shapes(cascade: Cascade, args: dict, held: frozenset = frozenset()) -> tuple[dict, dict[str, int]]:
    """The input tensors and dims popped from `args` -> (tensors, rank extents); floating inputs
    of another dtype than `result_dtype`'s are cast to it (but those in `held`), so every backend
    computes the same thing and Triton's dots see one dtype. Raises BindError on a missing input,
    a non-tensor, a wrong number of dims, two different extents of one rank, or a cross-rank
    read of two ranks with different extents."""
    # `where`: the (input, dim) that last bound each rank, spelled out only in an error (this
    # runs on every call: a decode step binds a dozen dims)
    tensors, extents, where = {}, {}, {}
    for d in cascade.inputs:
        if d.name not in args:
            raise BindError(f"missing input tensor {d.name}; the cascade takes {', '.join(cascade.input_names)}")
        t = _tensor(d.name, args.pop(d.name))
        shape = t.shape
        if len(shape) != len(d.indices):
            raise BindError(f"input {d.name}[{', '.join(d.indices)}] has {len(d.indices)} dims, but the "
                            f"tensor given has shape {tuple(shape)}")
        for k, idx in enumerate(d.indices):
            r = rank_of(idx)
            if r in extents and extents[r] != shape[k]:
                raise BindError(f"rank {r} is {extents[r]} in {_dim_of(*where[r])} but {shape[k]} in "
                                f"{_dim_of(d.name, k)}")
            extents[r], where[r] = int(shape[k]), (d.name, k)
        tensors[d.name] = t
    dtype = result_dtype(tensors, held)
    for name, t in tensors.items():
        if t.is_floating_point() and t.dtype != dtype and name not in held:
            tensors[name] = t.to(dtype)
    for d in cascade.dims:
        if d in args:
            size = args.pop(d)
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or not 0 <= size <= INT64[1]:
                raise BindError(f"rank {d}={size!r}: an extent is an integer >= 0 that fits in int64")
            size = int(size)
            if d in extents and extents[d] != size:
                raise BindError(f"rank {d}={size} given, but {_dim_of(*where[d])} has {extents[d]}")
            extents[d] = size
    _bind_cross_rank_extents(cascade, extents)
    return tensors, extents


def _dim_of(name: str, k: int) -> str:
    return f"{name} (dim {k})"


def _bind_cross_rank_extents(cascade: Cascade, extents: dict[str, int]) -> None:
    """A rank that no input or keyword binds, but a cross-rank read uses, can only have the
    extent of the input's rank it pairs with (`Q[b,h,m,e]` for `Q[b,h,p,e]` gives M = P);
    then every pair must agree."""
    for r in cascade.cross_rank_reads:
        extents.setdefault(rank_of(r.var), extents[rank_of(r.declared)])
    problem = cross_rank_mismatch(cascade, extents)
    if problem:
        raise BindError(problem)


def bind_arguments(cascade: Cascade, args: dict, held: frozenset = frozenset()
                   ) -> tuple[dict, dict[str, int], dict[str, float | int]]:
    """A generated kernel's call arguments -> (input tensors, rank extents, params); `args` is
    consumed; `held`: inputs the kernel holds in fp32 (see `bind_shapes`). Raises BindError on a
    missing, mis-shaped or unexpected argument."""
    tensors, extents = bind_shapes(cascade, args, held)
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
    import torch

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
