"""Predicate builtins: named predicates such as `nbhd(q, k, L, w, s, d)`, one class each.

A builtin is defined by two things, and every stage reads them (adding one is one class here):

- `expand(args)`: what it means, as plain index arithmetic (+ - * // % min max, comparisons,
  and/or). The interpreter and the cost model evaluate the expansion; both emitters print it.
- `key_interval(args)`: when it is an interval in the key index whose ends never decrease as
  the query index grows, those ends. The lowering turns them into loop bounds and full-tile
  segments for a query tile; the cost model counts present points from them exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

from einsum_ir.ir import Binary, Call, Expr, Index, Num, rebuild


@dataclass(frozen=True)
class KeyInterval:
    """`lo(q) <= k < hi(q)` for the query index `query` and key index `key`; `lo` and `hi` are
    IR expressions of the query index, non-decreasing in it."""

    query: str
    key: str
    lo: Expr
    hi: Expr


def _min(a: Expr, b: Expr) -> Expr:
    return Call("min", (a, b))


def _max(a: Expr, b: Expr) -> Expr:
    return Call("max", (a, b))


def _add(a: Expr, b: Expr) -> Expr:
    return Binary("+", a, b)


def _sub(a: Expr, b: Expr) -> Expr:
    return Binary("-", a, b)


def _floordiv(a: Expr, b: Expr) -> Expr:
    return a if b == Num(1) else Binary("//", a, b)


class PredicateBuiltin:
    """The protocol: a name, an arity, the expansion and (optionally) a key interval."""

    name: str
    arity: tuple[int, int]
    doc: str = ""

    def expand(self, args: tuple[Expr, ...]) -> Expr:
        raise NotImplementedError

    def key_interval(self, args: tuple[Expr, ...]) -> KeyInterval | None:
        return None

    def check(self, args: tuple[Expr, ...], values: tuple[float | int | None, ...]) -> str | None:
        """What is wrong with a call's scalar arguments at call time (`values`: each argument's
        value, None where it reads an index), or None. Every backend binds through this."""
        return None


class Neighborhood(PredicateBuiltin):
    """`nbhd(q, k, L, w[, s[, d]])`: key `k` lies in the Generalized Neighborhood Attention window
    of query `q` along a dimension of length `L`: window `w`, stride `s`, dilation `d`
    (Hassani et al. 2025). The window of query i (dilation 1) starts at

        leader = min((i // s) * s + s // 2, L - 1)
        start  = max(leader - w // 2, 0) + min(L - right - leader - 1, 0),  right = w//2 + w%2 - 1

    (the second term slides the window back from the end: it is the GNA rule's
    `(leader + right >= L) * (L - right - leader - 1)`, which is negative exactly then) and
    holds `w` keys. Dilation `d` splits the dimension into `d` interleaved groups; the rule
    applies inside the query's group, whose length is the number of positions congruent to it.
    """

    name = "nbhd"
    arity = (4, 6)

    @staticmethod
    def window_start(i: Expr, length: Expr, w: Expr, s: Expr) -> Expr:
        left = _floordiv(w, Num(2))
        right = _sub(_add(left, Binary("%", w, Num(2))), Num(1))
        leader = _min(_add(Binary("*", _floordiv(i, s), s), _floordiv(s, Num(2))), _sub(length, Num(1)))
        slide = _min(_sub(_sub(_sub(length, right), leader), Num(1)), Num(0))
        return _max(_add(_max(_sub(leader, left), Num(0)), slide), Num(0))

    @staticmethod
    def _parts(args: tuple[Expr, ...]):
        q, k, length, w = args[:4]
        s = args[4] if len(args) > 4 else Num(1)
        d = args[5] if len(args) > 5 else Num(1)
        return q, k, length, w, s, d

    def expand(self, args: tuple[Expr, ...]) -> Expr:
        q, k, length, w, s, d = self._parts(args)
        if d == Num(1):
            start = self.window_start(q, length, w, s)
            return Binary("and", Binary(">=", k, start), Binary("<", k, _add(start, w)))
        group = Binary("%", q, d)
        group_length = _floordiv(_sub(_add(_sub(length, group), d), Num(1)), d)
        start = self.window_start(_floordiv(q, d), group_length, w, s)
        kk = _floordiv(k, d)
        in_group = Binary("==", Binary("%", k, d), group)
        window = Binary("and", Binary(">=", kk, start), Binary("<", kk, _add(start, w)))
        return Binary("and", in_group, window)

    def check(self, args: tuple[Expr, ...], values: tuple[float | int | None, ...]) -> str | None:
        """GNA's rule: window w >= 1, stride 1 <= s <= w, dilation d >= 1 (integers)."""
        w, s, d = (list(values[3:]) + [1, 1])[:3]
        for name, v in (("window", w), ("stride", s), ("dilation", d)):
            if v is not None and not float(v).is_integer():
                return f"the {name} is {v}; it must be an integer"
        if w is not None and w < 1:
            return f"the window is {w}; it must be at least 1"
        if s is not None and (s < 1 or w is not None and s > w):
            return f"the stride is {s}; it must be at least 1 and at most the window ({w})"
        if d is not None and d < 1:
            return f"the dilation is {d}; it must be at least 1"
        return None

    def key_interval(self, args: tuple[Expr, ...]) -> KeyInterval | None:
        q, k, length, w, s, d = self._parts(args)
        if d != Num(1) or not isinstance(q, Index) or not isinstance(k, Index):
            return None
        start = self.window_start(q, length, w, s)
        return KeyInterval(q.name, k.name, start, _add(start, w))


PREDICATES: dict[str, PredicateBuiltin] = {b.name: b for b in [Neighborhood()]}


def expand_builtins(expr: Expr) -> Expr:
    """`expr` with every predicate builtin call replaced by its expansion."""
    def replace(node: Expr) -> Expr | None:
        if isinstance(node, Call) and node.fn in PREDICATES:
            return expand_builtins(PREDICATES[node.fn].expand(node.args))
        return None

    return rebuild(expr, replace)
