"""Spec text -> Cascade (DESIGN section 3). One statement per line; `#` starts a comment.

A hand-written tokenizer and recursive-descent parser, so every error can point at a token.
Names are resolved while parsing: an identifier is a dim or param (`Name`), the lower-case
name of a rank (`Index`), a tensor (followed by `[`), or a function (followed by `(`).
"""
from __future__ import annotations

import gc
import math
import re
from dataclasses import dataclass

from einsum_ir.errors import SpecError
from einsum_ir.ir import (
    DTYPES, FLOAT_DTYPES, INT_DTYPES, MAX_DEPTH, NESTED_TOO_DEEPLY, REDUCE_OPS, Access, Binary, Call, Cascade, Einsum, Expr,
    Index, Init, InputDecl, Loc, Name, Num, Output, Param, Split, Unary,
)
from einsum_ir.printer import CHAIN_GROUP, PRECEDENCE
from einsum_ir.validate import check_depth, validate

TOKEN = re.compile(r"""\s*(?:
    (?P<num>\d+\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+)
  | (?P<name>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<op>->|//|<=|>=|==|!=|[-+*/%<>=()\[\],:])
  | (?P<bad>\S))
""", re.VERBOSE)

RANK_NAME = re.compile(r"[A-Z][A-Z0-9]*$")
KEYWORDS = {"dims", "split", "param", "input", "init", "output", "where", "fill",
            "and", "or", "not", "inf"}
STATEMENT_KEYWORDS = KEYWORDS - {"inf"}  # never an operand (`inf` is a number)
BINARY_PRECEDENCE = {op: n for op, n in PRECEDENCE.items() if op not in ("not", "neg")}
COMPARISON_PRECEDENCE, NOT_PRECEDENCE = PRECEDENCE["<"], PRECEDENCE["not"]
MAX_NESTING = MAX_DEPTH  # parentheses, calls, brackets and unary operators, one level each
REGROUPABLE = {"+", "-", "*", "/", "and", "or"}  # chains that reassociate exactly
FLIPPED = {"+": "-", "-": "+", "*": "/", "/": "*"}  # inside a run joined by - or /: a - b + c = a - (b - c)
INVERTING = {"-", "/"}


@dataclass(slots=True)
class Token:
    kind: str  # num | name | op | end
    text: str
    col: int


KINDS = (None, *TOKEN.groupindex)  # group number -> kind (the groups are numbered in order)
BAD = TOKEN.groupindex["bad"]


def tokenize(line: str, lineno: int, file: str) -> list[Token]:
    tokens = []
    for m in TOKEN.finditer(line):  # one scan in C; a spec of 10,000 lines has 400,000 tokens
        group = m.lastindex
        if group == BAD:
            raise SpecError(f"unexpected character {m[group]!r}", Loc(file, lineno, m.start(group) + 1))
        tokens.append(Token(KINDS[group], m[group], m.start(group) + 1))
    tokens.append(Token("end", "", len(line) + 1))
    return tokens


def _strip_comment(line: str) -> str:
    return line.split("#", 1)[0].rstrip()


class _Scope:
    """Names declared so far, used to resolve identifiers while parsing."""

    def __init__(self) -> None:
        self.dims: list[str] = []
        self.params: dict[str, Param] = {}
        self.ranks: list[str] = []  # dims plus split ranks
        self.indices: set[str] = set()  # their index variables

    def kind(self, name: str) -> str | None:
        if name in self.params or name in self.ranks:
            return "name"
        if name in self.indices:
            return "index"
        return None


