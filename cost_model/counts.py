"""Work and traffic of a cascade, per Einsum and in total, symbolic where shapes are symbols.

- Tensor-core MACs: a term of a sum that multiplies two tensor operands sharing a reduced
  index (`Q[p,e]*K[m,e]` over e, `SN[p,m]*V[m,f]` over m): one MAC per present point.
- Vector ops: every other + - * / comparison, min/max/abs/relu/where, and the reduction itself.
- SFU ops: transcendental functions, each costed in hardware special-function operations.
- Compulsory bytes: every input read once, every output written once; an input read only
  through indirect indices (a paged cache) counts the elements of the keys its reads visit.
- Footprints: the full size of every intermediate, at fp32 (the accumulation precision).

Points removed by a `where` predicate are not counted. The count is exact: in closed form per
piece for index arithmetic (cost_model.lattice: no enumeration, so any extent up to int64),
block by block or row by row for what that does not cover (tensor reads:
cost_model.predicates, with numpy), and symbolically by fitting a polynomial in the free dims
to exact counts at sample sizes, kept only when it reproduces further exact counts. torch is
never imported here: a torch tensor in the shapes is read as a numpy array.
"""
from __future__ import annotations

import itertools
import numbers
import random
import sys
from dataclasses import dataclass, field, replace
from functools import reduce
from operator import mul
from typing import TYPE_CHECKING

import sympy

from einsum_ir.functions import FUNCTIONS, UNIONS
from einsum_ir.indirect import bound_indirect, is_indirect
from einsum_ir.params import runtime_value
from einsum_ir.ir import (
    DEFAULT_TILE, Access, Binary, Call, Cascade, Einsum, Index, Name, Num, Unary, index_vars, product_terms, rank_of,
    walk,
)

from einsum_ir.cost_model import lattice
from einsum_ir.cost_model import predicates as pr
from einsum_ir.printer import print_expr
from einsum_ir.validate import cross_rank_mismatch

if TYPE_CHECKING:
    import numpy


DTYPE_BYTES = {"fp64": 8, "fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int64": 8,
               "int32": 4, "int16": 2, "int8": 1, "bool": 1}
INTERMEDIATE_BYTES = 4  # intermediates are held at fp32, the precision kernels accumulate in
PRESENT = sympy.Function("present")  # an exact count with no polynomial closed form
VECTOR_BINARY = ("+", "-", "*", "/", "<", "<=", ">", ">=", "==", "!=")


@dataclass(frozen=True)
class EinsumCounts:
    name: str
    points: sympy.Expr  # present points of the iteration space
    dense_points: sympy.Expr
    macs: sympy.Expr
    vector_ops: sympy.Expr
    sfu_ops: sympy.Expr


@dataclass(frozen=True)
class Counts:
    einsums: tuple[EinsumCounts, ...]
    input_bytes: dict[str, sympy.Expr]
    output_bytes: dict[str, sympy.Expr]
    footprints: dict[str, sympy.Expr]  # intermediate tensor -> bytes
    dtype: str
    notes: tuple[str, ...] = field(default=())

    def einsum(self, name: str) -> EinsumCounts:
        return next(e for e in self.einsums if e.name == name)

    @property
    def macs(self) -> sympy.Expr:
        return sympy.Add(*[e.macs for e in self.einsums])

    @property
    def flops(self) -> sympy.Expr:
        """Tensor-core FLOPs (2 per MAC)."""
        return 2 * self.macs

    @property
    def vector_ops(self) -> sympy.Expr:
        return sympy.Add(*[e.vector_ops for e in self.einsums])

    @property
    def sfu_ops(self) -> sympy.Expr:
        return sympy.Add(*[e.sfu_ops for e in self.einsums])

    @property
    def compulsory_bytes(self) -> sympy.Expr:
        return sympy.Add(*self.input_bytes.values(), *self.output_bytes.values())

    def __str__(self) -> str:
        rows = [(e.name, e.points, e.macs, e.vector_ops, e.sfu_ops) for e in self.einsums]
        rows.append(("total", sympy.Add(*[e.points for e in self.einsums]), self.macs,
                     self.vector_ops, self.sfu_ops))
        out = [table(("Einsum", "points", "TC MACs", "vector ops", "SFU ops"), rows)]
        io = [(n, "input", b) for n, b in self.input_bytes.items()]
        io += [(n, "output", b) for n, b in self.output_bytes.items()]
        io += [(n, "intermediate (footprint, fp32)", b) for n, b in self.footprints.items()]
        io.append(("compulsory", "inputs once + outputs once", self.compulsory_bytes))
        out.append(table(("tensor", f"bytes ({self.dtype})", "bytes"), io))
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


