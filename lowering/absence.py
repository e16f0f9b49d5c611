"""Absent points as a value: one select per score instead of a mask on every use.

Inside a masked key tile some points are absent (the predicate fails, or the key is past the
end). The interpreter's semantics drop them from every reduction. The straightforward code
carries a presence mask with every value and selects the reduction's identity before each
reduction. FlashAttention does better: it sets a masked score to -inf once, and
`exp(-inf - max) = 0` does the rest, because 0 is the identity of every sum downstream and
-inf that of the running max.

This module derives when that is exact, for any cascade: give each guarded value (a stream
Einsum with a guard) a *sentinel* at its absent points, evaluate every in-loop expression on
abstract values, and accept the sentinel when every carried reduction then receives its
identity at absent points (0 for a sum, -inf for a max) and no NaN or overflow can appear.
The abstract values are exact constants (0, -inf, +inf), FINITE (a finite number) and
UNKNOWN; a function's value at 0 or -inf comes from its registry entry, and a function of
finite values is finite only if the registry says so (`exp` may overflow, `sigmoid` cannot).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cache

from einsum_ir.functions import FUNCTIONS, UNIONS, value_at
from einsum_ir.ir import Access, Binary, Call, Einsum, Expr, Index, Name, Num, Unary, walk
from einsum_ir.lowering.exprs import tensors_read

FINITE, UNKNOWN = "finite", "unknown"
Value = float | str  # an exact constant (0.0, -inf, inf), FINITE or UNKNOWN
IDENTITY = {"sum": 0.0, "max": -math.inf}
SENTINELS = (-math.inf, 0.0)


def _exact(v: Value) -> bool:
    return isinstance(v, float)


def _finite(v: Value) -> bool:
    return v == FINITE or _exact(v) and math.isfinite(v)


def _add(a: Value, b: Value) -> Value:
    if UNKNOWN in (a, b):
        return UNKNOWN
    if _exact(a) and _exact(b):
        s = a + b
        return UNKNOWN if math.isnan(s) else s
    for x, y in ((a, b), (b, a)):
        if _exact(x) and math.isinf(x):
            return x  # inf + finite
        if x == 0.0:
            return y
    return FINITE


def _mul(a: Value, b: Value) -> Value:
    if UNKNOWN in (a, b):
        return UNKNOWN
    if _exact(a) and _exact(b):
        p = a * b
        return UNKNOWN if math.isnan(p) else p
    for x, y in ((a, b), (b, a)):
        if x == 0.0:
            return 0.0 if _finite(y) else UNKNOWN  # 0 * inf is NaN
        if _exact(x) and math.isinf(x):
            return UNKNOWN  # inf times a finite number of unknown sign (or zero)
    return FINITE


def _neg(a: Value) -> Value:
    return -a if _exact(a) else a


def _call(fn: str, args: list[Value]) -> Value:
    if UNKNOWN in args:
        return UNKNOWN
    f = FUNCTIONS[fn]
    if fn == "max" and -math.inf in args:
        return args[1] if args[0] == -math.inf else args[0]
    if fn == "min" and -math.inf in args:
        return -math.inf
    if fn == "where":
        return args[1] if args[1] == args[2] else (FINITE if all(map(_finite, args[1:])) else UNKNOWN)
    exact = [a for a in args if _exact(a) and (a == 0.0 or math.isinf(a))]
    if len(args) == 1 and exact:
        v = value_at(fn, args[0])
        return UNKNOWN if v is None else (v if v == 0.0 or math.isinf(v) else FINITE)
    if exact and all(_exact(a) or a == FINITE for a in args):
        v = _value_for_any_finite(fn, tuple(a if _exact(a) else None for a in args))
        if v is not None:
            return v if v == 0.0 or math.isinf(v) else FINITE
    if all(map(_finite, args)):
        return FINITE if f.finite else UNKNOWN
    return UNKNOWN


@cache
def _value_for_any_finite(fn: str, args: tuple[float | None, ...]) -> float | None:
    """The function's value at the exact arguments with every None argument any finite number
    (its registry algebra, with those as real symbols), when that is one number; else None.
    `softplus_scaled(-inf, s)` is 0 for every s, as `exp(-inf - G)` is."""
    import sympy

    f = FUNCTIONS[fn]
    exact = {0.0: sympy.Integer(0), math.inf: sympy.oo, -math.inf: -sympy.oo}
    v = f.sympy(*[sympy.Symbol(f"x{k}", real=True) if a is None else exact.get(a, sympy.Float(a))
                  for k, a in enumerate(args)])
    if v.free_symbols or v is sympy.nan or not v.is_number:
        return None
    return float(v) if v.is_finite else (math.inf if v == sympy.oo else -math.inf if v == -sympy.oo else None)


def abstract(expr: Expr, values: Mapping[str, Value]) -> Value:
    """The value of `expr` at an absent point, given the values of the tensors it reads
    (`values`; a tensor not named there is a finite load)."""
    if isinstance(expr, Num):
        v = float(expr.value)
        return v if v == 0.0 or math.isinf(v) else FINITE
    if isinstance(expr, (Name, Index)):
        return FINITE
    if isinstance(expr, Access):
        return values.get(expr.tensor, FINITE)
    if isinstance(expr, Unary):
        return FINITE if expr.op == "not" else _neg(abstract(expr.operand, values))
    if isinstance(expr, Binary):
        a, b = abstract(expr.lhs, values), abstract(expr.rhs, values)
        if expr.op == "+":
            return _add(a, b)
        if expr.op == "-":
            return _add(a, _neg(b))
        if expr.op == "*":
            if isinstance(expr.rhs, Num) and expr.rhs.value > 0 and _exact(a):
                return a * expr.rhs.value  # a positive constant keeps +-inf and 0
            if isinstance(expr.lhs, Num) and expr.lhs.value > 0 and _exact(b):
                return b * expr.lhs.value
            return _mul(a, b)
        if expr.op == "/":
            if isinstance(expr.rhs, Num) and expr.rhs.value > 0 and _exact(a):
                return a / expr.rhs.value
            return UNKNOWN if not (_finite(a) and b == FINITE) or a == 0.0 else FINITE
        return FINITE  # comparisons, index arithmetic
    assert isinstance(expr, Call)
    if expr.fn in UNIONS:
        # a union is present where an operand is: a failing guard's sentinel does not make it
        # absent, so no value past it can stand for absence (place_sentinels declines first)
        return UNKNOWN
    if expr.fn not in FUNCTIONS:  # a predicate builtin
        return FINITE
    return _call(expr.fn, [abstract(a, values) for a in expr.args])


def place_sentinels(body: list[Einsum], kinds: Mapping[str, str], guards: list[str], online: set[str],
                    depends: Mapping[str, frozenset[str]]) -> dict[str, tuple[float, tuple[str, ...]]] | None:
    """Where absent points can hold a sentinel value so that no other mask is needed: per in-loop
    value X, (sentinel, the guards applied at X); None when some guard has no such place.

    `body`: the loop's Einsums in order, `kinds` their classes; `guards`: the guarded values;
    `online`: running maxima read in the loop (finite there: 0 while a row has seen nothing);
    `depends`: each Einsum's in-loop ancestors. A guard's sentinel goes on the first value X,
    from the guarded value down, that every path to a carried reduction passes through and at
    which some sentinel gives every reduction its identity. Guards can fail one at a time or
    together, so the placement is checked for each alone and for all at once. A carried
    reduction that depends on no guard is not judged here: it masks itself (its `where`, the
    key bound). A loop with a union form gets None: a union is present where any operand is, so
    a failing guard does not make the values past it absent, which a sentinel stands for; their
    presence masks travel with the values instead."""
    if any(isinstance(n, Call) and n.fn in UNIONS for e in body for n in walk(e.expr)):
        return None
    for x in [e.name for e in body if kinds[e.name] != "carried"]:  # one place for every guard: one select
        if len(guards) > 1 and all(g == x or g in depends[x] for g in guards) and \
                all(_dominates(body, kinds, g, x) for g in guards):
            for sentinel in SENTINELS:
                place = {g: (sentinel, x) for g in guards}
                if all(_identities(body, kinds, online, depends, {g: place[g]}) for g in guards) and \
                        _identities(body, kinds, online, depends, place):
                    return {x: (sentinel, tuple(guards))}
    place: dict[str, tuple[float, str]] = {}
    for g in guards:
        found = None
        for x in [e.name for e in body if e.name == g or g in depends[e.name]]:
            if kinds[x] == "carried" or not _dominates(body, kinds, g, x):
                continue
            for sentinel in SENTINELS:
                if _identities(body, kinds, online, depends, {g: (sentinel, x)}):
                    found = (sentinel, x)
                    break
            if found:
                break
        if found is None:
            return None
        place[g] = found
    if not _identities(body, kinds, online, depends, place):
        return None
    out: dict[str, tuple[float, tuple[str, ...]]] = {}
    for g, (sentinel, x) in place.items():
        if x in out and out[x][0] != sentinel:
            return None
        out[x] = (sentinel, out.get(x, (sentinel, ()))[1] + (g,))
    return out


def _dominates(body, kinds, g: str, x: str) -> bool:
    """Every in-loop path from `g` to a carried reduction passes through `x`."""
    if x == g:
        return True
    names = {e.name for e in body}
    readers: dict[str, list[Einsum]] = {}
    for e in body:
        for t in set(tensors_read(e.expr) + tensors_read(e.where)) & names:
            readers.setdefault(t, []).append(e)
    todo, seen = [g], {g}
    while todo:
        for r in readers.get(todo.pop(), ()):
            if r.name == x or r.name in seen:
                continue
            if kinds[r.name] == "carried":
                return False
            seen.add(r.name)
            todo.append(r.name)
    return True


def _identities(body, kinds, online, depends, place: dict[str, tuple[float, str]]) -> bool:
    """With guard g failing and its sentinel at place[g], every carried reduction that depends on
    a failing guard receives its identity."""
    at = {x: sentinel for sentinel, x in place.values()}
    failing = set(place)
    values: dict[str, Value] = {name: FINITE for name in online}
    for e in body:
        if kinds[e.name] == "carried":
            if depends[e.name] & failing and abstract(e.expr, values) != IDENTITY[e.reduce]:
                return False
            continue
        values[e.name] = at[e.name] if e.name in at else abstract(e.expr, values)
    return True
