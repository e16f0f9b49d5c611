"""Integer index arithmetic in sympy: the language of a plan's loop bounds.

Loop bounds, key segments and tile ranges are sympy expressions over a few kinds of symbol:

- dims and params by name (`M`, `W`);
- the first and last valid query of the query tile along query variable `v`: `q_lo_<v>`,
  `q_hi_<v>` (see `query_lo`, `query_hi`);
- key tile sizes: `BLOCK_S` for a one-rank key axis, else `BLOCK_S_<v>` (see `block`).

Division is written `FloorDiv(a, b)` / `CeilDiv(a, b)` and is only ever applied to a
non-negative `a` and positive `b`, so that every target's integer division (Triton's
truncates toward zero, Python's floors) gives the same value. `Min`, `Max` and `Piecewise`
are sympy's. Emitters print these expressions in their own language (codegen.scalar_code).
"""
from __future__ import annotations

import math

import sympy

from einsum_ir.ir import Binary, Call, Expr, Index, Name, Num, Unary


class _IntDiv(sympy.Function):
    """Integer division of a >= 0 by b > 0, evaluated on numbers; `_div` rounds the quotient."""

    is_integer = True
    is_nonnegative = True

    @classmethod
    def eval(cls, a, b):
        if b == 1:
            return a
        if a.is_Integer and b.is_Integer:
            return sympy.Integer(cls._div(int(a), int(b)))
        if a == 0:
            return sympy.Integer(0)
        return None


class FloorDiv(_IntDiv):
    """floor(a / b) for a >= 0 and b > 0."""

    _div = staticmethod(lambda a, b: a // b)


class CeilDiv(_IntDiv):
    """ceil(a / b) for a >= 0 and b > 0."""

    _div = staticmethod(lambda a, b: -(-a // b))


def symbol(name: str) -> sympy.Symbol:
    """A dim, param or emitter-defined scalar: a non-negative integer."""
    return sympy.Symbol(name, integer=True, nonnegative=True)


def query_lo(v: str) -> sympy.Symbol:
    return symbol(f"q_lo_{v}")


def query_hi(v: str) -> sympy.Symbol:
    return symbol(f"q_hi_{v}")


def block(v: str, ranks: tuple[str, ...]) -> sympy.Symbol:
    """The key tile size along key variable `v` of a key axis over `ranks`."""
    return symbol("BLOCK_S" if len(ranks) == 1 else f"BLOCK_S_{v}")


def index_symbol(v: str) -> sympy.Symbol:
    """An index variable inside an index expression (kept apart from dims and params)."""
    return sympy.Symbol(f"_idx_{v}", integer=True, nonnegative=True)


def to_sympy(expr: Expr, indices: dict[str, sympy.Expr] | None = None) -> sympy.Expr | None:
    """An index expression in sympy, or None when it is not integer index arithmetic.

    `indices` gives index variables a value (`{"p": q_lo_p}`); others become index symbols."""
    indices = indices or {}
    if isinstance(expr, Num):
        v = expr.value
        return sympy.Integer(v) if isinstance(v, int) or float(v).is_integer() and not math.isinf(v) else None
    if isinstance(expr, Name):
        return symbol(expr.name)
    if isinstance(expr, Index):
        return indices.get(expr.name, index_symbol(expr.name))
    if isinstance(expr, Unary) and expr.op == "-":
        v = to_sympy(expr.operand, indices)
        return None if v is None else -v
    if isinstance(expr, Binary) and expr.op in ("+", "-", "*", "//", "%"):
        a, b = to_sympy(expr.lhs, indices), to_sympy(expr.rhs, indices)
        if a is None or b is None:
            return None
        return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
                "//": lambda: FloorDiv(a, b), "%": lambda: sympy.Mod(a, b)}[expr.op]()
    if isinstance(expr, Call) and expr.fn in ("min", "max") and len(expr.args) == 2:
        a, b = (to_sympy(x, indices) for x in expr.args)
        if a is None or b is None:
            return None
        return sympy.Min(a, b) if expr.fn == "min" else sympy.Max(a, b)
    return None


def proves(cond: sympy.Basic) -> bool:
    """True only when sympy can show `cond` for every value of the (non-negative) symbols."""
    return bool(cond is sympy.true or cond == True)  # noqa: E712 - sympy's boolean


def is_zero(e: sympy.Expr) -> bool:
    return sympy.simplify(e) == 0


def evaluate(defs, env: dict, default) -> dict:
    """Numbers for `env`'s symbols plus every definition (symbol, expression) in order; other
    symbols take `default(symbol)`."""
    values = dict(env)
    for sym, e in defs:
        for s in e.free_symbols:
            if s not in values:
                values[s] = sympy.Integer(default(s))
        values[sym] = e.xreplace(values)
    return values
