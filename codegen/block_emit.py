"""What the Triton and the CPU emitters share: values over tile axes and the expression walk.

Both emitters lower a kernel plan's Einsum expressions to code over *tile axes* and track
presence (absent points) as boolean masks exactly like the interpreter. What is the same for
both lives here: the walk over an expression tree (Num / Name / Index / Access / Unary / Binary
/ Call), reads of the stage's own values with their presence, the combination of presence
masks, sums of products term by term, the running max (online: with `<max>_use`) and the
rescaled running sums, their rescale factors, and the generated module's header.

What differs is the spelling (`tl.*` vs `torch.*`, how axes broadcast, how a tensor is read,
how one product term is reduced: `tl.dot` vs `torch.einsum`). A target subclasses
`BlockEmitter` and supplies it: `canon`, `align`, `num`, `logical_not`, `logical`, `nbhd`,
`where`, `call`, `select`, `maximum`, `reduce`, `sum_term`, `load`; and, where the default
does not fit, `pos_inf`/`neg_inf`, `float_quotient`, `index`, `exp`, `after_loop_kinds`. The
loop structure, loads, stores and launch stay in the target's emitter.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import sympy

from einsum_ir.errors import LoweringError
from einsum_ir.ir import (
    Access, Binary, Call, Cascade, Einsum, Expr, Index, Name, Num, Unary, product_terms, walk,
)
from einsum_ir.lowering.plan import Plan, Stage


@dataclass
class Val:
    """A value of generated code: `code` over the tile axes `axes`."""
    code: str
    axes: tuple[str, ...]
    kind: str = "float"  # float | native (Triton: a loaded float tile in its own dtype) | int | bool
    pres: str | None = None  # presence mask (code) over `pres_axes`
    pres_axes: tuple[str, ...] = ()

    @property
    def scalar(self) -> bool:
        return not self.axes


@dataclass
class Section:
    """Lines of generated code at one indentation level."""
    lines: list[str] = field(default_factory=list)
    indent: int = 1

    def add(self, line: str) -> None:
        self.lines.append("    " * self.indent + line)


_SIMPLE = re.compile(r"[A-Za-z_][A-Za-z_0-9]*(\[[^\[\]]*\])?|-?[0-9.e+-]+|math\.inf")


def is_simple(code: str) -> bool:
    """A name, a subscripted name or a number: safe to repeat and to index without parentheses."""
    return _SIMPLE.fullmatch(code) is not None


def paren(code: str) -> str:
    """`code` as one operand: parenthesized unless it is simple or already wrapped whole."""
    if is_simple(code):
        return code
    if code.startswith("(") and code.endswith(")"):
        depth = 0
        for i, ch in enumerate(code):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and i < len(code) - 1:
                break
        else:
            return code
    return f"({code})"


def accesses(expr: Expr) -> list[Access]:
    return [n for n in walk(expr) if isinstance(n, Access)]


def module_header(plan: Plan, cascade_text: str, title: str, imports: list[str]) -> str:
    """The generated module's header comment (`title`, the cascade as written, as lowered, the
    plan), then the `imports` lines."""
    head = [f"# {title}", "#"]
    head += ["#   " + line if line else "#" for line in cascade_text.rstrip().splitlines()]
    head += ["#", "# Lowered cascade (after division deferral):", "#"]
    head += ["#   " + line for line in str(plan.cascade).rstrip().splitlines() if not line.startswith("#")]
    head += ["#", "# Plan:"] + ["#   " + line for line in plan.summary().splitlines()]
    head += [""] + imports
    return "\n".join(head)


class BlockEmitter:
    """One stage of a plan -> code over tile axes; the target-independent part."""

    pos_inf, neg_inf = "math.inf", "-math.inf"
    # the stage kinds whose values are read after the key loop with their presence
    after_loop_kinds: tuple[str, ...] = ("carried", "epilogue", "prologue")

    def __init__(self, plan: Plan, stage: Stage, name: str):
        self.plan = plan
        self.c: Cascade = plan.cascade
        self.s = stage
        self.name = name
        self.local = {e.name: e for e in stage.einsums}
        self.axes_of: dict[str, tuple[str, ...]] = {}
        self.counter = 0
        self.track_any = any(e.where is not None for e in stage.einsums)
        self.in_loop = False
        self.masked = False
        self.mask_of: dict[str, tuple] = {}
        self.pres_after: dict[str, tuple] = {}
        self.finalize: list[str] = []  # statements at the end of a loop body (online max updates)
        self.alpha: dict[str, tuple] = {}  # rescale factor -> (name, axes), per loop body

    # ------------------------------------------------------------------ target spelling
    def canon(self, axes) -> tuple[str, ...]:
        """The axes in the target's canonical order."""
        raise NotImplementedError

    def align(self, code: str, frm: tuple[str, ...], to: tuple[str, ...]) -> str:
        """`code` over axes `frm` broadcast to axes `to`."""
        raise NotImplementedError

    def num(self, v: Val) -> str:
        """Code for v usable in float arithmetic."""
        raise NotImplementedError

    def number(self, value: float) -> str:
        """A numeric constant (infinities spelled as the target spells them)."""
        if isinstance(value, float) and math.isinf(value):
            return self.pos_inf if value > 0 else self.neg_inf
        return repr(value)

    def logical_not(self, v: Val) -> Val:
        raise NotImplementedError

    def logical(self, op: str, a: Val, b: Val, axes: tuple[str, ...]) -> Val:
        """`a and b` / `a or b` (no presence: a predicate's absent points are false)."""
        raise NotImplementedError

    def nbhd(self, args: list[Val]) -> Val:
        raise NotImplementedError

    def where(self, args: list[Val], axes: tuple[str, ...], pres: str | None, pax: tuple) -> Val:
        raise NotImplementedError

    def call(self, fn: str, args: list[Val], axes: tuple[str, ...], pres: str | None, pax: tuple,
             sec: Section) -> Val:
        """A math function (exp, log, max, pow, ...) of the arguments."""
        raise NotImplementedError

    def select(self, cond: str, a: str, b: str) -> str:
        """Elementwise `a if cond else b`."""
        raise NotImplementedError

    def maximum(self, a: str, b: str) -> str:
        raise NotImplementedError

    def reduce(self, op: str, code: str, axes: tuple[str, ...], red) -> tuple[str, tuple[str, ...]]:
        """`op` (max | sum; on the CPU also any) of `code` over those of its `axes` in `red`;
        the code and the axes left."""
        raise NotImplementedError

    def sum_term(self, inner: list[Val], outer: list[Val], red: set[str], out_axes: tuple[str, ...],
                 mask: tuple | None, sec: Section) -> tuple[str, tuple[str, ...], list[Val]]:
        """One product term of a sum over the tile axes `red`: `inner` are its factors over a
        reduced axis, `outer` the rest; `mask` (code, axes) removes points. Returns the reduced
        code, its axes and the outer factors still to multiply in."""
        raise NotImplementedError

    def float_quotient(self, code: str) -> str:
        """The dividend of an int / int division, so that it divides as floats."""
        return code

    def load(self, a: Access, sec: Section) -> Val:
        """A tile of a tensor that lives outside the stage."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}_{self.counter}"

    def truth(self, v: Val) -> str:
        return v.code if v.kind == "bool" else f"({v.code} != 0)"

    def combine_pres(self, vals: list[Val]) -> tuple[str | None, tuple]:
        """The presence of a value computed from `vals`: the conjunction of their masks."""
        parts, seen = [], set()
        for v in vals:
            if v.pres and v.pres not in seen:
                seen.add(v.pres)
                parts.append((v.pres, v.pres_axes))
        return self.conjunction(parts)

    def conjunction(self, parts: list[tuple[str, tuple]]) -> tuple[str | None, tuple]:
        """Masks (code, axes) and-ed over the union of their axes; (None, ()) for none."""
        if not parts:
            return None, ()
        if len(parts) == 1:
            return parts[0]
        pax = self.canon([a for _, ax in parts for a in ax])
        return " & ".join(self.align(p, ax, pax) for p, ax in parts), pax

    def var_axes(self, v: str) -> tuple[str, ...]:
        return (v,)

    def index(self, name: str) -> Val:
        return Val(name, self.var_axes(name), "int")

    def emit(self, expr: Expr, sec: Section) -> Val:
        """The value of `expr`; statements it needs first (loads, temporaries) go to `sec`."""
        if isinstance(expr, Num):
            v = expr.value
            return Val(self.number(v), (), "float" if isinstance(v, float) else "int")
        if isinstance(expr, Name):
            p = self.c.param(expr.name)
            return Val(expr.name, (), "int" if p is None or p.type == "int" else "float")
        if isinstance(expr, Index):
            return self.index(expr.name)
        if isinstance(expr, Access):
            return self.access(expr, sec)
        if isinstance(expr, Unary):
            v = self.emit(expr.operand, sec)
            if expr.op == "not":
                return self.logical_not(v)
            return Val(f"(-{paren(self.num(v))})", v.axes, "int" if v.kind == "int" else "float",
                       v.pres, v.pres_axes)
        if isinstance(expr, Binary):
            a, b = self.emit(expr.lhs, sec), self.emit(expr.rhs, sec)
            axes = self.canon(a.axes + b.axes)
            if expr.op in ("and", "or"):
                return self.logical(expr.op, a, b, axes)
            pres, pax = self.combine_pres([a, b])
            ac, bc = self.align(self.num(a), a.axes, axes), self.align(self.num(b), b.axes, axes)
            if expr.op in ("<", "<=", ">", ">=", "==", "!="):
                return Val(f"({ac} {expr.op} {bc})", axes, "bool", pres, pax)
            kind = "int" if a.kind == b.kind == "int" and expr.op != "/" else "float"
            if expr.op == "/" and a.kind == b.kind == "int":
                ac = self.float_quotient(ac)
            return Val(f"({ac} {expr.op} {bc})", axes, kind, pres, pax)
        assert isinstance(expr, Call)
        args = [self.emit(a, sec) for a in expr.args]
        if expr.fn == "nbhd":
            return self.nbhd(args)
        axes = self.canon([x for a in args for x in a.axes])
        pres, pax = self.combine_pres(args)
        if expr.fn == "where":
            return self.where(args, axes, pres, pax)
        return self.call(expr.fn, args, axes, pres, pax, sec)

    def reduce_sum(self, e: Einsum, sec: Section, red: set[str], mask: tuple | None) -> str:
        """Code for the sum over tile axes `red` of e.expr, term by term (division deferral
        leaves sums of products); `mask` (code, axes) removes points."""
        out_axes = self.axes_of[e.name]
        total = []
        for sign, factors in product_terms(e.expr, distribute=True):
            vals = []
            for rec, f in factors:
                v = self.emit(f, sec)
                if rec:
                    v = Val(f"(1.0 / {paren(self.num(v))})", v.axes, "float", v.pres, v.pres_axes)
                vals.append(v)
            inner = [v for v in vals if set(v.axes) & red]
            outer = [v for v in vals if not set(v.axes) & red]
            term, term_axes, outer = self.sum_term(inner, outer, red, out_axes, mask, sec)
            parts = [self.align(term, term_axes, out_axes)]
            parts += [self.align(self.num(v), v.axes, out_axes) for v in outer]
            code = " * ".join(parts)
            total.append(("- " if sign < 0 else "+ ") + code if sign in (1.0, -1.0) else f"+ {sign!r} * {code}")
        text = " ".join(total)
        return text[2:] if text.startswith("+ ") else "-" + text[2:]

    def carried_max(self, e: Einsum, red: set[str], mask: tuple | None, sec: Section) -> None:
        """The update of a running max over the key tile; an online max also gives `<name>_use`
        (the new max, 0 where nothing was seen yet) for the rescaling and the loop body."""
        axes = self.axes_of[e.name]
        v = self.emit(e.expr, sec)
        cur, x = v.axes, self.num(v)
        if mask is not None:
            cur = self.canon(cur + mask[1])
            x = self.select(self.align(mask[0], mask[1], cur), self.align(x, v.axes, cur), self.neg_inf)
        x, cur = self.reduce("max", x, cur, red)
        x = self.align(x, cur, axes)
        if e.name in self.s.online:
            sec.add(f"{e.name}_new = {self.maximum(e.name, x)}")
            sec.add(f"{e.name}_use = {self.select(f'{e.name}_new == {self.neg_inf}', '0.0', f'{e.name}_new')}")
            self.finalize.append(f"{e.name} = {e.name}_new")
        else:
            sec.add(f"{e.name} = {self.maximum(e.name, x)}")

    def carried_sum(self, e: Einsum, contrib: str, sec: Section) -> None:
        """The update of a running sum by this key tile's `contrib`, rescaled when its max moved;
        equal rescale factors are computed once per body."""
        axes = self.axes_of[e.name]
        ratio = self.s.rescale.get(e.name, sympy.Integer(1))
        if ratio == 1:
            sec.add(f"{e.name} = {e.name} + {contrib}")
            return
        key = str(ratio)
        if key not in self.alpha:
            name = f"alpha_{len(self.alpha)}" if self.alpha else "alpha"
            v = self.rescale_code(ratio, sec)
            sec.add(f"{name} = {v.code}")
            self.alpha[key] = (name, v.axes)
        name, aaxes = self.alpha[key]
        sec.add(f"{e.name} = {e.name} * {self.align(name, aaxes, axes)} + {contrib}")

    def exp(self, v: Val, sec: Section) -> Val:
        """exp(v) in a rescale factor (a target may spell it apart from the expression walk)."""
        return self.call("exp", [v], v.axes, None, (), sec)

    def rescale_code(self, e: sympy.Expr, sec: Section) -> Val:
        """A carried sum's rescale factor (sympy, over G_<max> for the old running max and
        G_<max>_new for the new one, e.g. exp(G_GM - G_GM_new)) as code over its axes."""
        if isinstance(e, sympy.Symbol):
            n = e.name
            if n.startswith("G_") and n.endswith("_new"):
                return Val(f"{n[2:-4]}_use", self.axes_of[n[2:-4]])
            if n.startswith("G_"):
                return Val(n[2:], self.axes_of[n[2:]])
            return Val(n, ())
        if e.is_Number:
            return Val(repr(float(e)), ())
        if isinstance(e, sympy.exp):
            return self.exp(self.rescale_code(e.args[0], sec), sec)
        if isinstance(e, sympy.Pow):
            b, x = (self.rescale_code(a, sec) for a in e.args)
            if e.args[1] == -1:
                return Val(f"(1.0 / {paren(b.code)})", b.axes)
            b, x = (Val(paren(v.code), v.axes) for v in (b, x))
            return self.call("pow", [b, x], self.canon(b.axes + x.axes), None, (), sec)
        if isinstance(e, sympy.Add):
            terms = [(a.could_extract_minus_sign(), a) for a in e.args]
            vals = [self.rescale_code(-a if neg else a, sec) for neg, a in terms]
            axes = self.canon([x for v in vals for x in v.axes])
            text = ""
            for (neg, _), v in zip(terms, vals):
                text += (" - " if neg else " + ") if text else ("-" if neg else "")
                text += self.align(v.code, v.axes, axes)
            return Val(text, axes)
        if isinstance(e, sympy.Mul) and e.args[0] == -1:
            v = self.rescale_code(sympy.Mul(*e.args[1:]), sec)
            return Val(f"(-{paren(v.code)})", v.axes)
        if isinstance(e, sympy.Mul):
            vals = [self.rescale_code(a, sec) for a in e.args]
            axes = self.canon([x for v in vals for x in v.axes])
            return Val("(" + " * ".join(paren(self.align(v.code, v.axes, axes)) for v in vals) + ")", axes)
        raise LoweringError(f"cannot emit rescale factor {e}")

    def access(self, a: Access, sec: Section) -> Val:
        """A read of a tensor: a value of this stage (with its presence) or a load."""
        t = a.tensor
        if t not in self.local or t in self.s.loads:
            return self.load(a, sec)
        e = self.local[t]
        lhs = [i.name for i in e.target.indices]
        if [i.name if isinstance(i, Index) else None for i in a.indices] != lhs:
            raise LoweringError(f"{t} is read as {t}[{', '.join(map(str, a.indices))}]; only reads "
                                f"with its own index variables are emitted")
        kind = self.s.kind[t]
        code = f"{t}_use" if t in self.s.online and self.in_loop else t
        pres, pax = None, ()
        if kind in ("stream", "key_side") and self.masked and t in self.mask_of:
            pres, pax = self.mask_of[t]
        if kind in self.after_loop_kinds and not self.in_loop:
            pres, pax = self.pres_after.get(t, (None, ()))
        return Val(code, self.axes_of[t], "float", pres, pax)

