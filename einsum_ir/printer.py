"""Cascade -> spec text. The output parses back to an equal cascade."""
from __future__ import annotations

from einsum_ir.ir import (
    ARITHMETIC_OPS, Access, Binary, Call, Cascade, Einsum, Expr, Index, Init, Name, Num, Unary, format_number,
)

# Binding strength; a child binds at least as tightly as its parent or gets parentheses.
PRECEDENCE = {
    "or": 1, "and": 2, "not": 3,
    "<": 4, "<=": 4, ">": 4, ">=": 4, "==": 4, "!=": 4,
    "+": 5, "-": 5,
    "*": 6, "/": 6, "//": 6, "%": 6,
    "neg": 7,
}
ATOM = 8
CHAIN_GROUP = 16  # operands one printed chain holds at most (the parser groups longer ones)


def precedence(expr: Expr) -> int:
    if isinstance(expr, Binary):
        return PRECEDENCE[expr.op]
    if isinstance(expr, Unary):
        return PRECEDENCE["not" if expr.op == "not" else "neg"]
    if isinstance(expr, Num) and (expr.value < 0):
        return PRECEDENCE["neg"]
    return ATOM


def print_expr(expr: Expr, compact: bool = False) -> str:
    """Spec text for an expression; `compact` drops the spaces around operators, as inside
    index brackets (`K[b,h,m1*M0+m0,e]`)."""
    if isinstance(expr, Num):
        return format_number(expr.value)
    if isinstance(expr, (Name, Index)):
        return expr.name
    if isinstance(expr, Access):
        return f"{expr.tensor}[{','.join(print_expr(i, compact=True) for i in expr.indices)}]"
    if isinstance(expr, Call):
        sep = "," if compact else ", "
        return f"{expr.fn}({sep.join(print_expr(a, compact) for a in expr.args)})"
    if isinstance(expr, Unary):
        # A prefix operator's operand of equal strength needs no parentheses (`not not a`,
        # `- -a`): they would add a level of nesting per operator to what parses back.
        inner = _wrap(expr.operand, precedence(expr), False, compact)
        return f"not {inner}" if expr.op == "not" else f"- {inner}" if inner.startswith("-") else f"-{inner}"
    assert isinstance(expr, Binary)
    mine = PRECEDENCE[expr.op]
    # A chain of one strength prints flat down its left spine (left-associative), at most
    # CHAIN_GROUP operands: the parser groups a longer flat chain into runs (einsum_ir/parser.py),
    # so a longer spine keeps its bottom part in parentheses and parses back to this tree.
    spine = [expr]
    while mine != PRECEDENCE["<"] and isinstance(spine[-1].lhs, Binary) and PRECEDENCE[spine[-1].lhs.op] == mine:
        spine.append(spine[-1].lhs)
    if len(spine) >= CHAIN_GROUP:
        text = f"({print_expr(spine[CHAIN_GROUP - 1], compact)})"
        spine = spine[:CHAIN_GROUP - 1]
    else:
        text = _wrap(spine[-1].lhs, mine, False, compact)
    for node in reversed(spine):
        rhs = _wrap(node.rhs, mine, True, compact)
        text = f"{text}{node.op}{rhs}" if compact and node.op in ARITHMETIC_OPS else f"{text} {node.op} {rhs}"
    return text


def _wrap(child: Expr, parent: int, right: bool, compact: bool) -> str:
    text = print_expr(child, compact)
    mine = precedence(child)
    # Left-associative operators: a right child of equal strength needs parentheses;
    # comparisons do not chain, so either side of equal strength does.
    needs = mine < parent or (mine == parent and (right or parent == PRECEDENCE["<"]))
    if isinstance(child, Unary) and child.op == "-" and parent < PRECEDENCE["neg"]:
        needs = mine < parent
    return f"({text})" if needs else text


def print_einsum(e: Einsum, width: int = 0) -> str:
    """One Einsum line; `width` pads the left side so a cascade's `=` signs line up."""
    rhs = print_expr(e.expr)
    if e.reduce != "sum":
        rhs = f"{e.reduce}[{','.join(e.reduced)}] {rhs}"
    text = f"{print_expr(e.target).ljust(width)} = {rhs}"
    if e.where is not None:
        text += f" where {print_expr(e.where)}"
    return text


def print_init(i: Init) -> str:
    return f"init {print_expr(i.target)} = {print_expr(i.expr)}"


def print_cascade(c: Cascade) -> str:
    lines = [f"# {line}".rstrip() for line in c.doc.splitlines()]
    lines.append("dims " + " ".join(c.dims))
    lines += [f"split {s.rank} -> {s.outer} x {s.inner}" for s in c.splits]
    for p in c.params:
        lines.append(f"param {p.name} = {print_expr(p.expr)}" if p.expr is not None
                     else f"param {p.name}: {p.type}")
    if c.inputs:
        decls = []
        for d in c.inputs:
            text = f"{d.name}[{','.join(d.indices)}]"
            decls.append(text + (f": {d.dtype}" if d.dtype else ""))
        lines.append("input " + ", ".join(decls))
    lines += [print_init(i) for i in c.inits]
    width = max((len(print_expr(e.target)) for e in c.einsums), default=0)
    lines += [print_einsum(e, width) for e in c.einsums]
    outs = []
    for o in c.outputs:
        outs.append(o.name if o.fill == 0 else f"{o.name} fill {format_number(o.fill)}")
    lines.append("output " + ", ".join(outs))
    return "\n".join(lines) + "\n"
