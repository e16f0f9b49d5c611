"""Build a cascade from Python with index objects and operator overloading.

    from einsum_ir.builder import CascadeBuilder, fn
    cb = CascadeBuilder()
    b, h, p, m, e, f = cb.dims("B H P M E F")
    scale = cb.param("scale", 1 / fn.sqrt(cb.dim("E")))
    Q, K, V = cb.input("Q", b, h, p, e), cb.input("K", b, h, m, e), cb.input("V", b, h, m, f)
    S = cb.let("S", (b, h, p, m), Q[b, h, p, e] * K[b, h, m, e] * scale, where=m <= p)
    GM = cb.let("GM", (b, h, p), S[b, h, p, m], reduce="max")
    ...
    cascade = cb.build(outputs=[O])

Python's `and`/`or`/`not` cannot be overloaded: predicates join with `&`, `|` and `~`, and
equality is `.eq(other)` / `.ne(other)` (so terms stay hashable).
"""
from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace
from typing import Iterable, Union

from einsum_ir.builtins import PREDICATES
from einsum_ir.functions import FUNCTIONS
from einsum_ir.ir import (
    Access, Binary, Call, Cascade, Einsum, Expr, Index, Init, InputDecl, Name, Num, Output,
    Param, Split, Unary,
)
from einsum_ir.parser import negate
from einsum_ir.validate import validate

Operand = Union["Term", int, float]


def as_expr(value: Operand) -> Expr:
    if isinstance(value, Term):
        return value.expr
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"cannot use {value!r} in a cascade expression")
    return Num(value)


class Term:
    """An expression under construction; arithmetic and comparisons build IR nodes."""

    def __init__(self, expr: Expr):
        self.expr = expr

    def _bin(self, op: str, other: Operand, reverse: bool = False) -> "Term":
        lhs, rhs = (as_expr(other), self.expr) if reverse else (self.expr, as_expr(other))
        return Term(Binary(op, lhs, rhs))

    def __add__(self, o): return self._bin("+", o)
    def __radd__(self, o): return self._bin("+", o, True)
    def __sub__(self, o): return self._bin("-", o)
    def __rsub__(self, o): return self._bin("-", o, True)
    def __mul__(self, o): return self._bin("*", o)
    def __rmul__(self, o): return self._bin("*", o, True)
    def __truediv__(self, o): return self._bin("/", o)
    def __rtruediv__(self, o): return self._bin("/", o, True)
    def __floordiv__(self, o): return self._bin("//", o)
    def __rfloordiv__(self, o): return self._bin("//", o, True)
    def __mod__(self, o): return self._bin("%", o)
    def __rmod__(self, o): return self._bin("%", o, True)
    def __lt__(self, o): return self._bin("<", o)
    def __le__(self, o): return self._bin("<=", o)
    def __gt__(self, o): return self._bin(">", o)
    def __ge__(self, o): return self._bin(">=", o)
    def __and__(self, o): return self._bin("and", o)
    def __or__(self, o): return self._bin("or", o)
    def __invert__(self): return Term(Unary("not", self.expr))
    def __neg__(self): return Term(negate(self.expr))
    def eq(self, o: Operand) -> "Term": return self._bin("==", o)
    def ne(self, o: Operand) -> "Term": return self._bin("!=", o)

    def __bool__(self) -> bool:
        raise TypeError("a cascade term has no truth value; join predicates with & | ~")

    def __repr__(self) -> str:
        from einsum_ir.printer import print_expr

        return f"Term({print_expr(self.expr)})"


class Idx(Term):
    """An index variable (lower-case name of a rank)."""

    def __init__(self, name: str):
        super().__init__(Index(name))
        self.name = name


class TensorRef:
    """A declared or assigned tensor; index it to read it: `Q[b, h, p, e]`."""

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, indices) -> Term:
        indices = indices if isinstance(indices, tuple) else (indices,)
        return Term(Access(self.name, tuple(as_expr(i) for i in indices)))


def call(name: str, *args: Operand) -> Term:
    if name not in FUNCTIONS and name not in PREDICATES:
        raise ValueError(f"unknown function {name}; known: {', '.join(sorted([*FUNCTIONS, *PREDICATES]))}")
    return Term(Call(name, tuple(as_expr(a) for a in args)))


# `fn.exp(x)`, `fn.nbhd(p, m, M, W, S)`, ... one per function of the spec language.
fn = SimpleNamespace(**{name: partial(call, name) for name in [*FUNCTIONS, *PREDICATES]})
inf = Term(Num(math.inf))


class CascadeBuilder:
    """Collects declarations and Einsums; `build()` validates and returns the Cascade."""

    def __init__(self, doc: str = ""):
        self.doc = doc
        self._dims: list[str] = []
        self._splits: list[Split] = []
        self._params: list[Param] = []
        self._inputs: list[InputDecl] = []
        self._inits: list[Init] = []
        self._einsums: list[Einsum] = []

    def dims(self, names: str) -> tuple[Idx, ...]:
        """Declare ranks ("B H P M E F"); returns their index variables."""
        new = names.split()
        self._dims += new
        return tuple(Idx(n.lower()) for n in new)

    def dim(self, name: str) -> Term:
        """A rank's extent as a value."""
        return Term(Name(name))

    def split(self, rank: str, outer: str, inner: str) -> tuple[Idx, Idx]:
        self._splits.append(Split(rank, outer, inner))
        return Idx(outer.lower()), Idx(inner.lower())

    def param(self, name: str, value: Operand | None = None, type: str | None = None) -> Term:
        """A derived param (`value`) or a runtime one (`type="int"` or `"float"`)."""
        if (value is None) == (type is None):
            raise ValueError(f"param {name}: give either a value or a type")
        self._params.append(Param(name, None if value is None else as_expr(value), type))
        return Term(Name(name))

    def input(self, name: str, *indices: Idx, dtype: str | None = None) -> TensorRef:
        self._inputs.append(InputDecl(name, tuple(i.name for i in indices), dtype))
        return TensorRef(name)

    def init(self, name: str, indices: Iterable[Operand], value: Operand) -> None:
        self._inits.append(Init(Access(name, tuple(as_expr(i) for i in indices)), as_expr(value)))

    def let(self, name: str, indices: Iterable[Operand], value: Operand, reduce: str = "sum",
            where: Term | None = None) -> TensorRef:
        """`name[indices] = reduce over the other indices of value where predicate`."""
        target = Access(name, tuple(as_expr(i) for i in indices))
        self._einsums.append(Einsum(target, as_expr(value), reduce, None if where is None else where.expr))
        return TensorRef(name)

    def build(self, outputs: Iterable[TensorRef | tuple[TensorRef, float]]) -> Cascade:
        """Outputs are tensors, or (tensor, fill) pairs such as (LSE, -math.inf)."""
        outs = []
        for o in outputs:
            ref, fill = o if isinstance(o, tuple) else (o, 0.0)
            outs.append(Output(ref.name, float(fill)))
        cascade = Cascade(
            dims=tuple(self._dims), einsums=tuple(self._einsums), outputs=tuple(outs),
            inputs=tuple(self._inputs), params=tuple(self._params), splits=tuple(self._splits),
            inits=tuple(self._inits), doc=self.doc, file="<builder>",
        )
        validate(cascade)
        return cascade
