"""The spec language's functions: arity, cost class and reference (torch) semantics.

Upper layers key their own lowerings (Triton, op costs) by these names; adding a function
means adding it here and there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as tfn


@dataclass(frozen=True)
class Function:
    name: str
    min_args: int
    max_args: int
    cost: str  # "sfu" (transcendental), "vector", or "predicate"
    torch_fn: Callable[..., torch.Tensor]
    nonlinear: bool = True


def nbhd_window_start(q: torch.Tensor, length, window, stride=1) -> torch.Tensor:
    """First key of the GNA window of query `q` along a dimension of `length` (DESIGN sec. 5)."""
    left = window // 2
    right = window // 2 + window % 2 - 1
    leader = torch.clamp((q // stride) * stride + stride // 2, max=length - 1)
    start = torch.clamp(leader - left, min=0) + (leader + right >= length).long() * (length - right - leader - 1)
    return torch.clamp(start, min=0)


def nbhd(q: torch.Tensor, k: torch.Tensor, length, window, stride=1, dilation=1) -> torch.Tensor:
    """True where key `k` lies in the (strided, dilated) neighborhood of query `q`.

    Dilation `d` splits the dimension into `d` interleaved groups; the window rule applies
    inside the query's group, whose length is the number of positions congruent to it.
    """
    q, k = torch.as_tensor(q), torch.as_tensor(k)
    group = q % dilation
    group_length = (length - group + dilation - 1) // dilation
    start = nbhd_window_start(q // dilation, group_length, window, stride)
    kk = k // dilation
    return (k % dilation == group) & (kk >= start) & (kk < start + window)


def _pow(a, b):
    return torch.pow(a, b)


def _where(c, a, b):
    return torch.where(c.bool() if c.dtype != torch.bool else c, a, b)


FUNCTIONS: dict[str, Function] = {f.name: f for f in [
    Function("exp", 1, 1, "sfu", torch.exp),
    Function("log", 1, 1, "sfu", torch.log),
    Function("log1p", 1, 1, "sfu", torch.log1p),
    Function("sqrt", 1, 1, "sfu", torch.sqrt),
    Function("rsqrt", 1, 1, "sfu", torch.rsqrt),
    Function("tanh", 1, 1, "sfu", torch.tanh),
    Function("sigmoid", 1, 1, "sfu", torch.sigmoid),
    Function("softplus", 1, 1, "sfu", tfn.softplus),
    Function("relu", 1, 1, "vector", torch.relu),
    Function("elu", 1, 1, "sfu", tfn.elu),
    Function("abs", 1, 1, "vector", torch.abs),
    Function("pow", 2, 2, "sfu", _pow),
    Function("max", 2, 2, "vector", torch.maximum, nonlinear=True),
    Function("min", 2, 2, "vector", torch.minimum, nonlinear=True),
    Function("where", 3, 3, "vector", _where),
    Function("nbhd", 4, 6, "predicate", nbhd),
]}

def _floor_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


# The spec language's operators on torch tensors: `/` divides exactly, `//` floors (index math).
OPERATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.true_divide, "//": _floor_divide,
    "%": torch.remainder, "<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge,
    "==": torch.eq, "!=": torch.ne, "and": torch.logical_and, "or": torch.logical_or,
}

# Functions allowed inside index expressions (integer arithmetic only).
INDEX_FUNCTIONS = ("min", "max")
