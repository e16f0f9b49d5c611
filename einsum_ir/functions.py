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
- `increasing`: non-decreasing in every argument, so an interval of arguments maps to the
  interval of the values at its ends (the range analysis of lowering.bounds).
- `scaled`: for a positive function with an exponential tail (f(x) ~ e^x as x -> -inf), the
  function that computes e^s * f(x) without forming either factor: what lowering.underflow
  multiplies a row of normalized weights by, so that an all-tiny row does not underflow.
- `special`: a cheaper exact spelling for particular constant arguments, in arithmetic that is
  valid torch and Triton alike (`pow(x, 2)` is `x * x`), used by both emitters; None otherwise.

A Triton spelling may call the `@triton.jit` helpers of `TRITON_HELPERS` (a generated module
carries the ones its kernels call): accurate log1p and softplus from plain `tl.exp`/`tl.log`
and arithmetic, since `tl.math` has no log1p and libdevice differs between Triton versions.

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
    increasing: bool = False
    scaled: str | None = None  # the registry function e^s * f(x)
    special: Callable[[tuple[Expr, ...]], str | None] | None = None  # arguments -> a spelling, or None

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


def _small_power(args: tuple[Expr, ...]) -> str | None:
    """pow(x, n) for a constant n in 2..4 as n - 1 multiplies: exact in sign for a negative x,
    and cheaper than exp2(n * log2|x|). Other exponents take the general spelling."""
    n = args[1]
    if isinstance(n, Num) and float(n.value).is_integer() and 2 <= n.value <= 4:
        return "(" + " * ".join(["{0}"] * int(n.value)) + ")"
    return None


def _log1p_ratio_source(terms: int = 8) -> str:
    """The Triton helper log1p(w) / w for -0.5 <= w <= 1, from the atanh series with no log:
    log1p(w) = 2 atanh(z) = 2 z sum_k z^(2k) / (2k + 1), z = w / (2 + w), so |z| <= 1/3 and the
    first term left out, below (1/9)^terms / (2 terms + 1), is 1.4e-9 relative for 8 terms."""
    coeffs = [1.0 / (2 * k + 1) for k in reversed(range(terms))]
    horner = [f"    s = {coeffs[0]!r}"] + [f"    s = s * z2 + {c!r}" for c in coeffs[1:]]
    return "\n".join(["@triton.jit", "def _log1p_ratio(w):",
                      '    """log1p(w) / w for -0.5 <= w <= 1 (atanh series; 1 at w = 0)."""',
                      "    r = 1.0 / (2.0 + w)", "    z = w * r", "    z2 = z * z", *horner,
                      "    return 2.0 * r * s", ""])


# Helpers the Triton spellings call, in dependency order (a module carries the ones it calls).
TRITON_HELPERS: dict[str, str] = {
    "_log1p_ratio": _log1p_ratio_source(),
    "_log1p": '''@triton.jit
def _log1p(x):
    """log(1 + x): the series where 1 + x would lose x's low bits, log(1 + x) elsewhere (there 1 + x
    is exact, -1 <= x <= -0.5, or its rounding is at most an ulp of a log >= log 2, x >= 1)."""
    near = tl.abs(x - 0.25) <= 0.75  # -0.5 <= x <= 1
    return tl.where(near, x * _log1p_ratio(tl.where(near, x, 0.0)), tl.log(1.0 + x))
''',
    "_softplus": '''@triton.jit
def _softplus(x):
    """max(x, 0) + log1p(exp(-|x|)), as accurate for very negative x as exp(x) itself."""
    w = tl.exp(-tl.abs(x))
    return tl.maximum(x, 0.0) + w * _log1p_ratio(w)
''',
    "_softplus_scaled": '''@triton.jit
def _softplus_scaled(x, s):
    """e^s * softplus(x) = exp(min(x, 0) + s) * (log1p(w)/w for x <= 0, x + log1p(w) for x > 0),
    w = exp(-|x|): no factor underflows or overflows unless the result does."""
    w = tl.exp(-tl.abs(x))
    q = _log1p_ratio(w)
    return tl.exp(tl.minimum(x, 0.0) + s) * tl.where(x > 0, x + w * q, q)
''',
    "_pow": '''@triton.jit
def _pow(a, b):
    """a ** b as torch.pow: |a| ** b with a's sign for an odd integer b, NaN for a negative a and a
    non-integer b, 1 for b == 0 or a == 1. log2 is taken of a in its own shape (a decay's scalar
    base once, not per element of its exponent tile); selects, not & or |, which fail on a
    scalar beside a tile in Triton's interpreter."""
    v = tl.exp2(b * tl.log2(tl.abs(a)))
    odd = tl.floor(0.5 * b) != 0.5 * b
    v = tl.where(a < 0, tl.where(tl.floor(b) == b, tl.where(odd, -v, v), float("nan")), v)
    return tl.where(b == 0, 1.0, tl.where(a == 1, 1.0, v))
''',
}


