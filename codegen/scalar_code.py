"""Print a plan's integer bounds (sympy, lowering.symbolic) in a target language.

The plan's bounds use +, -, * with integer coefficients, `FloorDiv`/`CeilDiv` of a
non-negative numerator, `Min`, `Max`, `Mod` and `Piecewise`. A `Spelling` says how a target
writes the few of these that differ; everything else is the same in Python and Triton.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from einsum_ir.lowering.symbolic import CeilDiv, FloorDiv


@dataclass(frozen=True)
class Spelling:
    minimum: str  # "min({0}, {1})"
    maximum: str
    select: str  # "({1} if {0} else {2})": condition, then, else
    logical_and: str


PYTHON = Spelling("min({0}, {1})", "max({0}, {1})", "({1} if {0} else {2})", "({0} and {1})")
# bounds over per-program values that are tensors over every program (the CPU path; helpers in
# its generated module)
GRID = Spelling("_min({0}, {1})", "_max({0}, {1})", "_select({0}, {1}, {2})", "({0} & {1})")
TRITON = Spelling("tl.minimum({0}, {1})", "tl.maximum({0}, {1})", "tl.where({0}, {1}, {2})", "({0} & {1})")

_RELATIONS = {sympy.StrictLessThan: "<", sympy.LessThan: "<=", sympy.StrictGreaterThan: ">",
              sympy.GreaterThan: ">=", sympy.Equality: "==", sympy.Unequality: "!="}


def _atom(code: str) -> str:
    return code if code.replace("_", "").isalnum() else f"({code})"


def print_int(e: sympy.Basic, sp: Spelling) -> str:
    """`e` as an integer expression of the target."""
    if isinstance(e, sympy.Integer):
        return str(int(e))
    if isinstance(e, sympy.Symbol):
        return e.name
    if isinstance(e, FloorDiv):
        a, b = e.args
        return f"{_atom(print_int(a, sp))} // {_atom(print_int(b, sp))}"
    if isinstance(e, CeilDiv):
        a, b = (_atom(print_int(x, sp)) for x in e.args)
        return f"({a} + {b} - 1) // {b}"
    if isinstance(e, (sympy.Min, sympy.Max)):
        form = sp.minimum if isinstance(e, sympy.Min) else sp.maximum
        args = sorted(e.args, key=sympy.default_sort_key)
        code = print_int(args[0], sp)
        for a in args[1:]:
            code = form.format(code, print_int(a, sp))
        return code
    if isinstance(e, sympy.Mod):
        a, b = (_atom(print_int(x, sp)) for x in e.args)
        return f"{a} % {b}"
    if isinstance(e, sympy.Piecewise):
        (value, cond), rest = e.args[0], e.args[1:]
        other = print_int(sympy.Piecewise(*rest), sp) if rest[0][1] is not sympy.true else print_int(rest[0][0], sp)
        return sp.select.format(print_bool(cond, sp), print_int(value, sp), other)
    if isinstance(e, sympy.Add):
        terms = sorted(e.args, key=lambda t: (t.is_Number, sympy.default_sort_key(t)))
        code = ""
        for t in terms:
            neg = t.could_extract_minus_sign()
            body = print_int(-t if neg else t, sp)
            body = _atom(body) if isinstance(-t if neg else t, sympy.Add) else body
            code += (" - " if neg else " + ") + body if code else ("-" + _atom(body) if neg else body)
        return code
    if isinstance(e, sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:
            return "-" + _atom(print_int(rest, sp))
        factors = ([str(int(coeff))] if coeff != 1 else []) + [_atom(print_int(f, sp)) for f in
                                                              sympy.Mul.make_args(rest)]
        return " * ".join(factors)
    raise ValueError(f"cannot print {e} as integer code")


def print_bool(c: sympy.Basic, sp: Spelling) -> str:
    if type(c) in _RELATIONS:
        return f"({print_int(c.lhs, sp)} {_RELATIONS[type(c)]} {print_int(c.rhs, sp)})"
    if isinstance(c, sympy.And):
        code = print_bool(c.args[0], sp)
        for a in c.args[1:]:
            code = sp.logical_and.format(code, print_bool(a, sp))
        return code
    if c is sympy.true:
        return "True"
    raise ValueError(f"cannot print {c} as a condition")
