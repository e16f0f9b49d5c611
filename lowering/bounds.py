"""Value ranges of a stage's in-loop maps, for the emitters' choice of a dot's operand dtype.

A generated kernel computes in fp32 and multiplies a computed tile with a loaded one in
`tl.dot`, which needs both in one dtype. Casting the computed tile to the load's fp16 is safe
only when its values fit fp16 (|x| <= 65504): softmax probabilities `exp2(S - max S)` lie in
[0, 1], but softplus weights of logits near 1e4 do not (cast, they are inf, and inf * 0 NaN).
`magnitudes` bounds |value| by interval arithmetic over the IR: numbers, registry functions that
are increasing (their values at the interval's ends), `where` (either branch), + - * /, and the
one fact interval arithmetic cannot see: a value minus the running max of that same value is
<= 0 at every point the max has seen. Anything else (loads, params, index values) is unbounded.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import sympy

from einsum_ir.functions import FUNCTIONS
from einsum_ir.ir import Access, Binary, Call, Einsum, Expr, Num, Unary, product_terms

Interval = tuple[float, float]
UNBOUNDED: Interval = (-math.inf, math.inf)


def magnitudes(einsums: Iterable[Einsum], maps: set[str], maxima: Mapping[str, Access]) -> dict[str, float]:
    """An upper bound on |value| of each map in `maps` (in-loop Einsums without a reduction)
    where it is present, for those that have a finite one. `maxima`: each running max -> the
    access it maximizes."""
    known: dict[str, Interval] = {}
    for e in einsums:
        if e.name in maps:
            known[e.name] = interval(e.expr, known, maxima)
    return {n: max(-lo, hi) for n, (lo, hi) in known.items() if math.isfinite(lo) and math.isfinite(hi)}


def interval(expr: Expr, known: Mapping[str, Interval], maxima: Mapping[str, Access]) -> Interval:
    """[lo, hi] holding every value of `expr` at present points (UNBOUNDED when not known)."""
    if isinstance(expr, Num):
        return float(expr.value), float(expr.value)
    if isinstance(expr, Access):
        return known.get(expr.tensor, UNBOUNDED)
    if isinstance(expr, Unary):
        if expr.op == "not":
            return 0.0, 1.0
        lo, hi = interval(expr.operand, known, maxima)
        return -hi, -lo
    if isinstance(expr, Binary) and expr.op in ("+", "-"):
        return _sum(expr, known, maxima)
    if isinstance(expr, Binary) and expr.op in ("*", "/"):
        a, b = interval(expr.lhs, known, maxima), interval(expr.rhs, known, maxima)
        return _product(a, b) if expr.op == "*" else _quotient(a, b)
    if isinstance(expr, Binary) and expr.op in ("<", "<=", ">", ">=", "==", "!=", "and", "or"):
        return 0.0, 1.0
    if isinstance(expr, Call) and expr.fn == "where":
        (alo, ahi), (blo, bhi) = (interval(a, known, maxima) for a in expr.args[1:])
        return min(alo, blo), max(ahi, bhi)
    if isinstance(expr, Call) and expr.fn in FUNCTIONS and FUNCTIONS[expr.fn].increasing:
        ends = [interval(a, known, maxima) for a in expr.args]
        return _at(expr.fn, [lo for lo, _ in ends], -math.inf), _at(expr.fn, [hi for _, hi in ends], math.inf)
    return UNBOUNDED


def _sum(expr: Expr, known, maxima) -> Interval:
    """A signed sum term by term; a term +X with a term -max(X) is at most 0 together."""
    terms = product_terms(expr, distribute=True)
    plain = {k: f[0][1] for k, (_, f) in enumerate(terms) if len(f) == 1 and not f[0][0]}
    paired: set[int] = set()
    lo, hi = 0.0, 0.0
    for k, g in plain.items():
        if terms[k][0] != -1.0 or not isinstance(g, Access) or g.tensor not in maxima:
            continue
        x = next((j for j, a in plain.items() if terms[j][0] == 1.0 and j not in paired
                  and a == maxima[g.tensor]), None)
        if x is not None:
            paired |= {k, x}
            lo = -math.inf  # X - max X <= 0
    for k, (sign, factors) in enumerate(terms):
        if k in paired:
            continue
        t = (sign, sign)
        for rec, f in factors:
            v = interval(f, known, maxima)
            t = _quotient(t, v) if rec else _product(t, v)
        lo, hi = lo + t[0], hi + t[1]
    return (lo, hi) if not (math.isnan(lo) or math.isnan(hi)) else UNBOUNDED


def _product(a: Interval, b: Interval) -> Interval:
    ends = [x * y for x in a for y in b]
    return UNBOUNDED if any(math.isnan(v) for v in ends) else (min(ends), max(ends))


def _quotient(a: Interval, b: Interval) -> Interval:
    if b[0] <= 0.0 <= b[1]:
        return UNBOUNDED
    return _product(a, (1.0 / b[1], 1.0 / b[0]))


def _at(fn: str, args: list[float], otherwise: float) -> float:
    """The function at one corner of its arguments' box, from its registry algebra (sympy: no
    torch at planning time); `otherwise` where that is not a real number (outside its domain:
    log of a negative end)."""
    ends = [sympy.oo if a == math.inf else -sympy.oo if a == -math.inf else sympy.Float(a) for a in args]
    v = sympy.sympify(FUNCTIONS[fn].sympy(*ends)).evalf()
    if v in (sympy.oo, -sympy.oo):
        return math.inf if v == sympy.oo else -math.inf
    return float(v) if v.is_real and v.is_finite else otherwise