class _LineParser:
    def __init__(self, tokens: list[Token], lineno: int, file: str, scope: _Scope):
        self.tokens, self.pos = tokens, 0
        self.tok = tokens[0]  # the current token, kept in step by `advance`
        self.lineno, self.file, self.scope = lineno, file, scope
        self.depth = 0  # nesting at the current token (see `enter`)

    # -- token helpers

    def peek(self, offset: int = 1) -> Token:
        return self.tokens[min(self.pos + offset, len(self.tokens) - 1)]

    def loc(self, tok: Token | None = None) -> Loc:
        tok = tok or self.tok
        return Loc(self.file, self.lineno, tok.col, len(tok.text) or 1)

    def error(self, message: str, tok: Token | None = None) -> SpecError:
        return SpecError(message, self.loc(tok))

    def describe(self, tok: Token) -> str:
        return "end of line" if tok.kind == "end" else repr(tok.text)

    def advance(self) -> Token:
        tok = self.tok
        if tok.kind != "end":  # the end token stays current
            self.pos += 1
            self.tok = self.tokens[self.pos]
        return tok

    def accept(self, text: str) -> Token | None:
        if self.tok.kind in ("op", "name") and self.tok.text == text:
            return self.advance()
        return None

    def expect(self, text: str, what: str | None = None) -> Token:
        if self.tok.text == text and self.tok.kind != "end":
            return self.advance()
        raise self.error(f"expected {what or repr(text)}, found {self.describe(self.tok)}")

    def expect_name(self, what: str) -> Token:
        if self.tok.kind != "name":
            raise self.error(f"expected {what}, found {self.describe(self.tok)}")
        return self.advance()

    def expect_end(self) -> None:
        if self.tok.kind != "end":
            raise self.error(f"unexpected {self.describe(self.tok)} at end of statement")

    # -- expressions, by precedence climbing: or < and < not < comparison < + - < * / // % <
    # unary minus < atom. The parser's own recursion grows only with nesting (parentheses,
    # calls, brackets), never with the length of an operator chain or a run of `-`/`not`.

    def enter(self, tok: Token) -> None:
        """One more level of nesting at `tok`; past MAX_NESTING, a located error rather than a
        RecursionError here or in a later stage."""
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.error(NESTED_TOO_DEEPLY, tok)

    def binary_precedence(self) -> int:
        """The precedence of the binary operator at the current token, or 0 when there is none."""
        tok = self.tok
        return BINARY_PRECEDENCE.get(tok.text, 0) if tok.kind in ("op", "name") else 0

    def expr(self, min_precedence: int = 1) -> Expr:
        lhs = self.prefix(min_precedence)
        while (precedence := self.binary_precedence()) >= min_precedence:  # none is 0
            operands, ops = [lhs], []
            while self.binary_precedence() == precedence:
                if ops and precedence == COMPARISON_PRECEDENCE:
                    raise self.error("comparisons do not chain; join them with 'and'")
                ops.append(self.advance())
                operands.append(self.expr(precedence + 1))
            lhs = self.chain(operands, ops)
        return lhs

    def chain(self, operands: list[Expr], ops: list[Token]) -> Expr:
        """Operands joined by operators of one precedence, left-associative."""
        return _chain(operands[0], [(tok.text, self.loc(tok), x) for tok, x in zip(ops, operands[1:])])

    def prefix(self, min_precedence: int) -> Expr:
        """Runs of unary `-` (binding tighter than `*`) and `not` (looser than comparisons), read
        in a loop; `not` only where the precedence allows it (`a + not b` is an error)."""
        if self.tok.text == "not" and self.tok.kind == "name" and min_precedence <= NOT_PRECEDENCE:
            nots = []
            while self.tok.text == "not" and self.tok.kind == "name":
                self.enter(self.tok)
                nots.append(self.advance())
            expr = self.expr(NOT_PRECEDENCE)
            for tok in reversed(nots):
                expr = Unary("not", expr, self.loc(tok))
            self.depth -= len(nots)
            return expr
        minuses = []
        while self.tok.text == "-" and self.tok.kind == "op":
            self.enter(self.tok)
            minuses.append(self.advance())
        expr = self.atom()
        for tok in reversed(minuses):
            expr = negate(expr, self.loc(tok))
        self.depth -= len(minuses)
        return expr

    def atom(self) -> Expr:
        tok = self.tok
        if tok.kind == "num":
            self.advance()
            value = float(tok.text) if any(c in tok.text for c in ".eE") else int(tok.text)
            return Num(value, self.loc(tok))
        if self.tok.text == "(" and self.tok.kind == "op":
            self.enter(self.advance())
            inner = self.expr()
            self.expect(")", "')' to close '('")
            self.depth -= 1
            return inner
        # In operand position `where(` can only be the function, never the predicate keyword.
        is_function = tok.text == "where" and self.peek().text == "("
        if tok.kind != "name" or tok.text in STATEMENT_KEYWORDS and not is_function:
            raise self.error(f"expected a number, name, tensor access or '(', found {self.describe(tok)}")
        self.advance()
        if tok.text == "inf":
            return Num(math.inf, self.loc(tok))
        if self.tok.text == "(":
            return self.call(tok)
        if self.tok.text == "[":
            return self.access(tok)
        kind = self.scope.kind(tok.text)
        if kind == "name":
            return Name(tok.text, self.loc(tok))
        if kind == "index":
            return Index(tok.text, self.loc(tok))
        raise self.error(f"unknown name {tok.text!r}: not a declared dim, param or index variable", tok)

    def call(self, name: Token) -> Call:
        self.enter(self.expect("("))
        args: list[Expr] = []
        if not self.accept(")"):
            args.append(self.expr())
            while self.accept(","):
                args.append(self.expr())
            self.expect(")", f"',' or ')' in the arguments of {name.text}(...)")
        self.depth -= 1
        return Call(name.text, tuple(args), self.loc(name))

    def access(self, name: Token) -> Access:
        self.enter(self.expect("["))
        indices = [self.expr()]
        while self.accept(","):
            indices.append(self.expr())
        self.expect("]", f"',' or ']' in the indices of {name.text}[...]")
        self.depth -= 1
        return Access(name.text, tuple(indices), self.loc(name))


