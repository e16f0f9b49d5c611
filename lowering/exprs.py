"""Small expression utilities shared by the rewrites and the plans: products and sums of terms,
access replacement, and a sympy view of value expressions for algebraic checks."""
from __future__ import annotations

import math
from collections.abc import Callable

import sympy

from einsum_ir.functions import FUNCTIONS, UNIONS
from einsum_ir.ir import Access, Binary, Call, Expr, Index, Name, Num, Unary, rebuild, walk


def replace_accesses(expr: Expr, fn: Callable[[Access], Expr]) -> Expr:
    """Rebuild `expr`, replacing each Access `a` by `fn(a)` (return `a` to keep it)."""
    return rebuild(expr, lambda n: fn(n) if isinstance(n, Access) else None)


def product(factors: list[tuple[bool, Expr]], sign: float = 1.0) -> Expr:
    """Rebuild a term from `(reciprocal?, expr)` factors."""
    num = [f for r, f in factors if not r]
    den = [f for r, f in factors if r]
    out: Expr | None = None
    for f in num:
        out = f if out is None else Binary("*", out, f)
    if out is None:
        out = Num(1)
    for f in den:
        out = Binary("/", out, f)
    if sign == -1:
        out = Unary("-", out)
    elif sign != 1:
        out = Binary("*", Num(sign), out)
    return out


def summation(terms: list[Expr]) -> Expr:
    out = terms[0]
    for t in terms[1:]:
        if isinstance(t, Unary) and t.op == "-":
            out = Binary("-", out, t.operand)
        else:
            out = Binary("+", out, t)
    return out


def tensors_read(expr: Expr | None) -> list[str]:
    if expr is None:
        return []
    return list(dict.fromkeys(n.tensor for n in walk(expr) if isinstance(n, Access)))


_SYMPY_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
              "/": lambda a, b: a / b}


def to_sympy(expr: Expr, leaf: Callable[[Access], sympy.Expr]) -> sympy.Expr:
    """A sympy view of a value expression. `leaf(access)` gives the symbol or expression for a
    tensor access; index variables and names become symbols; functions take their registry
    forms (so `exp(a)/exp(b)` simplifies to `exp(a - b)`)."""
    if isinstance(expr, Num):
        v = expr.value
        if isinstance(v, float) and math.isinf(v):
            return sympy.oo if v > 0 else -sympy.oo
        return sympy.Integer(v) if isinstance(v, int) else sympy.Float(v)
    if isinstance(expr, Name):
        return sympy.Symbol(expr.name)
    if isinstance(expr, Index):
        return sympy.Symbol("_i_" + expr.name)
    if isinstance(expr, Access):
        return leaf(expr)
    if isinstance(expr, Unary):
        v = to_sympy(expr.operand, leaf)
        return -v if expr.op == "-" else sympy.Function("NOT")(v)
    if isinstance(expr, Binary):
        a, b = to_sympy(expr.lhs, leaf), to_sympy(expr.rhs, leaf)
        if expr.op in _SYMPY_OPS:
            return _SYMPY_OPS[expr.op](a, b)
        return sympy.Function("OP_" + {"//": "fdiv", "%": "mod", "<": "lt", "<=": "le", ">": "gt",
                                       ">=": "ge", "==": "eq", "!=": "ne", "and": "and",
                                       "or": "or"}[expr.op])(a, b)
    assert isinstance(expr, Call)
    if expr.fn in UNIONS:  # its value where every operand is present: how each one scales
        return to_sympy(UNIONS[expr.fn].present_value(expr.args), leaf)
    args = [to_sympy(a, leaf) for a in expr.args]
    if expr.fn in FUNCTIONS and expr.fn != "where":
        return FUNCTIONS[expr.fn].sympy(*args)
    return sympy.Function("F_" + expr.fn)(*args)
