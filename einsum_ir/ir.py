"""The IR: expressions, Einsums and cascades as plain frozen dataclasses (DESIGN section 2).

One expression family serves values, index expressions and predicates; validation decides
which node kinds are legal where. Every node carries an optional source location that takes
no part in equality, so `parse(str(c)) == c` holds for the structure alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple

if TYPE_CHECKING:  # sympy takes most of a second to import; parsing and checking never need it
    import sympy

REDUCE_OPS = ("sum", "max", "min", "prod")
REDUCE_IDENTITY = {"sum": 0.0, "max": -math.inf, "min": math.inf, "prod": 1.0}
FLOAT_DTYPES = ("fp32", "fp16", "bf16", "fp64")
INT_DTYPES = ("bool", "int8", "int16", "int32", "int64")
DTYPES = FLOAT_DTYPES + INT_DTYPES
DEFAULT_DTYPE = "fp32"
DEFAULT_TILE = 64  # extent of a split's inner rank (M0) when the caller does not bind it


class Loc(NamedTuple):
    """Where a node came from in a spec file (1-based line and column). A named tuple: the
    parser makes one per node, and a frozen dataclass takes twice as long to build."""

    file: str
    line: int
    col: int
    length: int = 1


def _loc() -> Loc | None:
    return field(default=None, compare=False, repr=False)  # type: ignore[return-value]


# ---------------------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Num:
    value: float | int
    loc: Loc | None = _loc()


@dataclass(frozen=True)
class Name:
    """A dim (as a value: its extent) or a param."""

    name: str
    loc: Loc | None = _loc()


@dataclass(frozen=True)
class Index:
    """An index variable used as a value or inside an index expression."""

    name: str
    loc: Loc | None = _loc()


@dataclass(frozen=True)
class Access:
    tensor: str
    indices: tuple["Expr", ...]
    loc: Loc | None = _loc()


@dataclass(frozen=True)
class Unary:
    op: str  # "-" or "not"
    operand: "Expr"
    loc: Loc | None = _loc()


@dataclass(frozen=True)
class Binary:
    op: str  # + - * / // % < <= > >= == != and or
    lhs: "Expr"
    rhs: "Expr"
    loc: Loc | None = _loc()


@dataclass(frozen=True)
class Call:
    fn: str
    args: tuple["Expr", ...]
    loc: Loc | None = _loc()


Expr = Num | Name | Index | Access | Unary | Binary | Call

ARITHMETIC_OPS = ("+", "-", "*", "/", "//", "%")
COMPARISON_OPS = ("<", "<=", ">", ">=", "==", "!=")


_CHILDREN: dict[type, Callable[..., tuple]] = {
    Access: lambda e: e.indices, Unary: lambda e: (e.operand,), Binary: lambda e: (e.lhs, e.rhs),
    Call: lambda e: e.args,
}


def children(expr: Expr) -> tuple[Expr, ...]:
    # A lookup by type, not a chain of isinstance tests: every walk calls this once per node.
    get = _CHILDREN.get(type(expr))
    return get(expr) if get else ()


# Expressions nest at most this deep (tree depth, checked by validation; the parser also counts
# parentheses). Every stage after validation walks expressions recursively, a few frames per
# level, so this keeps them all well inside Python's default recursion limit of 1,000.
MAX_DEPTH = 100
NESTED_TOO_DEEPLY = (f"nested too deeply: an expression nests at most {MAX_DEPTH} levels (parentheses, "
                     f"calls, brackets, unary operators, chains of // or %); compute a part in an "
                     f"Einsum of its own")


def walk(expr: Expr) -> Iterator[Expr]:
    """Every node of an expression tree, parents before children (left to right). With a
    stack, not recursion: any depth, and no chain of generators for each node to climb."""
    stack = [expr]
    while stack:
        node = stack.pop()
        yield node
        kind = type(node)  # inline `children`: every check of a spec walks every node a few times
        if kind is Binary:
            stack.append(node.rhs)
            stack.append(node.lhs)
        elif kind is Access:
            stack.extend(reversed(node.indices))
        elif kind is Call:
            stack.extend(reversed(node.args))
        elif kind is Unary:
            stack.append(node.operand)


def rebuild(expr: Expr, replace: Callable[[Expr], Expr | None]) -> Expr:
    """Rebuild `expr` top-down: a node for which `replace` returns an expression becomes that
    expression (not visited further); every other node is rebuilt from its rebuilt children."""
    new = replace(expr)
    if new is not None:
        return new
    if isinstance(expr, Access):
        return Access(expr.tensor, tuple(rebuild(i, replace) for i in expr.indices), expr.loc)
    if isinstance(expr, Unary):
        return Unary(expr.op, rebuild(expr.operand, replace), expr.loc)
    if isinstance(expr, Binary):
        return Binary(expr.op, rebuild(expr.lhs, replace), rebuild(expr.rhs, replace), expr.loc)
    if isinstance(expr, Call):
        return Call(expr.fn, tuple(rebuild(a, replace) for a in expr.args), expr.loc)
    return expr


def substitute(expr: Expr, mapping: dict[str, Expr]) -> Expr:
    """`expr` with index variables replaced (simultaneously) by expressions."""
    return rebuild(expr, lambda n: mapping.get(n.name) if isinstance(n, Index) else None)


def accesses(expr: Expr | None) -> list[Access]:
    return [] if expr is None else [n for n in walk(expr) if isinstance(n, Access)]


def index_vars(expr: Expr | None) -> list[str]:
    """Index variables used anywhere in the expression, in first-use order."""
    return [] if expr is None else _names_of(walk(expr), Index)


def _names_of(nodes, kind: type) -> list[str]:
    """The distinct names of the `kind` nodes among `nodes` (Index or Name), in order."""
    return list(dict.fromkeys(n.name for n in nodes if type(n) is kind))


def chain(op: str, parts: list[Expr]) -> Expr:
    """`parts` joined left to right by the binary operator `op` (`a and b and c`)."""
    out = parts[0]
    for p in parts[1:]:
        out = Binary(op, out, p)
    return out


def conjuncts(pred: Expr | None) -> list[Expr]:
    """The top-level `and` clauses of a predicate (none for no predicate)."""
    if pred is None:
        return []
    if isinstance(pred, Binary) and pred.op == "and":
        return conjuncts(pred.lhs) + conjuncts(pred.rhs)
    return [pred]


def product_terms(expr: Expr, distribute: bool = False) -> list[tuple[float, list[tuple[bool, Expr]]]]:
    """`expr` as signed terms of factors `(reciprocal?, factor)`: the top level of + - * /.

    `-a*b/c + d` is `[(-1, [(False, a), (False, b), (True, c)]), (1, [(False, d)])]`. With
    `distribute`, products also distribute over sums (`(a+b)*c` gives two terms); without, a
    sum inside a product stays one factor.
    """
    if isinstance(expr, Binary) and expr.op in ("+", "-"):
        rhs = product_terms(expr.rhs, distribute)
        if expr.op == "-":
            rhs = [(-sign, factors) for sign, factors in rhs]
        return product_terms(expr.lhs, distribute) + rhs
    if isinstance(expr, Unary) and expr.op == "-":
        return [(-sign, factors) for sign, factors in product_terms(expr.operand, distribute)]
    if isinstance(expr, Binary) and expr.op == "*":
        lhs, rhs = product_terms(expr.lhs, distribute), product_terms(expr.rhs, distribute)
        if distribute or len(lhs) == len(rhs) == 1:
            return [(sa * sb, fa + fb) for sa, fa in lhs for sb, fb in rhs]
    if isinstance(expr, Binary) and expr.op == "/":
        lhs = product_terms(expr.lhs, distribute)
        if distribute or len(lhs) == 1:
            return [(sign, factors + [(True, expr.rhs)]) for sign, factors in lhs]
    return [(1.0, [(False, expr)])]


# ---------------------------------------------------------------------------- statements


@dataclass(frozen=True)
class Split:
    """`split M -> M1 x M0`: m = m1*M0 + m0."""

    rank: str
    outer: str
    inner: str
    loc: Loc | None = _loc()


@dataclass(frozen=True)
class Param:
    """A derived scalar (`expr` set) or a runtime scalar (`type` set)."""

    name: str
    expr: Expr | None = None
    type: str | None = None  # "int" | "float" for runtime params
    loc: Loc | None = _loc()


@dataclass(frozen=True)
class InputDecl:
    name: str
    indices: tuple[str, ...]  # index variable names; each names its rank
    dtype: str | None = None
    loc: Loc | None = _loc()


@dataclass(frozen=True)
class Init:
    """`init RM[b,h,0,p] = -inf`: the value of an iterative tensor at step 0."""

    target: Access
    expr: Expr
    loc: Loc | None = _loc()


@dataclass(frozen=True)
class Einsum:
    """`target = reduce over (right-side indices absent on the left) of expr where predicate`."""

    target: Access
    expr: Expr
    reduce: str = "sum"
    where: Expr | None = None
    loc: Loc | None = _loc()

    @property
    def name(self) -> str:
        return self.target.tensor

    # The facts below come from one walk of each tree per Einsum (every stage asks for them, a
    # check of a long spec thousands of times); lists are handed out fresh.

    @property
    def lhs_vars(self) -> list[str]:
        return _names_of(self.nodes[0], Index)

    @property
    def reduced(self) -> list[str]:
        """Index variables reduced away: on the right (or in the predicate), not on the left."""
        return list(self._reduced)

    @property
    def reads(self) -> list[Access]:
        """Every tensor access: the right side's, then the predicate's."""
        return [n for n in self.nodes[1] + self.nodes[2] if type(n) is Access]

    @cached_property
    def nodes(self) -> tuple[tuple[Expr, ...], tuple[Expr, ...], tuple[Expr, ...]]:
        """Every node of the left side, the right side and the predicate, in `walk` order."""
        return tuple(walk(self.target)), tuple(walk(self.expr)), tuple(walk(self.where)) if self.where else ()

    @cached_property
    def _reduced(self) -> tuple[str, ...]:
        left = set(self.lhs_vars)
        return tuple(v for v in _names_of(self.nodes[1] + self.nodes[2], Index) if v not in left)

    @property
    def space(self) -> list[str]:
        """The iteration space: left indices first, then the reduced ones."""
        return list(dict.fromkeys(self.lhs_vars + self.reduced))

    @cached_property
    def recurrence_var(self) -> str | None:
        """The index `x` when the left side is indexed `x+1` (a recurrence step), else None."""
        for idx in self.target.indices:
            if isinstance(idx, Binary) and idx.op == "+" and isinstance(idx.lhs, Index) and idx.rhs == Num(1):
                return idx.lhs.name
        return None


@dataclass(frozen=True)
class Output:
    name: str
    fill: float = 0.0
    loc: Loc | None = _loc()


# ---------------------------------------------------------------------------- ranks, tensors


@dataclass(frozen=True)
class Rank:
    """An upper-case rank name; its index variable is the lower-case name."""

    name: str
    extent: sympy.Expr

    @property
    def index(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ranks: tuple[str, ...]
    dtype: str
    role: str  # "input" | "intermediate" | "output"
    iterative: bool = False


def rank_of(index: str) -> str:
    return index.upper()


@dataclass(frozen=True)
class CrossRankRead:
    """One index of an input read at another rank's variable, `G[b,h,m]` for `input G[b,h,p]`
    (docs/spec.md, "Einsums"): binding checks that the two ranks have one extent."""

    reader: str  # the tensor whose Einsum (or init) reads it
    access: Access
    var: str  # the index variable read with: m
    declared: str  # the index variable declared at that position: p


# ---------------------------------------------------------------------------- cascade


@dataclass(frozen=True)
class Cascade:
    dims: tuple[str, ...]
    einsums: tuple[Einsum, ...]
    outputs: tuple[Output, ...]
    inputs: tuple[InputDecl, ...] = ()
    params: tuple[Param, ...] = ()
    splits: tuple[Split, ...] = ()
    inits: tuple[Init, ...] = ()
    doc: str = ""
    file: str = field(default="<spec>", compare=False, repr=False)

    def __str__(self) -> str:
        from einsum_ir.printer import print_cascade

        return print_cascade(self)

    # -- derived views (cheap, cached; the dataclass itself stays plain data)

    @cached_property
    def rank_names(self) -> tuple[str, ...]:
        """The names of `ranks`, in its order, without building their sympy extents."""
        return tuple(dict.fromkeys([*self.dims, *(r for s in self.splits for r in (s.outer, s.inner))]))

    @cached_property
    def ranks(self) -> dict[str, Rank]:
        """Every rank with its symbolic extent; split ranks get M1 = ceil(M/M0)."""
        import sympy

        ranks = {d: Rank(d, sympy.Symbol(d, positive=True, integer=True)) for d in self.dims}
        for s in self.splits:
            inner = sympy.Symbol(s.inner, positive=True, integer=True)
            ranks[s.outer] = Rank(s.outer, sympy.ceiling(ranks[s.rank].extent / inner))
            ranks[s.inner] = Rank(s.inner, inner)
        return ranks

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        outputs = {o.name for o in self.outputs}
        infos = {d.name: TensorInfo(d.name, tuple(rank_of(i) for i in d.indices),
                                    d.dtype or DEFAULT_DTYPE, "input") for d in self.inputs}
        iterative = {e.name for e in self.einsums if e.recurrence_var}
        for e in self.einsums:
            if e.name in infos:
                continue
            ranks = []
            for idx in e.target.indices:
                names = index_vars(idx)
                ranks.append(rank_of(names[0]) if names else "?")
            role = "output" if e.name in outputs else "intermediate"
            infos[e.name] = TensorInfo(e.name, tuple(ranks), DEFAULT_DTYPE, role, e.name in iterative)
        return infos

    @property
    def input_names(self) -> list[str]:
        return [d.name for d in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @cached_property
    def cross_rank_reads(self) -> tuple[CrossRankRead, ...]:
        """Every index of an input read at another rank's variable, in spec order."""
        # Built once: every call of a kernel binds its arguments against them.
        declared = {d.name: d.indices for d in self.inputs}
        reads = [(e.name, a) for e in self.einsums for a in accesses(e.expr) + accesses(e.where)]
        reads += [(i.target.tensor, a) for i in self.inits for a in accesses(i.expr)]
        return tuple(CrossRankRead(reader, a, idx.name, declared[a.tensor][pos]) for reader, a in reads
                     if a.tensor in declared for pos, idx in enumerate(a.indices)
                     if isinstance(idx, Index) and rank_of(idx.name) != rank_of(declared[a.tensor][pos]))

    @cached_property
    def _writers(self) -> dict[str, list[Einsum]]:
        # Built once: graph building and validation ask per read, and a scan per question made
        # checking a 10,000-line spec quadratic.
        writers: dict[str, list[Einsum]] = {}
        for e in self.einsums:
            writers.setdefault(e.name, []).append(e)
        return writers

    def einsum(self, name: str) -> Einsum:
        """The (last) Einsum that writes `name`."""
        if name not in self._writers:
            raise KeyError(f"no Einsum writes {name!r}")
        return self._writers[name][-1]

    def writers(self, name: str) -> list[Einsum]:
        return list(self._writers.get(name, ()))

    def replace(self, **changes) -> "Cascade":
        from dataclasses import replace

        return replace(self, **changes)


def format_number(value: float | int) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)