FUNCTIONS: dict[str, Function] = {f.name: f for f in [
    Function("exp", (1, 1), "torch.exp({0})", "tl.exp({0})", lambda x: _sympy().exp(x), "sfu", 1,
             (lambda a, out: out,), mlir="math.exp", increasing=True),
    Function("exp2", (1, 1), "torch.exp2({0})", "tl.exp2({0})", lambda x: _sympy().Integer(2) ** x, "sfu", 1,
             (lambda a, out: _mul(out, _num(math.log(2.0))),), mlir="math.exp2", increasing=True),
    Function("log", (1, 1), "torch.log({0})", "tl.log({0})", lambda x: _sympy().log(x), "sfu", 1,
             (lambda a, out: _div(_num(1.0), a[0]),), mlir="math.log", increasing=True),
    Function("log1p", (1, 1), "torch.log1p({0})", "_log1p({0})", lambda x: _sympy().log(1 + x), "sfu", 2,
             (lambda a, out: _div(_num(1.0), Binary("+", _num(1.0), a[0])),), mlir="math.log1p",
             increasing=True),
    Function("sqrt", (1, 1), "torch.sqrt({0})", "tl.sqrt({0})", lambda x: _sympy().sqrt(x), "sfu", 1,
             (lambda a, out: _div(_num(0.5), out),), mlir="math.sqrt", increasing=True),
    Function("rsqrt", (1, 1), "torch.rsqrt({0})", "tl.rsqrt({0})", lambda x: 1 / _sympy().sqrt(x), "sfu", 1,
             (lambda a, out: _mul(_num(-0.5), _div(out, a[0])),), mlir="math.rsqrt"),
    Function("tanh", (1, 1), "torch.tanh({0})", "(2.0 * tl.sigmoid(2.0 * {0}) - 1.0)", lambda x: _sympy().tanh(x), "sfu", 1,
             (lambda a, out: _sub(_num(1.0), _mul(out, out)),), mlir="math.tanh", finite=True,
             increasing=True),
    Function("sigmoid", (1, 1), "torch.sigmoid({0})", "tl.sigmoid({0})", lambda x: 1 / (1 + _sympy().exp(-x)),
             "sfu", 2, (lambda a, out: _mul(out, _sub(_num(1.0), out)),),
             decompose=lambda x: _div(_num(1.0), Binary("+", _num(1.0), _call("exp", Unary("-", x)))),
             finite=True, increasing=True, scaled="sigmoid_scaled"),
    # max(x, 0) + log1p(exp(-|x|)): no overflow for large x, and exp(x)'s relative accuracy for
    # very negative x (log(1 + exp(x)) would round to 0 below x = -17 in fp32)
    Function("softplus", (1, 1), "torch.nn.functional.softplus({0})", "_softplus({0})",
             lambda x: _sympy().log(1 + _sympy().exp(x)), "sfu", 2, (lambda a, out: _call("sigmoid", a[0]),),
             decompose=lambda x: Binary("+", _call("max", x, _num(0.0)),
                                        _call("log1p", _call("exp", Unary("-", _call("abs", x))))),
             finite=True, increasing=True, scaled="softplus_scaled"),
    # e^s * softplus(x). torch: log softplus(x) is x to 2e-18 below -40, where softplus itself
    # may underflow (clamped there, so that autograd through the other branch sees no 0/0);
    # Triton: exp(min(x, 0) + s) times log1p(w)/w (x <= 0) or x + log1p(w) (x > 0),
    # w = exp(-|x|), which neither underflows nor overflows before the result does
    Function("softplus_scaled", (2, 2),
             "torch.exp({1} + torch.where({0} < -40.0, {0}, "
             "torch.log(torch.nn.functional.softplus(torch.clamp({0}, min=-40.0)))))",
             "_softplus_scaled({0}, {1})",
             lambda x, s: _sympy().exp(s) * _sympy().log(1 + _sympy().exp(x)), "sfu", 3,
             (lambda a, out: _call("sigmoid_scaled", *a), lambda a, out: out),
             decompose=lambda x, s: _mul(_call("exp", s), _call("softplus", x)), increasing=True),
    # e^s * sigmoid(x) = 1 / (e^-s + e^(-x-s))
    Function("sigmoid_scaled", (2, 2), "(1.0 / (torch.exp(-({1})) + torch.exp(-({0}) - ({1}))))",
             "(1.0 / (tl.exp(-({1})) + tl.exp(-({0}) - ({1}))))",
             lambda x, s: _sympy().exp(s) / (1 + _sympy().exp(-x)), "sfu", 3,
             (lambda a, out: _mul(out, _sub(_num(1.0), _call("sigmoid", a[0]))), lambda a, out: out),
             decompose=lambda x, s: _div(_num(1.0), Binary("+", _call("exp", Unary("-", s)),
                                                          _call("exp", _sub(Unary("-", x), s)))),
             increasing=True),
    Function("relu", (1, 1), "torch.relu({0})", "tl.maximum({0}, 0.0)", lambda x: _sympy().Max(x, 0), "vector", 0,
             (lambda a, out: _step(Binary(">", a[0], _num(0.0))),),
             decompose=lambda x: _call("max", x, _num(0.0)), finite=True, increasing=True),
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
    Function("pow", (2, 2), "torch.pow({0}, {1})", "_pow({0}, {1})", lambda a, b: a ** b, "sfu", 2,
             (lambda a, out: _mul(a[1], _call("pow", a[0], _sub(a[1], _num(1.0)))),
              lambda a, out: _mul(out, _call("log", a[0]))), mlir="math.powf", special=_small_power),
    Function("max", (2, 2), "torch.maximum({0}, {1})", "tl.maximum({0}, {1})", lambda a, b: _sympy().Max(a, b), "vector", 0,
             (lambda a, out: _step(Binary(">=", a[0], a[1])), lambda a, out: _step(Binary("<", a[0], a[1]))),
             mlir="arith.maximumf", finite=True, increasing=True),
    Function("min", (2, 2), "torch.minimum({0}, {1})", "tl.minimum({0}, {1})", lambda a, b: _sympy().Min(a, b), "vector", 0,
             (lambda a, out: _step(Binary("<=", a[0], a[1])), lambda a, out: _step(Binary(">", a[0], a[1]))),
             mlir="arith.minimumf", finite=True, increasing=True),
    Function("where", (3, 3), "torch.where({0}, {1}, {2})", "tl.where({0}, {1}, {2})", _sympy_where, "vector", 0,
             (None, lambda a, out: _step(a[0]), lambda a, out: _step(Unary("not", a[0]))),
             mlir="arith.select", finite=True),
]}