# ---------------------------------------------------------------------------- formatting


def fmt(x) -> str:
    """A count for a table: an engineering number, or the sympy expression when symbolic."""
    x = sympy.sympify(x)
    if x.is_number:
        v = float(x)
        for unit, scale in (("Y", 1e24), ("Z", 1e21), ("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9),
                            ("M", 1e6), ("k", 1e3)):
            if abs(v) >= scale:
                return f"{v / scale:.3f}{unit}"
        return f"{v:g}"
    return str(sympy.factor(x))


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    cells = [list(header)] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- binding


@dataclass(frozen=True)
class Binding:
    """Dims, tiles and params as sympy values (symbols where the shapes leave them open)."""

    extents: dict[str, sympy.Expr]  # rank -> extent
    scalars: dict[str, sympy.Expr]  # dims, tiles and params by name
    tensors: dict[str, numpy.ndarray]  # the values of inputs a predicate reads
    memo: dict = field(default_factory=dict, compare=False)  # exact counts by (clauses, scalars)

    def numeric(self) -> bool:
        return all(v.is_number for v in self.scalars.values())


def is_tensor(value: object) -> bool:
    """A torch tensor or a numpy array, asked without importing either: one exists only if its
    module is imported."""
    return any(name in sys.modules and isinstance(value, getattr(sys.modules[name], kind))
               for name, kind in (("torch", "Tensor"), ("numpy", "ndarray")))


INT64_MAX = (1 << 63) - 1  # the kernels index with int64: a larger extent has no kernel


def _value(c: Cascade, name: str, value: object) -> sympy.Expr:
    """A shape entry as sympy, checked: a dim is an integer in [0, 2^63), a tile one in [1, 2^63),
    an int param an integer, a float param a finite number; a symbol is left symbolic, and a
    name the cascade does not bind is not read."""
    param = c.param(name)
    kind = ("param" if param is not None and param.type else "tile" if name in {s.inner for s in c.splits}
            else "dim" if name in c.dims else None)
    if kind is None:
        return sympy.sympify(value)
    try:
        v = sympy.sympify(value)
    except (sympy.SympifyError, TypeError):
        raise ValueError(f"{name}={value!r}: a {kind} takes a number") from None
    if not v.is_number:
        return v
    if kind == "param":  # the check every backend binds with: an int param fits in int64
        return sympy.sympify(runtime_value(param, value if isinstance(value, (bool, numbers.Real)) else v))
    if isinstance(value, bool) or v.is_real is not True or v.is_finite is not True:
        raise ValueError(f"{name}={value!r}: a {kind} takes a finite number")
    if v != sympy.floor(v):
        raise ValueError(f"{name}={value!r}: a {kind} takes an integer")
    v = sympy.Integer(sympy.floor(v))
    low = 1 if kind == "tile" else 0
    if not low <= int(v) <= INT64_MAX:
        want = "a positive integer" if low else "an integer >= 0"
        raise ValueError(f"{name}={value!r}: a {kind} size is {want} that fits in int64 (at most {INT64_MAX})")
    return v


def bind(c: Cascade, shapes: dict | None) -> Binding:
    shapes = dict(shapes or {})
    tensors = {k: pr.as_array(v) for k, v in shapes.items() if is_tensor(v)}
    values = {k: _value(c, k, v) for k, v in shapes.items() if k not in tensors}
    for s in c.splits:
        values.setdefault(s.inner, sympy.Integer(DEFAULT_TILE))
    subs = {r.extent: values[name] for name, r in c.ranks.items() if name in values}
    extents = {name: sympy.sympify(r.extent).subs(subs) for name, r in c.ranks.items()}
    problem = cross_rank_mismatch(c, extents)
    if problem:
        raise ValueError(problem)
    _check_tensor_shapes(c, tensors, extents)
    scalars: dict[str, sympy.Expr] = dict(extents)
    for p in c.params:
        if p.type is not None:
            scalars[p.name] = values.get(p.name, sympy.Symbol(p.name, positive=True, integer=True))
    return Binding(extents, scalars, tensors)


def _check_tensor_shapes(c: Cascade, tensors: dict, extents: dict[str, sympy.Expr]) -> None:
    """A tensor given for an input has its declared rank count and, where the shapes bind them,
    its ranks' extents: a read past a smaller tensor would count as absent, silently."""
    for d in c.inputs:
        if d.name not in tensors:
            continue
        shape = tuple(tensors[d.name].shape)
        want = [extents[rank_of(i)] for i in d.indices]
        if len(shape) != len(want) or any(w.is_number and int(w) != n for w, n in zip(want, shape)):
            raise ValueError(f"tensor {d.name}[{','.join(d.indices)}] has shape {shape}, but the shapes give "
                             f"{tuple(int(w) if w.is_number else w for w in want)}")


def parts_of(c: Cascade) -> dict[str, pr.Part]:
    return {**{s.outer.lower(): pr.Part(s.rank.lower(), s.inner, True) for s in c.splits},
            **{s.inner.lower(): pr.Part(s.rank.lower(), s.inner, False) for s in c.splits}}


# ---------------------------------------------------------------------------- present points


def present_points(c: Cascade, e: Einsum, pred, b: Binding, notes: list[str]) -> sympy.Expr:
    """Points of `e`'s iteration space that `pred` (its effective predicate) keeps, exactly."""
    parts = parts_of(c)
    space = [parts[v].whole if v in parts else v for v in e.space]
    space = list(dict.fromkeys(space))
    comps = pr.components(_known(e.name, pred, b, notes), parts)
    constrained = {v for comp in comps for v in comp.vars}
    total = _prod(b.extents[rank_of(v)] for v in space if v not in constrained)
    for comp in comps:
        total *= component_count(comp, b, parts, notes)
    return sympy.expand(total)


def _known(name: str, pred, b: Binding, notes: list[str]):
    """The predicate without clauses that read tensors not given: those are data-dependent and
    are counted as all present (an upper bound), which the notes say."""
    keep = []
    for clause in pr.conjuncts(pred):
        missing = sorted({a.tensor for a in walk(clause) if isinstance(a, Access)} - set(b.tensors))
        if missing:
            notes.append(f"{name}: the clause reading {', '.join(missing)} depends on data; counted "
                         f"as all present (upper bound); pass its values to count it (shapes="
                         f"{{'{missing[0]}': tensor}}, or --tensor {missing[0]}=... on the command line)")
        else:
            keep.append(clause)
    return reduce(lambda x, y: Binary("and", x, y), keep) if keep else None


def component_count(comp: pr.Component, b: Binding, parts: dict[str, pr.Part], notes: list[str]) -> sympy.Expr:
    needed = _needed_scalars(comp, b, parts)
    free = sorted({s for n in needed for s in sympy.sympify(b.scalars[n]).free_symbols}, key=str)
    if not free:
        return sympy.Integer(_count_numeric(comp, {n: int(b.scalars[n]) for n in needed}, b, parts))
    fitted = _fit(comp, needed, free, b, parts)
    where = " and ".join(print_expr(cl) for cl in comp.clauses)
    notes.append(f"points where {where}: " + (
        "no polynomial closed form; left as present(...)" if isinstance(fitted, PRESENT)
        else "closed form fitted to exact counts at sample sizes with dims larger than params, "
             "and checked at further sizes"))
    return fitted


def _needed_scalars(comp: pr.Component, b: Binding, parts: dict[str, pr.Part]) -> list[str]:
    names = {rank_of(v) for v in comp.vars}
    for clause in comp.clauses:
        names |= {n.name for n in walk(clause) if isinstance(n, Name)}
        names |= {parts[v].inner for v in index_vars(clause) if v in parts}
    return sorted(n for n in names if n in b.scalars)


def _count_numeric(comp: pr.Component, scalars: dict[str, int], b: Binding, parts: dict[str, pr.Part]) -> int:
    slot = (comp, tuple(sorted(scalars.items())))
    if slot not in b.memo:  # one mask reaches every Einsum downstream of it: counted once
        b.memo[slot] = _count_exact(comp, scalars, b, parts)
    return b.memo[slot]


def _count_exact(comp: pr.Component, scalars: dict[str, int], b: Binding, parts: dict[str, pr.Part]) -> int:
    extents = {v: scalars[rank_of(v)] for v in comp.vars}
    try:
        return lattice.count(comp.clauses, comp.vars, extents, scalars, parts)
    except lattice.Unsupported:
        pass  # e.g. a tensor read: count box by box, else row by row, within their limits
    boxes = pr.box_count(comp.clauses, comp.vars, extents, scalars, parts, b.tensors)
    if boxes is not None:
        return boxes
    key = max(comp.vars, key=lambda v: extents[v])  # enumerate the shorter ranks as rows
    rows = pr.grid({v: n for v, n in extents.items() if v != key})
    env = pr.Env(rows, scalars, parts, b.tensors)
    per_row = pr.cumulative(comp.clauses, key, extents[key], env, [extents[key]])
    return sum(per_row.ravel().tolist())  # Python integers: the total may pass int64


def _fit(comp, needed, free, b, parts) -> sympy.Expr:
    """A polynomial in the free symbols that matches exact counts at sample sizes.

    Samples keep dims larger than runtime params (the usual regime: a window shorter than the
    sequence); the result is kept only if it reproduces counts at points not used to fit it.
    """
    rng = random.Random(0)
    dims = {rank_of(v) for v in comp.vars}
    degree = len(comp.vars)
    monomials = [m for d in range(degree + 1) for m in itertools.combinations_with_replacement(free, d)]

    def sample() -> dict:
        return {s: rng.randint(40, 90) if _is_dim(s, dims, b) else rng.randint(3, 20) for s in free}

    def exact(point: dict) -> int:
        scalars = {n: int(sympy.sympify(b.scalars[n]).subs(point)) for n in needed}
        return _count_numeric(comp, scalars, b, parts)

    points = [sample() for _ in range(len(monomials) + 2)]
    rows = sympy.Matrix([[_prod(p[s] for s in m) for m in monomials] for p in points])
    rhs = sympy.Matrix([exact(p) for p in points])
    try:
        coeffs = (rows.T * rows).LUsolve(rows.T * rhs)
    except (ValueError, ZeroDivisionError):
        coeffs = None
    if coeffs is not None:
        poly = sympy.expand(sum(cf * _prod(m) for cf, m in zip(coeffs, monomials)))
        if all(poly.subs(p) == exact(p) for p in (sample() for _ in range(4))):
            return poly
    return PRESENT(*free)


def _is_dim(symbol: sympy.Symbol, dims: set[str], b: Binding) -> bool:
    return any(symbol in sympy.sympify(b.extents[d]).free_symbols for d in dims)


def _prod(xs) -> sympy.Expr:
    return reduce(mul, xs, sympy.Integer(1))


# ---------------------------------------------------------------------------- ops


def einsum_ops(e: Einsum, points: sympy.Expr, out_points: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr]:
    """(MACs, vector ops, SFU ops) of one Einsum with `points` present points."""
    reduced = set(e.reduced)
    macs, vector, sfu = sympy.Integer(0), sympy.Integer(0), sympy.Integer(0)
    if e.reduce == "sum" and reduced:
        for term in ([f for _, f in factors] for _, factors in product_terms(e.expr)):
            operands = [f for f in term if isinstance(f, Access) and set(index_vars(f)) & reduced]
            if _contraction(operands, reduced):
                macs += points
                # Other factors (scale, 1/SD) are constant along the contraction: applied once
                # per output element, as a GEMM epilogue.
                rest = [f for f in term if not any(f is o for o in operands[:2])]
                vec, fn = _elementwise(rest)
                vector += (vec + len(rest)) * out_points
                sfu += fn * out_points
                continue
            vec, fn = _elementwise(term)
            vector += (vec + len(term)) * points  # each factor is a multiply, plus the add into the sum
            sfu += fn * points
        return macs, vector, sfu
    vec, fn = _elementwise([e.expr])
    return macs, (vec + (1 if reduced else 0)) * points, fn * points


def _contraction(operands: list[Access], reduced: set[str]) -> bool:
    return any(set(index_vars(a)) & set(index_vars(b)) & reduced
               for a, b in itertools.combinations(operands, 2))


def _elementwise(exprs) -> tuple[int, int]:
    """Vector and SFU operations per point in these expressions (not counting index math)."""
    vector = sfu = 0
    for expr in exprs:
        for node in _value_nodes(expr):
            if isinstance(node, Binary) and node.op in VECTOR_BINARY + ("and", "or"):
                vector += 1
            elif isinstance(node, Unary):
                vector += 1
            elif isinstance(node, Call) and node.fn in FUNCTIONS:  # predicate builtins: index math
                fn = FUNCTIONS[node.fn]
                if fn.cost == "sfu":
                    sfu += fn.sfu_ops
                else:
                    vector += 1
            elif isinstance(node, Call) and node.fn in UNIONS:  # k operands: k - 1 combines, vector ops (UnionForm.cost)
                vector += len(node.args) - 1
    return vector, sfu


def _value_nodes(expr):
    """Nodes of the value computation, skipping index expressions inside accesses."""
    yield expr
    if isinstance(expr, Access):
        return
    for child in (expr.operand,) if isinstance(expr, Unary) else (
            (expr.lhs, expr.rhs) if isinstance(expr, Binary) else getattr(expr, "args", ())):
        yield from _value_nodes(child)


# ---------------------------------------------------------------------------- bytes


def _input_bytes(c: Cascade, name: str, whole: sympy.Expr, preds, b: Binding, notes: list[str]) -> sympy.Expr:
    """Elements of input `name` read: all of it, except for an input read only through indirect
    indices (a paged cache), where each read moves the elements of the keys it visits, not the
    whole cache (`_visited`)."""
    reads = [(e, a) for e in c.einsums for a in e.reads if a.tensor == name]
    if not reads or not all(is_indirect(a) for _, a in reads):
        return whole
    return sympy.expand(sum((_visited(c, e, a, preds[e.name], b, notes) for e, a in reads), sympy.Integer(0)))


def _visited(c: Cascade, e: Einsum, a: Access, pred, b: Binding, notes: list[str]) -> sympy.Expr:
    """The points of `a`'s own index variables (`b, m, g, e` for `Kc[Tbl[b, m // T], m % T, g, e]`)
    that `pred`'s clauses over those variables keep: the elements that read moves. A clause over
    other variables (a causal `m <= p`) is left out, so the count is at most an upper bound."""
    own = index_vars(a)
    clauses = [cl for cl in pr.conjuncts(pred) if set(index_vars(cl)) <= set(own)]
    probe = Einsum(Access(e.name, tuple(Index(v) for v in own)), Num(0))
    kept = reduce(lambda x, y: Binary("and", x, y), clauses) if clauses else None
    if kept is None:
        return _prod(b.extents[rank_of(v)] for v in own)
    return present_points(c, probe, kept, b, notes)


# ---------------------------------------------------------------------------- entry point


def count(c: Cascade, shapes: dict | None, dtype: str = "bf16") -> Counts:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    b = bind(c, shapes)
    c = bound_indirect(c)  # a paged read is absent where its page id is out of range: not counted
    notes: list[str] = []
    rows = []
    preds = pr.effective_predicates(c)
    for e in c.einsums:
        dense = _prod(b.extents[rank_of(v)] for v in e.space)
        points = present_points(c, e, preds[e.name], b, notes) if preds[e.name] is not None else dense
        masked_lhs = preds[e.name] is not None and set(index_vars(preds[e.name])) <= set(e.lhs_vars)
        # Present output elements: counted over the left side alone (dividing the points by the
        # reduced extent is 0/0 when a reduced rank is empty, E=0).
        out_points = (present_points(c, replace(e, expr=Num(0), where=None), preds[e.name], b, notes)
                      if masked_lhs else _prod(b.extents[rank_of(v)] for v in e.lhs_vars))
        macs, vec, sfu = einsum_ops(e, points, out_points)
        rows.append(EinsumCounts(e.name, sympy.expand(points), dense, sympy.expand(macs),
                                 sympy.expand(vec), sympy.expand(sfu)))
    infos = c.tensors
    size = lambda name: _prod(b.extents[r] for r in infos[name].ranks)  # noqa: E731
    inputs = {d.name: _input_bytes(c, d.name, size(d.name), preds, b, notes) * DTYPE_BYTES[d.dtype or dtype]
              for d in c.inputs}
    outputs = {o.name: size(o.name) * DTYPE_BYTES[dtype] for o in c.outputs}
    footprints = {n: size(n) * INTERMEDIATE_BYTES for n, t in infos.items() if t.role == "intermediate"}
    return Counts(tuple(rows), inputs, outputs, footprints, dtype, tuple(dict.fromkeys(notes)))
