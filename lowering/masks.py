"""Block skipping from predicates (DESIGN section 6).

A stage's predicate is put in disjunctive normal form over atoms. An atom is

- *affine*: `a*q + b*k + c >= 0` in the query index q and key index k (c may use dims and
  runtime params): it bounds the key range of a query tile and says when a tile is full;
- *nbhd(q, k, L, w, s)* (dilation 1): the key range of a query tile is
  `[start(q_lo), start(q_hi) + w)` because the window start is monotone in q;
- anything else (a tensor read such as `Sel[b,h,p//BS,m//BS]`, `%`, dilation): *opaque*. It
  gives no bound; a conjunction holding one is never full, and when it reads a tensor the
  kernel tests each visited tile for any present point before doing its work (a block list
  computed in the kernel from the selection tensor, never an N x N mask).

The results are scalar code strings over `q_lo`, `q_hi` (first and last real query of the
tile), `k_lo`, `k_hi` (first and last key of the tile), dims and params, written with
`tl.minimum`/`tl.maximum` so the same text runs in Triton and, with a shim, in Python tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from einsum_ir.ir import Access, Binary, Call, Expr, Index, Name, Num, Unary, walk

NEG = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}


@dataclass
class Atom:
    kind: str  # "affine" | "nbhd" | "opaque"
    expr: Expr
    a: int = 0  # affine: a*q + b*k + c >= 0
    b: int = 0
    c: str = "0"
    nbhd_args: tuple[str, ...] = ()  # L, w, s as code
    tensor: bool = False
    q: str | None = None  # the query index variable the atom reads (None: none)
    k: str | None = None  # the key index variable it bounds


@dataclass
class SkipPlan:
    """Loop bounds and full-tile test for one stage.

    `ranges` is a union of boxes; each box maps a key index variable to a key range [lo, hi)
    (a missing variable spans its whole rank). Code reads `q_lo_<q>`, `q_hi_<q>` (first and
    last real query of the tile along query rank q), `k_lo_<k>`, `k_hi_<k>` and `KEYS_<k>`."""

    ranges: list[dict[str, tuple[str, str]]] = field(default_factory=list)  # [] = all tiles
    full: str = "True"  # scalar code: every point of the tile satisfies the predicate
    tensor_test: bool = False  # tiles must be tested for any present point at run time
    block_list: bool = False  # a mask tensor decides: a list kernel collects the live key tiles
    dnf: list[list[Atom]] = field(default_factory=list)
    exact: bool = True  # every atom analyzed (no opaque atom)

    def describe(self) -> str:
        if not self.dnf:
            return "dense: every key tile, masking only the partial last tile"
        parts = []
        for conj in self.dnf:
            kinds = ", ".join(a.kind for a in conj)
            parts.append(f"[{kinds}]")
        s = f"{len(self.ranges) or 'all'} key range(s) from " + " or ".join(parts)
        if self.block_list:
            s += "; key tiles come from a block list built from the mask tensor"
        elif self.tensor_test:
            s += "; each visited tile is tested for a present point in the kernel"
        return s


def to_dnf(expr: Expr, negate: bool = False) -> list[list[Expr]]:
    """Predicate -> list of conjunctions of atoms (comparisons, calls, tensor reads)."""
    if isinstance(expr, Unary) and expr.op == "not":
        return to_dnf(expr.operand, not negate)
    if isinstance(expr, Binary) and expr.op in ("and", "or"):
        op = expr.op if not negate else ("or" if expr.op == "and" else "and")
        a, b = to_dnf(expr.lhs, negate), to_dnf(expr.rhs, negate)
        if op == "or":
            return a + b
        return [x + y for x in a for y in b]
    if negate:
        if isinstance(expr, Binary) and expr.op in NEG:
            return [[Binary(NEG[expr.op], expr.lhs, expr.rhs)]]
        return [[Unary("not", expr)]]
    return [[expr]]


def _sym(expr: Expr):
    """Index expression -> sympy, or None when not affine-representable."""
    if isinstance(expr, Num):
        return sympy.Integer(expr.value) if float(expr.value).is_integer() else None
    if isinstance(expr, Name):
        return sympy.Symbol(expr.name)
    if isinstance(expr, Index):
        return sympy.Symbol("_i_" + expr.name)
    if isinstance(expr, Unary) and expr.op == "-":
        v = _sym(expr.operand)
        return None if v is None else -v
    if isinstance(expr, Binary) and expr.op in ("+", "-", "*"):
        a, b = _sym(expr.lhs), _sym(expr.rhs)
        if a is None or b is None:
            return None
        return a + b if expr.op == "+" else a - b if expr.op == "-" else a * b
    return None


def _names(code: str) -> list[str]:
    import re

    return re.findall(r"[A-Za-z_][A-Za-z_0-9]*", code)


def _p(e) -> str:
    """Print an integer sympy expression as code (parenthesized unless atomic)."""
    text = sympy.sstr(sympy.expand(e))
    return text if text.replace("_", "").isalnum() else f"({text})"


def _code(e: sympy.Expr) -> str:
    """Print a sympy integer expression over dims/params as code."""
    return "(" + sympy.sstr(sympy.expand(e)) + ")"


def classify(atom: Expr, qs: tuple[str, ...], ks: tuple[str, ...]) -> list[Atom]:
    """One predicate atom -> analyzed atom(s) (`==` gives two). An atom is analyzed when it reads
    at most one query and one key index variable."""
    has_tensor = any(isinstance(n, Access) for n in walk(atom))
    names = {n.name for n in walk(atom) if isinstance(n, Index)}
    aq, ak = [v for v in qs if v in names], [v for v in ks if v in names]
    if has_tensor or len(aq) > 1 or len(ak) > 1 or names - set(qs) - set(ks):
        return [Atom("opaque", atom, tensor=has_tensor)]
    q = aq[0] if aq else None
    k = ak[0] if ak else None
    if isinstance(atom, Binary) and atom.op in NEG and atom.op != "!=":
        lhs, rhs = _sym(atom.lhs), _sym(atom.rhs)
        if lhs is not None and rhs is not None:
            diffs = {"<=": [rhs - lhs], "<": [rhs - lhs - 1], ">=": [lhs - rhs], ">": [lhs - rhs - 1],
                     "==": [rhs - lhs, lhs - rhs]}[atom.op]
            out = []
            qsym = sympy.Symbol("_i_" + (q or "_none"))
            ksym = sympy.Symbol("_i_" + (k or "_none"))
            for d in diffs:
                d = sympy.expand(d)
                a, b = d.coeff(qsym), d.coeff(ksym)
                rest = sympy.expand(d - a * qsym - b * ksym)
                if not (a.is_Integer and b.is_Integer) or any(x.name.startswith("_i_") for x in rest.free_symbols):
                    return [Atom("opaque", atom)]
                out.append(Atom("affine", atom, int(a), int(b), _code(rest), q=q, k=k))
            return out
    if isinstance(atom, Call) and atom.fn == "nbhd" and q and k:
        args = atom.args
        if (args[0] == Index(q) and args[1] == Index(k) and (len(args) < 6 or args[5] == Num(1))):
            rest = [_sym(a) for a in args[2:5]]
            if all(r is not None for r in rest):
                codes = [_code(r) for r in rest] + (["1"] if len(rest) == 2 else [])
                return [Atom("nbhd", atom, nbhd_args=tuple(codes[:3]), q=q, k=k)]
    return [Atom("opaque", atom, tensor=has_tensor)]


def _conj_range(conj: list[Atom], ks: tuple[str, ...]):
    """Key box {k: [lo, hi)} of a conjunction over the query tile, and its full-tile condition."""
    lo = {k: ["0"] for k in ks}
    hi = {k: [f"KEYS_{k}"] for k in ks}
    full, empty = [], []
    for at in conj:
        ql = f"q_lo_{at.q}" if at.q else "0"
        qh = f"q_hi_{at.q}" if at.q else "0"
        if at.kind == "affine":
            a, b, k = at.a, at.b, at.k
            c = sympy.sympify(at.c, locals={n: sympy.Symbol(n) for n in _names(at.c)})
            Q = sympy.Symbol
            q_max = Q(qh) if a > 0 else Q(ql)  # maximizes a*q
            q_min = Q(ql) if a > 0 else Q(qh)
            if a == 0:
                q_max = q_min = sympy.Integer(0)
            if b > 0:  # k >= ceil((-a q - c)/b), loosest at q maximizing a*q
                num = _p(-a * q_max - c)
                lo[k].append(f"(tl.maximum({num}, 0) + {b - 1}) // {b}" if b != 1 else num)
                full.append(f"({_p(a * q_min + b * Q(f'k_lo_{k}') + c)} >= 0)")
            elif b < 0:  # k <= floor((a q + c)/(-b))
                nb = -b
                num = _p(a * q_max + c)
                hi[k].append(f"tl.where({num} < 0, 0, {num} // {nb} + 1)" if nb != 1 else _p(a * q_max + c + 1))
                full.append(f"({_p(a * q_min - nb * Q(f'k_hi_{k}') + c)} >= 0)")
            else:
                empty.append(f"({_p(a * q_max + c)} < 0)")
                full.append(f"({_p(a * q_min + c)} >= 0)")
        elif at.kind == "nbhd":
            L, w, s = at.nbhd_args
            k = at.k
            lo[k].append(f"_nbhd_start({ql}, {L}, {w}, {s})")
            hi[k].append(f"_nbhd_start({qh}, {L}, {w}, {s}) + {w}")
            full.append(f"(_nbhd_start({qh}, {L}, {w}, {s}) <= k_lo_{k})")
            full.append(f"(_nbhd_start({ql}, {L}, {w}, {s}) + {w} > k_hi_{k})")
        else:
            full.append("False")
    box = {}
    for k in ks:
        if len(lo[k]) > 1:
            lo[k] = lo[k][1:]  # the bounds are clamped to 0 where used
        lo_code = lo[k][0]
        for x in lo[k][1:]:
            lo_code = f"tl.maximum({lo_code}, {x})"
        hi_code = hi[k][0]
        for x in hi[k][1:]:
            hi_code = f"tl.minimum({hi_code}, {x})"
        if empty:
            hi_code = f"tl.where({' | '.join(empty)}, 0, {hi_code})"
        if (lo_code, hi_code) != ("0", f"KEYS_{k}"):
            box[k] = (lo_code, hi_code)
    full_code = " & ".join(full) if full else "True"
    if "False" in full:
        full_code = "False"
    return box, full_code


def skip_plan(pred: Expr | None, qs, ks) -> SkipPlan:
    """The skipping plan of a stage whose in-loop values are all guarded by `pred`.

    `qs`/`ks` are the query and key index variables (several when an axis flattens ranks)."""
    qs = (qs,) if isinstance(qs, str) else tuple(qs)
    ks = (ks,) if isinstance(ks, str) else tuple(ks)
    if pred is None:
        return SkipPlan()
    dnf = [[a for at in conj for a in classify(at, qs, ks)] for conj in to_dnf(pred)]
    plan = SkipPlan(dnf=dnf)
    plan.exact = all(a.kind != "opaque" for conj in dnf for a in conj)
    # opaque atoms give no loop bound: visited tiles are tested for any present point in-kernel
    # (a block list from the mask tensor, or from a predicate the bounds cannot express)
    plan.tensor_test = any(a.kind == "opaque" for conj in dnf for a in conj)
    # a predicate that reads a tensor (a block selection) gets a block list: a small kernel
    # evaluates the mask per key tile and writes the live tiles' indices; the attention kernel
    # then visits only those
    plan.block_list = any(a.tensor for conj in dnf for a in conj) and len(ks) == 1
    boxes, fulls = [], []
    for conj in dnf:
        box, full = _conj_range(conj, ks)
        boxes.append(box)
        fulls.append(full)
    fulls = [f for f in fulls if f != "False"]
    plan.full = " | ".join(f"({f})" for f in fulls) if fulls else "False"
    if any(not b for b in boxes):  # some disjunct is unbounded: every tile
        boxes = []
    elif len(boxes) > 2 or (len(boxes) == 2 and len(ks) > 1):
        # the hull of many boxes: a superset, still exact thanks to the masks
        hull = {}
        for k in ks:
            los = [b[k][0] if k in b else "0" for b in boxes]
            his = [b[k][1] if k in b else f"KEYS_{k}" for b in boxes]
            lo, hi = los[0], his[0]
            for a, b in zip(los[1:], his[1:]):
                lo, hi = f"tl.minimum({lo}, {a})", f"tl.maximum({hi}, {b})"
            hull[k] = (lo, hi)
        boxes = [hull]
    plan.ranges = boxes
    return plan