@dataclass(frozen=True)
class UnionForm:
    """A union form, EDGE's `+(U)`: `union_sum(a, b, ...)` is present wherever *any* operand is,
    and is the sum of the operands present there; an absent operand acts as the operation's
    identity (0, -inf, +inf) instead of making the result absent. It is the reduction `reduce`
    over the listed operands, so it reads exactly as a reduction over no present point does:
    absent where every operand is absent.

    Plain `+ - max min` intersect (a map is absent where any operand is); a union form is how a
    softmax spans several masked key sets: `GM = union_max(GM0, GM1)`, `O = union_sum(N0, N1) /
    union_sum(D0, D1)`. Subtraction is `union_sum(a, -b)`. Not a `Function`: it has no
    meaning point by point without the operands' presence, which each backend carries (the
    interpreter's masks, the kernels' guards), so a stage that has not learned it must refuse it
    rather than spell it as the intersecting function."""

    name: str
    reduce: str  # the reduction it is over its operands: "sum" | "max" | "min"
    combine: str  # two present operands combined: the operator "+" or the function "max"/"min"
    arity: tuple[int, int] = (2, 16)
    cost: str = "vector"

    @property
    def identity(self) -> float:
        return {"sum": 0.0, "max": -math.inf, "min": math.inf}[self.reduce]

    def present_value(self, args: tuple[Expr, ...]) -> Expr:
        """The value where every operand is present: the intersecting form, left to right."""
        out = args[0]
        for a in args[1:]:
            out = Binary("+", out, a) if self.combine == "+" else Call(self.combine, (out, a))
        return out


