"""Indirect indices as predicates: where a paged read is absent, for the kernels and the cost model.

An indirect index reads an integer input at an index position, `Kc[Tbl[b, m // T], m % T, g, e]`
(docs/spec.md, "Indirect indices"). The read is absent wherever the table read lies outside
Tbl (`m // T >= J`) or its value outside Kc's rank (`Tbl[b, m // T] < 0`, `>= N`), and so is
any other position of it outside its rank. The kernels' loads are masked there, so they never
touch memory outside a tensor, but a masked load gives 0, and a 0 taken for a present value is
a wrong answer. So the lowering (and the cost model, which counts only present points) states
those bounds as the reading Einsum's predicate:
```
S = Q * Kc[Tbl[b, m // T], m % T, g, e] * scale where m < Len[b]
  -> ... where m < Len[b] and m // T < J and Tbl[b, m // T] >= 0 and Tbl[b, m // T] < N
```
and every kernel then removes those points like any other masked point (the key loop's tile
tests, the guards, presence). A bound that the Einsum's operands already imply is left out
(`O = SN * Vc[Tbl[b, m // T], ...] / SD` reads SN, present only where S's bounds hold). A
predicate atom that reads through an indirect index becomes `(atom and bounds)`: an absent read
makes a comparison false, as the interpreter has it. What has no exact predicate form, an
indirect read under a union form (where an absent operand is the union's identity, not an
absent point), is refused with a located LoweringError.
"""
from __future__ import annotations

from dataclasses import replace

from einsum_ir.errors import LoweringError, located
from einsum_ir.functions import UNIONS
from einsum_ir.ir import (
    Access, Binary, Call, Cascade, Einsum, Expr, Index, Name, Num, Unary, chain, children, conjuncts, rebuild,
    walk,
)
from einsum_ir.validate import PresenceAnalysis, implies

_LOGIC = ("and", "or")


def is_indirect(a: Access) -> bool:
    """`a` has an index position that reads a tensor."""
    return any(isinstance(n, Access) for i in a.indices for n in walk(i))


def indirect_reads(expr: Expr | None) -> list[Access]:
    """The reads through an indirect index in `expr` (outermost reads only)."""
    return [] if expr is None else [n for n in walk(expr) if isinstance(n, Access) and is_indirect(n)]


def read_bounds(c: Cascade, a: Access) -> list[Expr]:
    """Where the indirect read `a` is inside every tensor it touches: each index position that
    is not a plain index variable, of `a` and of the tables it reads, within its rank."""
    out: list[Expr] = []
    for read in [n for i in a.indices for n in walk(i) if isinstance(n, Access)] + [a]:
        ranks = c.tensors[read.tensor].ranks
        for idx, rank in zip(read.indices, ranks):
            for bound in position_bounds(c, idx, rank):
                if bound not in out:
                    out.append(bound)
    return out


def bound_indirect(c: Cascade) -> Cascade:
    """`c` with the bounds of every indirect read stated in its reader's predicate (module
    doc); `c` itself when it has none, or when they are stated already."""
    for i in c.inits:
        if indirect_reads(i.expr):
            a = indirect_reads(i.expr)[0]
            raise LoweringError(located(a, f"the init of {i.target.tensor} reads {a.tensor} through an indirect "
                                           f"index; an init's value is read as it is, so its absent points have no "
                                           f"predicate to state: read {a.tensor} in an Einsum and init from that"))
    drafts = [_bounded(c, e) for e in c.einsums]
    if all(d is None for d in drafts):
        return c
    full = c.replace(einsums=tuple(e if d is None else _with(e, *d) for e, d in zip(c.einsums, drafts)))
    # A bound the operands imply is dropped. That leaves every Einsum's presence as it was (the
    # operands still imply the bound), so one analysis of the fully bounded cascade decides all.
    presence = PresenceAnalysis(full)
    einsums = []
    for e, d in zip(full.einsums, drafts):
        if d is not None:
            expr, where, extra = d
            e = _with(e, expr, where, [b for b in extra if not implies(presence.of(e.expr), b)])
        einsums.append(e)
    return c if tuple(einsums) == c.einsums else c.replace(einsums=tuple(einsums))


def _with(e: Einsum, expr: Expr, where: Expr | None, extra: list[Expr]) -> Einsum:
    parts = ([where] if where is not None else []) + extra
    return replace(e, expr=expr, where=chain("and", parts) if parts else None)


