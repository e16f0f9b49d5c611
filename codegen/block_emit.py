"""What the Triton and the CPU emitters share: values over tile axes and the expression walk.

Both emitters print a plan's Einsums as code over *tile axes* (a query tile, a key tile,
feature ranks held whole). What is the same for both lives here:

- the walk over an expression tree (Num / Name / Index / Access / Unary / Binary / Call),
  with predicate builtins printed through their expansion and functions through their
  registry spelling;
- one loop body over a key tile, in two variants: *full* (the plan proved every point present:
  no mask at all) and *masked* (guards evaluated, then either one sentinel select per guarded
  value, lowering.absence, or presence masks carried with the values);
- carried reductions: the running max (and `<max>_use`, 0 while a row has seen nothing, in
  masked tiles), rescaled running sums with their factors, presence counters;
- Einsums outside the loop, and the generated module's header.

A target subclasses `BlockEmitter` and supplies its spelling (`canon`, `align`, `num`,
`logical_not`, `logical`, `where`, `call`, `select`, `maximum`, `reduce`, `sum_term`, `load`,
`fill`, `update_sum`), its loops, loads, stores and launch.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import sympy

from einsum_ir.builtins import PREDICATES
from einsum_ir.errors import LoweringError
from einsum_ir.functions import FUNCTIONS, UNIONS, UnionForm
from einsum_ir.ir import (
    Access, Binary, Call, Cascade, Einsum, Expr, Index, Name, Num, Unary, chain, conjuncts, index_vars, product_terms, walk,
)
from einsum_ir.lowering.groups import group_tie
from einsum_ir.lowering.plan import Plan, Stage


@dataclass
class Val:
    """A value of generated code: `code` over the tile axes `axes`."""
    code: str
    axes: tuple[str, ...]
    kind: str = "float"  # float | native (Triton: a loaded float tile in its own dtype) | int | bool
    pres: str | None = None  # presence mask (code) over `pres_axes`
    pres_axes: tuple[str, ...] = ()
    fresh: bool = False  # a new temporary of the value's own shape (a target may reuse it in place)
    bound: float | None = None  # |value| <= bound where present (a number, a map the plan bounds)

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
    head += ["#", f"# Lowered cascade ({', '.join(plan.rewrites) or 'as written'}):", "#"]
    head += ["#   " + line for line in str(plan.cascade).rstrip().splitlines() if not line.startswith("#")]
    head += ["#", "# Plan:"] + ["#   " + line for line in plan.summary().splitlines()]
    head += [""] + imports
    return "\n".join(head)


def join_terms(terms: list[tuple[str, str]]) -> str:
    """Signed terms as one expression: [("+", "a"), ("-", "b")] -> "a - b"."""
    text = " ".join(f"{sign} {code}" for sign, code in terms)
    return text[2:] if text.startswith("+ ") else "-" + text[2:]


class BlockEmitter:
    """One stage of a plan -> code over tile axes; the target-independent part."""

    pos_inf, neg_inf = "math.inf", "-math.inf"

    def __init__(self, plan: Plan, stage: Stage, name: str):
        self.plan = plan
        self.c: Cascade = plan.cascade
        self.s = stage
        self.name = name
        self.local = {e.name: e for e in stage.einsums}
        self.axes_of: dict[str, tuple[str, ...]] = {}
        self.counter = 0
        self.in_loop = False
        self.masked = False
        self.summed_rows: tuple | None = None  # in a sum over query rows: where the rows are real
        self.mask_of: dict[str, tuple] = {}  # masked tiles without sentinels: value -> presence
        self.guard_cache: dict[str, tuple] = {}  # guard -> (mask code, axes), per body
        self.pres_after: dict[str, tuple] = {}  # after the loop: value -> presence
        self.finalize: list[str] = []  # statements at the end of a loop body (running max updates)
        self.alpha: dict[str, tuple] = {}  # rescale factor -> (name, axes), per body
        self.seeds: dict[str, tuple] = {}  # mask expression -> (code, axes) computed before the body

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

    def where(self, args: list[Val], axes: tuple[str, ...], pres: str | None, pax: tuple) -> Val:
        raise NotImplementedError

    def call(self, fn: str, args: list[Val], axes: tuple[str, ...], pres: str | None, pax: tuple,
             sec: Section, spelling: str | None = None) -> Val:
        """A registry function of the arguments (`spelling`: its `special` one for these arguments)."""
        raise NotImplementedError

    def fill_spelling(self, spelling: str, codes: list[str], sec: Section) -> str:
        """`spelling` over the argument codes; one it uses more than once is bound to a name first."""
        named = []
        for k, x in enumerate(codes):
            if spelling.count("{%d}" % k) > 1 and not is_simple(x):
                name = self.fresh("t")
                sec.add(f"{name} = {x}")
                x = name
            named.append(x)
        return spelling.format(*named)

    def union(self, u: UnionForm, args: list[Val], axes: tuple[str, ...]) -> Val:
        """A union form of values whose presence is known here (the final values after the
        loop, lowering.unions): each operand where present, else the form's identity; present
        where any operand is (everywhere, if one has no absent point)."""
        out, present = None, []
        for v in args:
            code = self.align(self.num(v), v.axes, axes)
            if v.pres:
                code = self.select(self.align(v.pres, v.pres_axes, axes), code, self.number(u.identity))
                present.append(Val(v.pres, v.pres_axes, "bool"))
            if out is None:
                out = code
            elif u.combine == "+":
                out = f"{out} + {code}"
            else:  # max or min of two: a select that keeps the larger or smaller
                first, second = paren(out), paren(code)
                out = self.select(f"({first} {'>=' if u.combine == 'max' else '<='} {second})", first, second)
        if len(present) < len(args):
            return Val(f"({out})", axes, "float")
        pres = present[0]
        for v in present[1:]:
            pres = self.logical("or", pres, v, self.canon(pres.axes + v.axes))
        return Val(f"({out})", axes, "float", pres.code, pres.axes)

    def select(self, cond: str, a: str, b: str) -> str:
        """Elementwise `a if cond else b`."""
        raise NotImplementedError

    def maximum(self, a: str, b: str) -> str:
        raise NotImplementedError

    def absent_as_zero(self, v: Val) -> Val:
        """`v` with its absent points set to 0. A masked product selects one factor by the mask;
        every other factor that has absent points must be finite there, and one need not be
        (1 / a saved denominator read past the last row is inf)."""
        pres, pax = v.pres, v.pres_axes
        if pres is None and self.summed_rows is not None and set(self.summed_rows[1]) <= set(v.axes):
            pres, pax = self.summed_rows  # rows past the last query: a sum over them must not see them
        if pres is None:
            return v
        return Val(self.select(self.align(pres, pax, v.axes), self.num(v), "0.0"), v.axes, "float", bound=v.bound)

    def reduce(self, op: str, code: str, axes: tuple[str, ...], red) -> tuple[str, tuple[str, ...]]:
        """`op` (max | sum | any) of `code` over those of its `axes` in `red`; code, axes left."""
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

    def int_operand(self, code: str) -> str:
        """An integer tile (index positions) combined with floats: in the floats' precision."""
        return code

    def load(self, a: Access, sec: Section) -> Val:
        """A tile of a tensor that lives outside the stage."""
        raise NotImplementedError

    def fill(self, axes: tuple[str, ...], value: str, dtype: str = "float") -> str:
        """A new tile over `axes` holding `value`."""
        raise NotImplementedError

    def arith(self, op: str, a: Val, ac: str, bc: str, axes: tuple[str, ...]) -> str:
        """`a op b` given the operands' code aligned to `axes`."""
        return f"({ac} {op} {bc})"

    def assign_guarded(self, name: str, code: str, mask: str, value: float, sec: Section, fresh: bool) -> None:
        """`name = code`, with `value` where `mask` (aligned to the value) fails; `fresh`: code
        is a new tensor (not a view of another), so a target may change it in place."""
        sec.add(f"{name} = {self.select(mask, paren(code), self.number(value))}")

    def count_presence(self, g, mask: tuple | None, sec: Section) -> None:
        """A presence counter after one key tile: every row seen (a full tile, `mask` None) or the
        rows where `mask` holds somewhere."""
        if mask is None:
            sec.add(f"{g.counter} = {self.maximum(g.counter, '1')}")
            return
        code, axes = mask
        rows = self.row_axes(g.members[0])
        seen, left = self.reduce("max", self.as_int(code), axes, [a for a in axes if a not in rows])
        sec.add(f"{g.counter} = {self.maximum(g.counter, self.align(seen, left, rows))}")

    def counter_presence(self, g) -> str:
        return f"({g.counter} > 0)"

    def update_sum(self, e: Einsum, alpha: str | None, sec: Section, red: set[str], mask) -> None:
        """`e = e * alpha + contribution` (alpha None: no rescale) for a carried sum."""
        contrib = self.reduce_sum(e, sec, red, mask)
        if alpha is None:
            sec.add(f"{e.name} = {e.name} + {contrib}")
        else:
            sec.add(f"{e.name} = {e.name} * {alpha} + {contrib}")

    # ------------------------------------------------------------------ names
    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}_{self.counter}"

    def truth(self, v: Val) -> str:
        return v.code if v.kind == "bool" else f"({v.code} != 0)"

    def row_axes(self, name: str) -> tuple[str, ...]:
        """The query-side axes of a carried value (presence is per row)."""
        return tuple(a for a in self.axes_of[name] if a not in self.feature_axes())

    def feature_axes(self) -> set[str]:
        return set(self.s.features)

    def use_name(self, name: str) -> str:
        """The running max as read inside a loop body: the new max (0 while nothing was seen,
        which only a masked tile can leave)."""
        return f"{name}_use" if self.masked else f"{name}_new"

    # ------------------------------------------------------------------ presence
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
        parts = list(dict.fromkeys(p for p in parts if p[0]))
        if not parts:
            return None, ()
        if len(parts) == 1:
            return parts[0]
        pax = self.canon([a for _, ax in parts for a in ax])
        return " & ".join(paren(self.align(p, ax, pax)) for p, ax in parts), pax

    def guard_mask(self, name: str, sec: Section) -> tuple[str, tuple]:
        """Where guard `name` holds in this tile (a stream value's guard, or a carried
        reduction's own predicate), computed once per body."""
        if name not in self.guard_cache:
            expr = self.s.guards.get(name)
            if expr is None:
                expr = self.local[name].where
            self.guard_cache[name] = self.named_mask(f"{name}_mask", expr, sec)
        return self.guard_cache[name]

    def named_mask(self, name: str, expr: Expr | None, sec: Section) -> tuple[str | None, tuple]:
        expr = self.in_tile(expr)
        if expr is None:
            return None, ()
        if repr(expr) in self.seeds:  # a mask the enclosing loop computed already
            return self.seeds[repr(expr)]
        w = self.emit(expr, sec)
        code = self.truth(w)
        if not is_simple(code):
            sec.add(f"{name} = {code}")
            code = name
        return code, w.axes

    # ------------------------------------------------------------------ expressions
    def var_axes(self, v: str) -> tuple[str, ...]:
        return (v,)

    def index(self, name: str) -> Val:
        return Val(name, self.var_axes(name), "int")

    def emit(self, expr: Expr, sec: Section) -> Val:
        """The value of `expr`; statements it needs first (loads, temporaries) go to `sec`."""
        if isinstance(expr, Num):
            v = expr.value
            return Val(self.number(v), (), "float" if isinstance(v, float) else "int", bound=abs(v))
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
            if expr.op == "/" and a.kind == b.kind == "int":  # two scalars divide as floats already
                if a.axes:
                    ac = self.float_quotient(ac)
                elif b.axes:
                    bc = self.float_quotient(bc)
            elif kind == "float":
                ac = self.int_operand(ac) if a.kind == "int" and a.axes else ac
                bc = self.int_operand(bc) if b.kind == "int" and b.axes else bc
            return Val(self.arith(expr.op, a, ac, bc, axes), axes, kind, pres, pax, fresh=True)
        assert isinstance(expr, Call)
        if expr.fn in PREDICATES:  # a predicate builtin is its expansion
            return self.emit(PREDICATES[expr.fn].expand(expr.args), sec)
        args = [self.emit(a, sec) for a in expr.args]
        axes = self.canon([x for a in args for x in a.axes])
        if expr.fn in UNIONS:
            return self.union(UNIONS[expr.fn], args, axes)
        pres, pax = self.combine_pres(args)
        if expr.fn == "where":
            return self.where(args, axes, pres, pax)
        special = FUNCTIONS[expr.fn].special
        return self.call(expr.fn, args, axes, pres, pax, sec, special(expr.args) if special else None)

    def access(self, a: Access, sec: Section) -> Val:
        """A read of a tensor: a value of this stage (with its presence) or a load."""
        t = a.tensor
        if t not in self.local or t in self.s.loads:
            return self.load(a, sec)
        if self.s.kind(t) == "group":
            return self.group_value(t, a)
        e = self.local[t]
        lhs = [i.name for i in e.target.indices]
        if [i.name if isinstance(i, Index) else None for i in a.indices] != lhs:
            raise LoweringError(f"{t} is read as {t}[{', '.join(map(str, a.indices))}]; only reads "
                                f"with its own index variables are emitted")
        kind = self.s.kind(t)
        code = self.use_name(t) if t in self.s.online and self.in_loop else t
        pres, pax = None, ()
        if kind in ("stream", "key_side") and self.masked and t in self.mask_of:
            pres, pax = self.mask_of[t]
        if kind in ("carried", "epilogue", "prologue") and not self.in_loop:
            pres, pax = self.pres_after.get(t, (None, ()))
        return Val(code, self.axes_of[t], "float", pres, pax, bound=self.s.bounds.get(t))

    # ------------------------------------------------------------------ grouped reductions
    def group_einsum(self, e: Einsum, sec: Section) -> None:
        """A grouped reduction (lowering.groups): the tile's keys reduced group by group, the
        tile holding whole groups; a group is present where one of its keys is."""
        g = self.s.grouped[e.name]
        axes = self.axes_of[e.name]
        (key,) = self.var_axes(g.key)
        full = tuple(key if a == g.var else a for a in axes)  # the summand's axes: its keys
        v = self.emit(e.expr, sec)
        rest = [a for a in conjuncts(e.where) if a != group_tie(e, g)]
        parts = [(v.pres, v.pres_axes), self.named_mask("k_valid", self.key_bound(), sec)]
        if rest:
            parts.append(self.named_mask(f"{e.name}_mask", chain("and", rest), sec))
        mask, max_ = self.conjunction([p for p in parts if p[0]])
        code = self.num(v)
        code = self.broadcast(code, v.axes, full) if set(v.axes) != set(full) else self.align(code, v.axes, full)
        if mask:
            code = self.select(self.align(mask, max_, full), code, self.number(-math.inf if e.reduce == 'max' else 0.0))
        sec.add(f"{e.name} = {self.group_reduce(e.reduce, code, full, g)}")
        if mask:
            seen = self.group_reduce("any", mask, max_, g) if key in max_ else mask
            sec.add(f"{e.name}_pres = {seen}")
            self.mask_of[e.name] = (f"{e.name}_pres", tuple(g.var if a == key else a for a in max_))

    def group_value(self, t: str, a: Access) -> Val:
        """A grouped reduction read at its key's group, `X[.., m // L]`: each key takes its group's
        value and presence, once per tile."""
        g = self.s.grouped[t]
        want = tuple(g.read_at() if i == Index(g.var) else i for i in self.local[t].target.indices)
        if tuple(a.indices) != want:
            raise LoweringError(f"{t} is read as {t}[{', '.join(map(str, a.indices))}]; a grouped reduction is "
                                f"read at its key's group, {t}[{', '.join(map(str, want))}]")
        if t not in self.group_vals:
            axes = self.axes_of[t]
            (key,) = self.var_axes(g.key)
            at_key = tuple(key if x == g.var else x for x in axes)
            pres, pax = self.mask_of.get(t, (None, ()))
            if pres is not None:
                pres, pax = self.group_read(pres, pax, g), tuple(key if x == g.var else x for x in pax)
            self.group_vals[t] = Val(self.group_read(t, axes, g), at_key, "float", pres, pax)
        return self.group_vals[t]

    def group_reduce(self, op: str, code: str, axes: tuple[str, ...], g) -> str:
        """`op` (sum | max | any) of `code` over each group of the key axis (`g.key`'s): the same
        axes with the group axis `g.var` in its place."""
        raise NotImplementedError

    def group_read(self, code: str, axes: tuple[str, ...], g) -> str:
        """A value over the group axis `g.var` read at each key of the tile (the key axis in its place)."""
        raise NotImplementedError

    def reduce_sum(self, e: Einsum, sec: Section, red: set[str], mask: tuple | None) -> str:
        """Code for the sum over tile axes `red` of e.expr, term by term (division deferral
        leaves sums of products); `mask` (code, axes) removes points."""
        return join_terms(self.sum_terms(e, sec, red, mask))

    def sum_terms(self, e: Einsum, sec: Section, red: set[str], mask: tuple | None) -> list[tuple[str, str]]:
        """The terms of `reduce_sum` as (sign "+" or "-", code). Scalar factors are multiplied
        together first, so a tile takes one multiply for all of them."""
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
            scalars = [self.num(v) for v in outer if v.scalar]
            parts = [self.align(term, term_axes, out_axes)]
            parts += [self.align(self.num(v), v.axes, out_axes) for v in outer if not v.scalar]
            if scalars:
                parts.append(scalars[0] if len(scalars) == 1 else "(" + " * ".join(scalars) + ")")
            code = " * ".join(parts)
            total.append(("-" if sign < 0 else "+", code) if sign in (1.0, -1.0) else ("+", f"{sign!r} * {code}"))
        return total

    # ------------------------------------------------------------------ one loop body
    def body(self, masked: bool, sec: Section) -> None:
        """The loop body over one key tile: in-loop Einsums, presence counters, then the running
        max updates."""
        self.masked = masked
        self.mask_of, self.guard_cache, self.finalize, self.alpha, self.views = {}, {}, [], {}, set()
        self.start_body(sec)
        self.group_vals: dict[str, Val] = {}
        self.summand_masks: dict[str, tuple | None] = {}
        for e in self.s.of_kind("stream", "key_side", "group", "carried", "tile_sum"):
            summed = self.s.kind(e.name) == "tile_sum" or set(e.reduced) & set(self.s.query)
            self.summed_rows = self.query_bound() if summed else None
            if self.s.kind(e.name) == "carried":
                self.carried_einsum(e, sec)
            elif self.s.kind(e.name) == "group":
                self.group_einsum(e, sec)
            elif self.s.kind(e.name) == "tile_sum":
                self.tile_sum(e, sec)
            else:
                self.stream_einsum(e, sec)
                if e.name in self.s.tile_stores:
                    self.tile_store(e, self.tile_presence(e, sec), sec)
            self.after_einsum(e, sec)
        self.summed_rows = None
        for g in (g for g in self.s.groups if g.counter is not None):
            if self.s.by_presence:  # seen where its own summand is present
                mask = self.summand_masks.get(g.members[0]) or (None, ())
            else:
                mask = self.conjunction([self.guard_mask(n, sec) for n in sorted(g.guards)]) if masked else None
            self.count_presence(g, mask if mask and mask[0] else None, sec)
        for line in self.finalize:
            sec.add(line)

    def start_body(self, sec: Section) -> None:
        """Statements at the top of a body (the key tile's positions)."""

    def tile_presence(self, e: Einsum, sec: Section) -> tuple | None:
        """Where a tile-stored value is present in this tile (None: everywhere)."""
        if not self.masked:
            return None
        if self.s.sentinels is None and self.mask_of.get(e.name) is not None:
            return self.mask_of[e.name]
        # a sum over a grid rank leaves no mask with the value: it is present where its guards hold
        mask = self.conjunction([self.guard_mask(g, sec) for g in self.s.tile_stores[e.name]])
        return mask if mask[0] else None

    def tile_store(self, e: Einsum, presence: tuple | None, sec: Section) -> None:
        """Write this key tile of an output over query and key ranks (absent points: its fill)."""
        raise NotImplementedError

    def tile_sum(self, e: Einsum, sec: Section) -> None:
        """This program's share of a sum over the query rank, added to the key tile's rows."""
        red = {x for v in e.reduced for x in self.var_axes(v)}
        self.add_to_tile(e, self.reduce_sum(e, sec, red, self.summand_mask(e, sec)), sec)

    def add_to_tile(self, e: Einsum, code: str, sec: Section) -> None:
        """`e[key tile rows] += code`, across programs."""
        raise NotImplementedError

    def query_bound(self) -> tuple | None:
        """Where the query tile's rows are real (a mask, or None when every row is)."""
        return None

    def after_einsum(self, e: Einsum, sec: Section) -> None:
        """Called after each in-loop Einsum (the CPU path frees dead tiles here)."""

    def as_int(self, mask: str) -> str:
        raise NotImplementedError

    def stream_einsum(self, e: Einsum, sec: Section) -> None:
        axes = self.axes_of[e.name]
        red = {x for v in e.reduced for x in self.var_axes(v)}
        fresh = True  # whether the value has storage of its own (else it is a view of a load or a broadcast)
        if e.reduced:
            if e.reduce != "sum":
                raise LoweringError(f"{e.name}: a {e.reduce} over feature ranks is not emitted")
            code, pres = self.reduce_sum(e, sec, red, None), (None, ())
            have = self.canon([x for v in index_vars(e.expr) for x in self.var_axes(v) if x not in red])
            if have and set(have) != set(axes):  # a rank only its predicate reads (a split-KV score's split)
                code, fresh = self.broadcast(code, have, axes), False
        else:
            v = self.emit(e.expr, sec)
            if not v.axes and axes:
                code = self.fill(axes, v.code)
            elif set(v.axes) != set(axes):
                code, fresh = self.broadcast(self.num(v), v.axes, axes), False
            else:
                code, fresh = self.align(self.num(v), v.axes, axes), v.fresh or v.kind == "bool"
            pres = (v.pres, v.pres_axes)
        sentinels = self.s.sentinels
        mask = None
        if self.masked and sentinels is not None and e.name in sentinels:
            value, guards = sentinels[e.name]
            mask, max_ = self.conjunction([self.guard_mask(g, sec) for g in guards])
        if mask:
            self.assign_guarded(e.name, code, self.align(mask, max_, axes), value, sec, fresh)
            fresh = True
        else:
            sec.add(f"{e.name} = {code}")
        if not fresh:  # never updated in place: that would write into an input or a shared row
            self.views.add(e.name)
        if self.masked and sentinels is None:  # presence travels with the value
            parts = [pres] + ([self.guard_mask(e.name, sec)] if e.name in self.s.guards else [])
            pres = self.conjunction(parts)
            if pres[0]:
                self.mask_of[e.name] = pres

    def broadcast(self, code: str, frm: tuple[str, ...], to: tuple[str, ...]) -> str:
        """A value over fewer axes materialized over `to` (a map whose left side has more axes)."""
        return self.align(code, frm, to)

    def summand_mask(self, e: Einsum, sec: Section) -> tuple | None:
        """The points a reduction in the loop must leave out: `carried_mask`, and the rows past
        the last query when it sums over the program's query rows (in full tiles too)."""
        mask = self.carried_mask(e, sec)
        if self.summed_rows:
            mask = self.conjunction([m for m in (mask, self.summed_rows) if m])
        return mask

    def carried_mask(self, e: Einsum, sec: Section) -> tuple | None:
        """The points a carried reduction must leave out in a masked tile."""
        if not self.masked:
            return None
        if self.s.sentinels is not None:
            mask = self.named_mask(f"{e.name}_mask", self.s.self_masked.get(e.name), sec)
            return mask if mask[0] else None  # none, or only the key bound a CPU tile always holds
        parts = [self.mask_of[f.tensor] for f in accesses(e.expr) if f.tensor in self.mask_of]
        if e.where is not None:
            parts.append(self.guard_mask(e.name, sec))
        if not parts:
            parts.append(self.named_mask("k_valid", self.key_bound(), sec))
        mask = self.conjunction([p for p in parts if p[0]])
        if mask[0] and not is_simple(mask[0]):  # not `{name}_mask`: that is its own where's, still in use
            sec.add(f"{e.name}_present = {mask[0]}")
            mask = (f"{e.name}_present", mask[1])
        return mask if mask[0] else None

    def in_tile(self, expr: Expr | None) -> Expr | None:
        """What of a mask the target must test (the CPU path's tiles never pass the key bound)."""
        return expr

    def key_bound(self) -> Expr:
        out = None
        for k in self.s.stream:
            term = Binary("<", Index(k), Name(k.upper()))
            out = term if out is None else Binary("and", out, term)
        return out

    def carried_einsum(self, e: Einsum, sec: Section) -> None:
        red = {x for v in e.reduced for x in self.var_axes(v)}
        mask = self.summand_mask(e, sec)
        self.summand_masks[e.name] = mask
        if e.reduce == "max":
            self.carried_max(e, red, mask, sec)
            return
        ratio = self.s.rescale.get(e.name, sympy.Integer(1))
        alpha = None
        if ratio != 1:
            key = str(ratio)
            if key not in self.alpha:
                name = f"alpha_{len(self.alpha)}" if self.alpha else "alpha"
                v = self.rescale_code(ratio, sec)
                sec.add(self.rescale_line(name, v.code, ratio))
                self.alpha[key] = (name, v.axes)
            name, aaxes = self.alpha[key]
            alpha = self.align(name, aaxes, self.axes_of[e.name])
        self.update_sum(e, alpha, sec, red, mask)

    def carried_max(self, e: Einsum, red: set[str], mask: tuple | None, sec: Section) -> None:
        """The update of a running max over the key tile; an online max also gives the value the
        rest of the body reads (`use_name`)."""
        axes = self.axes_of[e.name]
        v = self.emit(e.expr, sec)
        cur, x = v.axes, self.num(v)
        if mask is not None:
            cur = self.canon(cur + mask[1])
            x = self.select(self.align(mask[0], mask[1], cur), self.align(x, v.axes, cur), self.neg_inf)
        x, cur = self.reduce("max", x, cur, red)
        x = self.align(x, cur, axes)
        if e.name in self.s.online:
            sec.add(f"{e.name}_new = {self.running_max(e.name, x)}")
            if self.masked:
                sec.add(f"{e.name}_use = {self.select(f'{e.name}_new == {self.neg_inf}', '0.0', f'{e.name}_new')}")
            self.finalize.append(f"{e.name} = {e.name}_new")
        else:
            sec.add(f"{e.name} = {self.running_max(e.name, x)}")

    def running_max(self, name: str, x: str) -> str:
        """A running max `name` taking a tile's maximum `x`."""
        return self.maximum(name, x)

    def rescale_line(self, name: str, code: str, ratio: sympy.Expr) -> str:
        """The statement naming a tile's rescale factor `ratio` (printed as `code`)."""
        return f"{name} = {code}"

    def exp2(self, v: Val, sec: Section) -> Val:
        return self.call("exp2", [v], v.axes, None, (), sec)

    def rescale_code(self, e: sympy.Expr, sec: Section) -> Val:
        """A carried sum's rescale factor (sympy, over G_<max> for the old running max and
        G_<max>_new for the new one, e.g. 2**(G_GM - G_GM_new)) as code over its axes."""
        if isinstance(e, sympy.Symbol):
            n = e.name
            if n.startswith("G_") and n.endswith("_new"):
                return Val(self.use_name(n[2:-4]), self.axes_of[n[2:-4]])
            if n.startswith("G_"):
                return Val(n[2:], self.axes_of[n[2:]])
            return Val(n, ())
        if e.is_Number:
            return Val(repr(float(e)), ())
        if isinstance(e, sympy.exp):
            x = self.rescale_code(e.args[0] * sympy.Float(1.0 / math.log(2.0)), sec)
            return self.exp2(x, sec)
        if isinstance(e, sympy.Pow) and e.args[0] == 2:
            return self.exp2(self.rescale_code(e.args[1], sec), sec)
        if isinstance(e, sympy.Pow):
            b, x = (self.rescale_code(a, sec) for a in e.args)
            if e.args[1] == -1:
                return Val(f"(1.0 / {paren(b.code)})", b.axes)
            return self.call("pow", [b, x], self.canon(b.axes + x.axes), None, (), sec)
        if isinstance(e, sympy.Add):
            terms = [(a.could_extract_minus_sign(), a) for a in e.args]
            vals = [self.rescale_code(-a if neg else a, sec) for neg, a in terms]
            axes = self.canon([x for v in vals for x in v.axes])
            text = ""
            for (neg, _), v in zip(terms, vals):
                text += (" - " if neg else " + ") if text else ("-" if neg else "")
                text += paren(self.align(v.code, v.axes, axes))
            return Val(f"({text})", axes)
        if isinstance(e, sympy.Mul) and e.args[0] == -1:
            v = self.rescale_code(sympy.Mul(*e.args[1:]), sec)
            return Val(f"(-{paren(v.code)})", v.axes)
        if isinstance(e, (sympy.Max, sympy.Min)):  # a row scale's max(-G, 0) (lowering.underflow)
            out = self.rescale_code(e.args[0], sec)
            for a in e.args[1:]:
                b = self.rescale_code(a, sec)
                out = self.call("max" if isinstance(e, sympy.Max) else "min", [out, b],
                                self.canon(out.axes + b.axes), None, (), sec)
            return out
        if isinstance(e, sympy.Mul):
            vals = [self.rescale_code(a, sec) for a in e.args]
            axes = self.canon([x for v in vals for x in v.axes])
            return Val("(" + " * ".join(paren(self.align(v.code, v.axes, axes)) for v in vals) + ")", axes)
        raise LoweringError(f"cannot emit rescale factor {e}")

    # ------------------------------------------------------------------ outside the loop
    def presence_after_loop(self) -> None:
        """Each carried value's presence after the loop: its group's running max > -inf, or the
        group's counter."""
        for e in self.s.of_kind("carried"):
            g = self.s.group_of(e.name)
            rows = self.row_axes(e.name)
            if g is None:
                self.pres_after[e.name] = (None, ())
            elif g.maximum is not None:
                self.pres_after[e.name] = (f"({g.maximum} > {self.neg_inf})", self.row_axes(g.maximum))
            else:
                self.pres_after[e.name] = (self.counter_presence(g), rows)

    def counter_init(self) -> list[tuple[str, tuple[str, ...]]]:
        """The presence counters to start at 0 before the loop, with their axes."""
        return [(g.counter, self.row_axes(g.members[0])) for g in self.s.groups if g.counter]