UNIONS: dict[str, UnionForm] = {u.name: u for u in [
    UnionForm("union_sum", "sum", "+"),
    UnionForm("union_max", "max", "max"),
    UnionForm("union_min", "min", "min"),
]}

# The intersecting operations a union form replaces, per union: what validation points to.
INTERSECTING: dict[str, str] = {"+": "union_sum", "-": "union_sum", "max": "union_max", "min": "union_min"}


@cache
def torch_union(name: str) -> Callable:
    """A union form over (value, presence mask or None) pairs of broadcast torch tensors: the
    value, and the presence (None when every point is present)."""
    import torch

    u = UNIONS[name]
    combine = {"+": torch.add, "max": torch.maximum, "min": torch.minimum}[u.combine]

    def run(operands):
        masks = [m for _, m in operands]
        value = None
        for data, mask in operands:
            if mask is not None:  # an absent operand is the identity
                data = torch.where(mask, data, torch.tensor(u.identity, dtype=data.dtype, device=data.device))
            value = data if value is None else combine(value, data)
        if any(m is None for m in masks):
            return value, None
        present = masks[0]
        for m in masks[1:]:
            present = present | m
        return value, present

    return run


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


# value_at for the built-in one-argument functions, as torch computes them in float64 (None:
# NaN); tests/test_limits.py checks every entry against torch. The lowering's absence analysis
# asks for these, and with them `einsum-ir analyze` runs without importing torch (seconds and
# a few hundred MB). A function not listed is evaluated with torch.
LIMITS: dict[tuple[str, float], float | None] = {
    (name, point): value
    for name, values in {
        "exp": (1.0, math.inf, 0.0), "exp2": (1.0, math.inf, 0.0), "log": (-math.inf, math.inf, None),
        "log1p": (0.0, math.inf, None), "sqrt": (0.0, math.inf, None), "rsqrt": (math.inf, 0.0, None),
        "tanh": (0.0, 1.0, -1.0), "sigmoid": (0.5, 1.0, 0.0), "softplus": (math.log(2.0), math.inf, 0.0),
        "relu": (0.0, math.inf, 0.0), "elu": (0.0, math.inf, -1.0), "abs": (0.0, math.inf, math.inf),
    }.items()
    for point, value in zip((0.0, math.inf, -math.inf), values)
}


@cache
def value_at(name: str, point: float) -> float | None:
    """The function's value at `point` (0 or -inf) by its torch semantics; None for NaN."""
    if (name, point) in LIMITS:
        return LIMITS[name, point]
    import torch

    f = FUNCTIONS[name]
    v = float(torch_function(name)(*[torch.tensor(point, dtype=torch.float64)] * f.min_args))
    return None if math.isnan(v) else v