def _bounded(c: Cascade, e: Einsum) -> tuple[Expr, Expr | None, list[Expr]] | None:
    """(the right side, the predicate, the bounds to add) for an Einsum with indirect reads:
    conditions and predicate atoms bounded in place, the right side's reads' bounds to be
    conjoined; None when there is nothing to add."""
    reads = _value_reads(e.expr)
    if not indirect_reads(e.expr) and not indirect_reads(e.where):
        return None
    _refuse_unions(e.expr)
    expr = _bound_conditions(c, e.expr)
    where = None if e.where is None else _bound_predicate(c, e.where)
    have = conjuncts(where)
    extra: list[Expr] = []
    for a in reads:
        extra += [b for b in read_bounds(c, a) if b not in have and b not in extra]
    if not extra and expr is e.expr and where is e.where:
        return None
    return expr, where, extra


def _value_reads(expr: Expr) -> list[Access]:
    """The indirect reads of a right side whose absence makes the point absent: all but those
    in a where(cond, a, b)'s condition (a truth value there, false where absent)."""
    stack, out = [expr], []
    while stack:
        node = stack.pop()
        if isinstance(node, Access) and is_indirect(node):
            out.append(node)
        elif isinstance(node, Call) and node.fn == "where":
            stack.extend(reversed(node.args[1:]))
        else:
            stack.extend(reversed(children(node)))
    return out


def position_bounds(c: Cascade, idx: Expr, rank: str) -> list[Expr]:
    """`0 <= idx < rank` as comparisons (`idx >= 0`, `idx < rank`), without the halves that
    always hold; the Triton emitter masks its loads by the same halves."""
    if isinstance(idx, Index):
        return []  # a plain index variable: binding checks the extents
    if isinstance(idx, Binary) and idx.op == "%" and idx.rhs == Name(rank) and _nonnegative(c, idx.lhs):
        return []  # m % T at a rank of extent T
    out = [] if _nonnegative(c, idx) else [Binary(">=", idx, Num(0))]
    return out + [Binary("<", idx, Name(rank))]


def _nonnegative(c: Cascade, expr: Expr) -> bool:
    """`expr` is >= 0 for every value of its index variables and dims (params may be negative)."""
    if isinstance(expr, Index):
        return True
    if isinstance(expr, Num):
        return expr.value >= 0
    if isinstance(expr, Name):
        return expr.name in c.rank_names
    if isinstance(expr, Binary) and expr.op in ("+", "*", "//", "%"):
        return _nonnegative(c, expr.lhs) and _nonnegative(c, expr.rhs)
    if isinstance(expr, Call) and expr.fn in ("min", "max"):
        return all(_nonnegative(c, x) for x in expr.args)
    return False


def _refuse_unions(expr: Expr) -> None:
    for node in walk(expr):
        if isinstance(node, Call) and node.fn in UNIONS and indirect_reads(node):
            a = indirect_reads(node)[0]
            raise LoweringError(located(a, f"{a.tensor} is read through an indirect index inside {node.fn}(...), "
                                           f"where an absent operand is the union's identity; the kernels state "
                                           f"an indirect read's absent points as a predicate, which would remove "
                                           f"the point: read {a.tensor} in an Einsum of its own and take the "
                                           f"union of that"))


def _bound_conditions(c: Cascade, expr: Expr) -> Expr:
    """`expr` with each where(cond, a, b)'s condition bounded (`_bound_predicate`)."""
    def visit(node: Expr) -> Expr | None:
        if isinstance(node, Call) and node.fn == "where" and indirect_reads(node.args[0]):
            cond = _bound_predicate(c, node.args[0])
            return Call("where", (cond,) + tuple(rebuild(x, visit) for x in node.args[1:]), node.loc)
        return None
    return rebuild(expr, visit) if any(isinstance(n, Call) and n.fn == "where" for n in walk(expr)) else expr


def _bound_predicate(c: Cascade, pred: Expr) -> Expr:
    """`pred` with every atom that reads through an indirect index as `(atom and bounds)`."""
    if isinstance(pred, Binary) and pred.op in _LOGIC:
        lhs, rhs = _bound_predicate(c, pred.lhs), _bound_predicate(c, pred.rhs)
        return pred if (lhs, rhs) == (pred.lhs, pred.rhs) else Binary(pred.op, lhs, rhs, pred.loc)
    if isinstance(pred, Unary) and pred.op == "not":
        inner = _bound_predicate(c, pred.operand)
        return pred if inner is pred.operand else Unary("not", inner, pred.loc)
    reads = indirect_reads(pred)
    if not reads:
        return pred
    bounds = []
    for a in reads:
        bounds += [b for b in read_bounds(c, a) if b not in bounds]
    return chain("and", [pred] + bounds)