def _chain(first: Expr, rest: list[tuple[str, Loc, Expr]]) -> Expr:
    """`first` joined with each `(op, loc, operand)` of `rest`, left-associative.

    A chain of more than CHAIN_GROUP operands whose operators reassociate exactly (+ -, * /,
    and, or) is grouped into at most CHAIN_GROUP - 1 parenthesized runs after its first
    operand, recursively, so a 1,000-term sum is a tree a few dozen levels deep that every
    later stage walks within Python's recursion limit. The printer prints at most CHAIN_GROUP
    operands flat (einsum_ir/printer.py), so what it prints parses back to the same tree.
    """
    if len(rest) >= CHAIN_GROUP and all(op in REGROUPABLE for op, _, _ in rest):
        size = -(-len(rest) // (CHAIN_GROUP - 1))
        runs = [rest[k:k + size] for k in range(0, len(rest), size)]
        rest = [(run[0][0], run[0][1], _chain(run[0][2], [
            (FLIPPED[op] if run[0][0] in INVERTING else op, loc, x) for op, loc, x in run[1:]]))
            for run in runs]
    for op, loc, x in rest:
        first = Binary(op, first, x, loc)
    return first


def negate(expr: Expr, loc: Loc | None = None) -> Expr:
    """Unary minus; folds into number literals so `-1` is one Num everywhere."""
    if isinstance(expr, Num):
        return Num(-expr.value, loc or expr.loc)
    return Unary("-", expr, loc)


def parse(text: str, file: str = "<spec>") -> Cascade:
    """Parse and validate one cascade. Raises SpecError with file:line:col on any problem."""
    # The tokens and IR nodes form no reference cycles, and a long spec makes hundreds of
    # thousands of them, which the cyclic collector would scan again and again (a third of
    # the time of checking a 10,000-line spec): it pauses while they are built.
    collecting = gc.isenabled()
    gc.disable()
    try:
        cascade = _parse(text, file)
        validate(cascade, depth_checked=True)
    except SpecError as err:
        raise err.with_source(text) from None
    finally:
        if collecting:
            gc.enable()
    return cascade


def _parse(text: str, file: str) -> Cascade:
    scope = _Scope()
    doc_lines: list[str] = []
    in_doc = True
    inputs: list[InputDecl] = []
    splits: list[Split] = []
    inits: list[Init] = []
    einsums: list[Einsum] = []
    outputs: list[Output] = []
    saw_dims = False
    long_lines: set[int] = set()

    for lineno, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if in_doc and stripped.startswith("#"):
            doc_lines.append(stripped[1:].strip() if stripped != "#" else "")
            continue
        in_doc = in_doc and not stripped
        line = _strip_comment(raw)
        if not line.strip():
            continue
        in_doc = False
        p = _LineParser(tokenize(line, lineno, file), lineno, file, scope)
        if len(p.tokens) > MAX_DEPTH:  # only a line this long can nest too deeply (a node per token)
            long_lines.add(lineno)
        head = p.tok
        if head.kind == "name" and head.text == "dims" and p.peek().kind in ("name", "end"):
            p.advance()
            if saw_dims:
                raise p.error("dims declared twice; list every rank on one 'dims' line", head)
            saw_dims = True
            while p.tok.kind != "end":
                tok = p.expect_name("a rank name")
                _declare_rank(p, tok, scope)
            if not scope.dims:
                raise p.error("expected at least one rank name after 'dims'")
            continue
        if not saw_dims:
            raise p.error("a spec starts with a 'dims' line naming its ranks", head)
        if head.text == "split" and p.peek().kind == "name":
            p.advance()
            rank = p.expect_name("the rank to split")
            if rank.text not in scope.ranks:
                raise p.error(f"cannot split {rank.text!r}: not a declared rank", rank)
            p.expect("->")
            outer = p.expect_name("the outer rank name (e.g. M1)")
            p.expect("x", "'x' between the outer and inner rank")
            inner = p.expect_name("the inner rank name (e.g. M0)")
            p.expect_end()
            for tok in (outer, inner):
                _declare_rank(p, tok, scope, split=True)
            splits.append(Split(rank.text, outer.text, inner.text, p.loc(head)))
        elif head.text == "param" and p.peek().kind == "name":
            p.advance()
            name = p.expect_name("a param name")
            if scope.kind(name.text) or name.text in KEYWORDS:
                raise p.error(f"param {name.text!r} clashes with a declared name", name)
            if p.accept(":"):
                typ = p.expect_name("a param type: int or float")
                if typ.text not in ("int", "float"):
                    kind = "int" if typ.text in INT_DTYPES else "float" if typ.text in FLOAT_DTYPES else None
                    hint = (f"; {typ.text} is a tensor dtype (for inputs): write 'param {name.text}: {kind}'"
                            if kind else "")
                    raise p.error(f"param type must be int or float, not {typ.text!r}{hint}", typ)
                param = Param(name.text, type=typ.text, loc=p.loc(name))
            else:
                p.expect("=", "'=' and an expression, or ': int' / ': float'")
                param = Param(name.text, expr=p.expr(), loc=p.loc(name))
            p.expect_end()
            scope.params[name.text] = param
        elif head.text == "input" and p.peek().kind == "name":
            p.advance()
            while True:
                inputs.append(_input_decl(p, scope))
                if not p.accept(","):
                    break
            p.expect_end()
        elif head.text == "init" and p.peek().kind == "name":
            p.advance()
            target = p.access(p.expect_name("the iterative tensor"))
            p.expect("=")
            inits.append(Init(target, p.expr(), p.loc(head)))
            p.expect_end()
        elif head.text == "output" and p.peek().kind == "name":
            p.advance()
            while True:
                name = p.expect_name("an output tensor name")
                fill = 0.0
                if p.accept("fill"):
                    fill_expr = p.prefix(PRECEDENCE["neg"])
                    if not isinstance(fill_expr, Num):
                        raise p.error("fill takes a number, inf or -inf")
                    fill = float(fill_expr.value)
                outputs.append(Output(name.text, fill, p.loc(name)))
                if not p.accept(","):
                    break
            p.expect_end()
        else:
            einsums.append(_einsum(p))

    statements = [(x.loc, (x.expr,)) for x in scope.params.values() if x.expr is not None]
    statements += [(e.loc, (e.target, e.expr, e.where)) for e in einsums]
    statements += [(i.loc, (i.target, i.expr)) for i in inits]
    for loc, exprs in statements:
        if loc.line in long_lines:
            for expr in filter(None, exprs):
                check_depth(expr)
    if not saw_dims:
        raise SpecError("empty spec: expected a 'dims' line", Loc(file, 1, 1))
    if not outputs:
        last = len(text.splitlines()) or 1
        raise SpecError("no 'output' line: name the tensors the cascade returns", Loc(file, last, 1))
    return Cascade(
        dims=tuple(scope.dims), einsums=tuple(einsums), outputs=tuple(outputs),
        inputs=tuple(inputs), params=tuple(scope.params.values()), splits=tuple(splits),
        inits=tuple(inits), doc="\n".join(doc_lines).strip("\n"), file=file,
    )


def _declare_rank(p: _LineParser, tok: Token, scope: _Scope, split: bool = False) -> None:
    if not RANK_NAME.match(tok.text):
        raise p.error(f"rank names are upper-case (like M or M1), not {tok.text!r}", tok)
    if tok.text in scope.ranks or tok.text in scope.params:
        raise p.error(f"rank {tok.text!r} declared twice", tok)
    scope.ranks.append(tok.text)
    scope.indices.add(tok.text.lower())
    if not split:
        scope.dims.append(tok.text)


def _input_decl(p: _LineParser, scope: _Scope) -> InputDecl:
    name = p.expect_name("an input tensor name")
    p.expect("[", f"'[' and the indices of {name.text}")
    indices = []
    while True:
        idx = p.expect_name("an index variable")
        if scope.kind(idx.text) != "index":
            raise p.error(f"{idx.text!r} is not the index variable of a declared rank", idx)
        indices.append(idx.text)
        if not p.accept(","):
            break
    p.expect("]", "',' or ']'")
    dtype = None
    if p.accept(":"):
        tok = p.expect_name("a dtype")
        if tok.text not in DTYPES:
            hint = {"int": "; an integer tensor is int32 or int64 ('int' is a param type)",
                    "float": "; a floating tensor is fp32, fp16, bf16 or fp64 ('float' is a param type)"}
            raise p.error(f"unknown dtype {tok.text!r}; expected one of {', '.join(DTYPES)}"
                          f"{hint.get(tok.text, '')}", tok)
        dtype = tok.text
    return InputDecl(name.text, tuple(indices), dtype, p.loc(name))


def _einsum(p: _LineParser) -> Einsum:
    name = p.tok
    if name.kind != "name":
        raise p.error("expected a statement: dims, split, param, input, init, output, or T[...] = ...")
    p.advance()
    if p.tok.text != "[":
        raise p.error(f"expected '[' after {name.text!r}: an Einsum assigns T[indices] = expression")
    target = p.access(name)
    p.expect("=", "'=' after the left side")
    reduce, listed = "sum", None
    if p.tok.kind == "name" and p.tok.text in REDUCE_OPS and p.peek().text == "[":
        reduce_tok = p.advance()
        reduce = reduce_tok.text
        p.expect("[")
        listed = [p.expect_name("a reduced index variable")]
        while p.accept(","):
            listed.append(p.expect_name("a reduced index variable"))
        p.expect("]")
    bare = None  # `max S[p,m]`: a reduction without its bracket, which juxtaposition never is otherwise
    if listed is None and p.tok.kind == "name" and p.tok.text in REDUCE_OPS and p.peek().kind == "name":
        bare = p.advance()
        reduce = bare.text
    expr = p.expr()
    where = p.expr() if p.accept("where") else None
    p.expect_end()
    einsum = Einsum(target, expr, reduce, where, p.loc(name))
    if bare is not None:
        derived = einsum.reduced
        if not derived:
            raise p.error(f"in {name.text}, {reduce} before an expression is a reduction, but every index on the right is on "
                          f"the left, so nothing is reduced; for an elementwise {reduce} of two values write "
                          f"{reduce}(a, b)", bare)
        raise p.error(f"in {name.text}, a {reduce} reduction lists the indices it reduces: write '{reduce}[{', '.join(derived)}]' "
                      f"(the indices on the right that are absent on the left)", bare)
    if listed is not None:
        named, derived = [t.text for t in listed], einsum.reduced
        if sorted(named) != sorted(derived):
            raise SpecError(
                f"{reduce}[{', '.join(named)}] lists the reduced indices, but the indices on the "
                f"right that are absent on the left are [{', '.join(derived)}]", p.loc(listed[0]))
    return einsum


def load(path: str) -> Cascade:
    """Read and parse a `.ein` file (UTF-8; other bytes are a located SpecError)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        col = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise SpecError(f"byte 0x{data[err.start]:02x} is not UTF-8 text; a spec is a UTF-8 text file",
                        Loc(str(path), line, col)) from None
    return parse(text, file=str(path))
