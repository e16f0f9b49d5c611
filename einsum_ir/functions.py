"""The spec language's functions: one registry entry each, read by every stage.

An entry says everything the compiler needs to know about a function, so adding one (say
`erf`) is one `Function(...)` below and nothing else:

- `torch`: its reference semantics, a format string over torch tensors (`{0}`, `{1}` are the
  arguments). The interpreter and param evaluation run it; the CPU path prints it.
- `triton`: its spelling in generated Triton (an argument used twice is bound to a name first).
- `sympy`: its algebra (rescale factors of the online rewrite, values at absent points).
- `cost`: "sfu" (special-function unit) or "vector", and `sfu_ops`, the hardware SFU operations
  one call costs (ex2, lg2, rcp, ...).
- `derivative`: per argument, the partial derivative as an IR expression of the arguments
  and of the call itself (what reverse-mode differentiation multiplies by).
- `mlir`: the linalg body op that computes it, or a `decompose` into functions that have one.
- `finite`: finite arguments always give a finite result in fp32 (exp does not: it overflows).

Operators (`+`, `<`, `and`, ...) are a table here too (`OPERATORS`, torch spelling). Neither
torch nor sympy is imported with this module: the spellings are resolved on first use.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from einsum_ir.ir import Binary, Call, Expr, Num, Unary

if TYPE_CHECKING:
    import sympy

Partial = Callable[[tuple[Expr, ...], Expr], Expr]  # (arguments, the call) -> d call / d argument


@dataclass(frozen=True)
class Function:
    name: str
    arity: tuple[int, int]  # fewest and most arguments
    torch: str
    triton: str
    sympy: Callable[..., sympy.Expr]
    cost: str  # "sfu" | "vector"
    sfu_ops: int
    derivative: tuple[Partial | None, ...]  # one per argument; None: no gradient (a condition)
    mlir: str | None = None
    decompose: Callable[..., Expr] | None = None  # the function in terms of others, for MLIR
    finite: bool = False

    @property
    def min_args(self) -> int:
        return self.arity[0]

    @property
    def max_args(self) -> int:
        return self.arity[1]


def _call(fn: str, *args: Expr) -> Expr:
    return Call(fn, tuple(args))


def _num(x: float) -> Num:
    return Num(x)


def _mul(a: Expr, b: Expr) -> Expr:
    return Binary("*", a, b)


def _sub(a: Expr, b: Expr) -> Expr:
    return Binary("-", a, b)


def _div(a: Expr, b: Expr) -> Expr:
    return Binary("/", a, b)


def _step(cond: Expr) -> Expr:
    """1 where `cond` holds, else 0."""
    return _call("where", cond, _num(1.0), _num(0.0))


def _sympy():
    """sympy, imported when an algebra entry is first called: the import takes most of a
    second, and parsing and checking a spec never need it."""
    import sympy

    return sympy


def _sympy_where(c, a, b):
    return _sympy().Piecewise((a, c), (b, True))


FUNCTIONS: dict[str, Function] = {f.name: f for f in [
    Function("exp", (1, 1), "torch.exp({0})", "tl.exp({0})", lambda x: _sympy().exp(x), "sfu", 1,
             (lambda a, out: out,), mlir="math.exp"),
    Function("exp2", (1, 1), "torch.exp2({0})", "tl.exp2({0})", lambda x: _sympy().Integer(2) ** x, "sfu", 1,
             (lambda a, out: _mul(out, _num(math.log(2.0))),), mlir="math.exp2"),
    Function("log", (1, 1), "torch.log({0})", "tl.log({0})", lambda x: _sympy().log(x), "sfu", 1,
             (lambda a, out: _div(_num(1.0), a[0]),), mlir="math.log"),
    Function("log1p", (1, 1), "torch.log1p({0})", "tl.log(1.0 + {0})", lambda x: _sympy().log(1 + x), "sfu", 1,
             (lambda a, out: _div(_num(1.0), Binary("+", _num(1.0), a[0])),), mlir="math.log1p"),
    Function("sqrt", (1, 1), "torch.sqrt({0})", "tl.sqrt({0})", lambda x: _sympy().sqrt(x), "sfu", 1,
             (lambda a, out: _div(_num(0.5), out),), mlir="math.sqrt"),
    Function("rsqrt", (1, 1), "torch.rsqrt({0})", "tl.rsqrt({0})", lambda x: 1 / _sympy().sqrt(x), "sfu", 1,
             (lambda a, out: _mul(_num(-0.5), _div(out, a[0])),), mlir="math.rsqrt"),
    Function("tanh", (1, 1), "torch.tanh({0})", "(2.0 * tl.sigmoid(2.0 * {0}) - 1.0)", lambda x: _sympy().tanh(x), "sfu", 1,
             (lambda a, out: _sub(_num(1.0), _mul(out, out)),), mlir="math.tanh", finite=True),
    Function("sigmoid", (1, 1), "torch.sigmoid({0})", "tl.sigmoid({0})", lambda x: 1 / (1 + _sympy().exp(-x)),
             "sfu", 2, (lambda a, out: _mul(out, _sub(_num(1.0), out)),),
             decompose=lambda x: _div(_num(1.0), Binary("+", _num(1.0), _call("exp", Unary("-", x)))),
             finite=True),
    # max(x, 0) + log(1 + exp(-|x|)): no overflow for large x, no NaN for very negative x
    Function("softplus", (1, 1), "torch.nn.functional.softplus({0})",
             "(tl.maximum({0}, 0.0) + tl.log(1.0 + tl.exp(-tl.abs({0}))))",
             lambda x: _sympy().log(1 + _sympy().exp(x)), "sfu", 2, (lambda a, out: _call("sigmoid", a[0]),),
             decompose=lambda x: Binary("+", _call("max", x, _num(0.0)),
                                        _call("log1p", _call("exp", Unary("-", _call("abs", x))))),
             finite=True),
    Function("relu", (1, 1), "torch.relu({0})", "tl.maximum({0}, 0.0)", lambda x: _sympy().Max(x, 0), "vector", 0,
             (lambda a, out: _step(Binary(">", a[0], _num(0.0))),),
             decompose=lambda x: _call("max", x, _num(0.0)), finite=True),
    Function("elu", (1, 1), "torch.nn.functional.elu({0})",
             "tl.where({0} > 0, {0}, tl.exp(tl.minimum({0}, 0.0)) - 1.0)",
             lambda x: _sympy().Piecewise((x, x > 0), (_sympy().exp(x) - 1, True)), "sfu", 1,
             (lambda a, out: _call("where", Binary(">", a[0], _num(0.0)), _num(1.0),
                                   Binary("+", out, _num(1.0))),),
             decompose=lambda x: _call("where", Binary(">", x, _num(0.0)), x,
                                       _sub(_call("exp", _call("min", x, _num(0.0))), _num(1.0))),
             finite=True),
    Function("abs", (1, 1), "torch.abs({0})", "tl.abs({0})", lambda x: _sympy().Abs(x), "vector", 0,
             (lambda a, out: _call("where", Binary(">=", a[0], _num(0.0)), _num(1.0), _num(-1.0)),),
             mlir="math.absf", finite=True),
    Function("pow", (2, 2), "torch.pow({0}, {1})", "tl.exp({1} * tl.log({0}))", lambda a, b: a ** b, "sfu", 2,
             (lambda a, out: _mul(a[1], _call("pow", a[0], _sub(a[1], _num(1.0)))),
              lambda a, out: _mul(out, _call("log", a[0]))), mlir="math.powf"),
    Function("max", (2, 2), "torch.maximum({0}, {1})", "tl.maximum({0}, {1})", lambda a, b: _sympy().Max(a, b), "vector", 0,
             (lambda a, out: _step(Binary(">=", a[0], a[1])), lambda a, out: _step(Binary("<", a[0], a[1]))),
             mlir="arith.maximumf", finite=True),
    Function("min", (2, 2), "torch.minimum({0}, {1})", "tl.minimum({0}, {1})", lambda a, b: _sympy().Min(a, b), "vector", 0,
             (lambda a, out: _step(Binary("<=", a[0], a[1])), lambda a, out: _step(Binary(">", a[0], a[1]))),
             mlir="arith.minimumf", finite=True),
    Function("where", (3, 3), "torch.where({0}, {1}, {2})", "tl.where({0}, {1}, {2})", _sympy_where, "vector", 0,
             (None, lambda a, out: _step(a[0]), lambda a, out: _step(Unary("not", a[0]))),
             mlir="arith.select", finite=True),
]}

# Functions allowed inside index expressions (integer arithmetic only).
INDEX_FUNCTIONS = ("min", "max")

# The spec language's operators in torch: `/` divides exactly, `//` floors (index math).
OPERATORS: dict[str, str] = {
    "+": "torch.add", "-": "torch.sub", "*": "torch.mul", "/": "torch.true_divide",
    "//": "torch.floor_divide", "%": "torch.remainder", "<": "torch.lt", "<=": "torch.le",
    ">": "torch.gt", ">=": "torch.ge", "==": "torch.eq", "!=": "torch.ne",
    "and": "torch.logical_and", "or": "torch.logical_or",
}


@cache
def torch_function(name: str) -> Callable:
    """The function's torch semantics as a callable over tensors (its `torch` spelling)."""
    import torch  # noqa: F401 - the spelling names it

    f = FUNCTIONS[name]
    params = ", ".join(f"a{k}" for k in range(f.max_args))
    body = f.torch.format(*(f"a{k}" for k in range(f.max_args)))
    if name == "where":  # the condition of a value-level where is a predicate: any nonzero holds
        body = f.torch.format("(a0 if a0.dtype == torch.bool else a0 != 0)", "a1", "a2")
    return eval(f"lambda {params}: {body}", {"torch": __import__("torch")})  # noqa: S307 - our table


@cache
def torch_operator(op: str) -> Callable:
    """A spec operator as a torch callable; `//` floors (torch.floor_divide rounds toward -inf)."""
    import torch

    return eval(OPERATORS[op], {"torch": torch})  # noqa: S307 - our table


@cache
def value_at(name: str, point: float) -> float | None:
    """The function's value at `point` (0 or -inf) by its torch semantics; None for NaN."""
    import torch

    f = FUNCTIONS[name]
    v = float(torch_function(name)(*[torch.tensor(point, dtype=torch.float64)] * f.min_args))
    return None if math.isnan(v) else v
