"""Exact counts of the points of a box where a predicate holds, in closed form per piece.

The cost model counts present points (cost_model.counts) one component at a time: clauses of a
`where` predicate over a few index variables. For clauses of index arithmetic (+ and -, * by a
constant, // and % by a constant, min, max, comparisons, and/or/not, builtins by their
expansion) this module counts them with Python integers, never row by row, so a count at
P = M = 1e12 costs what one at P = M = 1e3 does, and needs no torch:

1. Residues. With the row index r = Dr*u + a and the key index k = Dk*w + b, every floor and
   remainder is affine in (u, w) once Dr and Dk are suitable multiples of the divisors. They
   are found by trying: a floor that is not affine multiplies its period and starts again.
2. Piecewise-linear values. Every index expression is then `max_i min_j f_ij(u, w)` with
   affine f_ij (the max-min normal form, closed under +, -, min, max, * by a constant and
   floors, which commute with min and max).
3. Thresholds. A comparison `X >= 0` whose forms share one key coefficient c is `w >= T(u)`
   (c > 0) or `w < T(u)` (c < 0), T piecewise affine in the row; one without the key is a row
   condition; one whose forms differ in the key splits into its forms (X >= 0 iff for some i
   every f_ij >= 0).
4. Sweep. The rows split wherever two candidate pieces cross (two forms of one value, pieces
   of two thresholds, a threshold piece and 0 or the key extent, a row condition's form and
   0). Between two cuts every value is one fixed form, the thresholds keep their order and
   the row conditions their truth, so a row's count is affine in u and the rows of the piece
   sum in closed form from its first and last row.

Anything else (tensor reads, true division, products of two indices, fractions) raises
Unsupported, and the caller counts another way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from einsum_ir.builtins import PREDICATES
from einsum_ir.ir import COMPARISON_OPS, Binary, Call, Expr, Index, Name, Num, Unary, walk

MAX_FORMS = 512  # affine forms in one value's max-min form
MAX_RESIDUES = 1 << 14  # residue pairs (a, b) one count may try
MAX_FIXED = 1 << 12  # assignments of the component's other variables, enumerated

Form = tuple[int, int, int]  # (u, w, 1) coefficients: cu*u + cw*w + c0
PL = tuple[tuple[Form, ...], ...]  # max over groups of min over forms


class Unsupported(ValueError):
    """The predicate is outside what this module counts in closed form; the message says why."""


@dataclass
class _Period(Exception):
    """A floor is not affine in `var` ("u" or "w") until its period is `factor` times longer."""

    var: str
    factor: int


# ---------------------------------------------------------------------------- max-min algebra


def _const(c: int) -> PL:
    return (((0, 0, c),),)


def _is_const(x: PL) -> bool:
    return len(x) == 1 and len(x[0]) == 1 and x[0][0][:2] == (0, 0)


def _norm(groups) -> PL:
    """Deduplicated groups, a group dropped when another's forms are a subset of its own (its
    minimum can only be smaller, so the maximum never takes it)."""
    groups = list(groups)
    if len(groups) == 1 and len(groups[0]) == 1:  # one affine form: most values
        return (tuple(groups[0]),)
    sets = list(dict.fromkeys(frozenset(g) for g in groups))
    keep = [g for g in sets if not any(h < g for h in sets)]
    if sum(map(len, keep)) > MAX_FORMS:
        raise Unsupported(f"a value has more than {MAX_FORMS} affine pieces")
    return tuple(tuple(sorted(g)) for g in keep)


def _add(x: PL, y: PL) -> PL:
    return _norm(tuple((f[0] + g[0], f[1] + g[1], f[2] + g[2]) for f in gx for g in gy)
                 for gx in x for gy in y)


def _min(x: PL, y: PL) -> PL:
    return _norm(gx + gy for gx in x for gy in y)


def _max(x: PL, y: PL) -> PL:
    return _norm(x + y)


def _neg(x: PL) -> PL:
    """-max_i min_j f = min_i max_j (-f), back in max-min form by distributing: one form per
    group chosen, in every way."""
    choices: list[tuple[Form, ...]] = [()]
    for group in x:
        choices = [c + ((-f[0], -f[1], -f[2]),) for c in choices for f in group]
        if len(choices) * len(x) > MAX_FORMS:
            raise Unsupported(f"a negated value has more than {MAX_FORMS} affine pieces")
    return _norm(choices)


def _scale(x: PL, s: int) -> PL:
    if s < 0:
        return _neg(_scale(x, -s))
    return _norm(tuple((s * f[0], s * f[1], s * f[2]) for f in g) for g in x)


def _floordiv(x: PL, d: int) -> PL:
    """floor(x / d) for d > 0: monotone, so it applies form by form; affine only when d divides
    the form's coefficients, else the residues' period must grow."""
    out = []
    for g in x:
        forms = []
        for cu, cw, c0 in g:
            if cu % d:
                raise _Period("u", d // math.gcd(cu, d))
            if cw % d:
                raise _Period("w", d // math.gcd(cw, d))
            forms.append((cu // d, cw // d, c0 // d))
        out.append(forms)
    return _norm(out)


def _integer(x: PL, what: str) -> int:
    if not _is_const(x):
        raise Unsupported(f"{what} must be a constant")
    return x[0][0][2]


# ---------------------------------------------------------------------------- linearization


@dataclass(frozen=True)
class _Env:
    """The substitution of one residue pair: row = dr*u + a, key = dk*w + b, others fixed.
    `cache` keeps values across residue pairs: a value that reads only the row is the same
    for every key residue (a block mask's periods make thousands of pairs)."""

    row: str | None
    key: str
    dr: int
    a: int
    dk: int
    b: int
    fixed: dict[str, int]
    scalars: dict[str, int]
    parts: dict  # split index variable -> cost_model.predicates.Part
    cache: dict

    def reads(self, e: Expr) -> tuple[bool, bool]:
        """Whether `e` reads the row and the key (through split parts too)."""
        found = self.cache.get(("reads", id(e)))
        if found is None:
            names = {self.parts[n.name].whole if n.name in self.parts else n.name
                     for n in walk(e) if isinstance(n, Index)}
            found = self.cache[("reads", id(e))] = (self.row in names, self.key in names)
        return found


def _linear(e: Expr, env: _Env) -> PL:
    reads_row, reads_key = env.reads(e)
    slot = (id(e), env.a if reads_row else None, env.b if reads_key else None)
    if slot not in env.cache:
        env.cache[slot] = _linear_node(e, env)
    return env.cache[slot]


def _variable(name: str, env: _Env) -> PL:
    if name == env.key:
        return (((0, env.dk, env.b),),)
    if name == env.row:
        return (((env.dr, 0, env.a),),)
    if name in env.fixed:
        return _const(env.fixed[name])
    raise Unsupported(f"index {name} is not a variable of the component")


def _linear_node(e: Expr, env: _Env) -> PL:
    if isinstance(e, Num):
        if isinstance(e.value, float) and not e.value.is_integer():
            raise Unsupported(f"the number {e.value} is not an integer")
        return _const(int(e.value))
    if isinstance(e, Name):
        value = env.scalars.get(e.name)
        if not isinstance(value, int):
            raise Unsupported(f"{e.name} has no integer value")
        return _const(value)
    if isinstance(e, Index):
        part = env.parts.get(e.name)
        if part is None:
            return _variable(e.name, env)
        whole, tile = _variable(part.whole, env), env.scalars[part.inner]
        outer = _floordiv(whole, tile)
        return outer if part.outer else _add(whole, _scale(outer, -tile))
    if isinstance(e, Unary) and e.op == "-":
        return _neg(_linear(e.operand, env))
    if isinstance(e, Binary) and e.op in ("+", "-", "*", "//", "%"):
        x, y = _linear(e.lhs, env), _linear(e.rhs, env)
        if e.op == "+":
            return _add(x, y)
        if e.op == "-":
            return _add(x, _neg(y))
        if e.op == "*":
            if _is_const(y):
                return _scale(x, y[0][0][2])
            if _is_const(x):
                return _scale(y, x[0][0][2])
            raise Unsupported("a product of two index expressions")
        d = _integer(y, f"the divisor of {e.op}")
        if d <= 0:
            raise Unsupported(f"{e.op} by {d}")
        quotient = _floordiv(x, d)
        return quotient if e.op == "//" else _add(x, _scale(quotient, -d))
    if isinstance(e, Call) and e.fn in ("min", "max") and e.args:
        combine = _min if e.fn == "min" else _max
        out = _linear(e.args[0], env)
        for arg in e.args[1:]:
            out = combine(out, _linear(arg, env))
        return out
    raise Unsupported(f"{type(e).__name__} {getattr(e, 'op', getattr(e, 'fn', ''))} in an index expression")


# ---------------------------------------------------------------------------- formulas


@dataclass(frozen=True)
class _Threshold:
    """`w >= T(u)` (ge) or `w < T(u)` (lt), T(u) = -floor(X(u)/c) or floor(X(u)/-c) + 1 for
    `c*w + X(u) >= 0`; X in max-min form over (u, 1)."""

    c: int
    x: PL

    def value(self, u: int) -> int:
        v = _evaluate(self.x, u)
        return -(v // self.c) if self.c > 0 else v // -self.c + 1

    def pieces(self) -> list[tuple[int, int]]:
        """(slope, intercept) of T on each form: integer affine, because c divides each slope."""
        if self.c > 0:
            return [(-(f[0] // self.c), -(f[2] // self.c)) for g in self.x for f in g]
        return [(f[0] // -self.c, f[2] // -self.c + 1) for g in self.x for f in g]


def _evaluate(x: PL, u: int) -> int:
    return max(min(f[0] * u + f[2] for f in g) for g in x)


def _ge(x: PL) -> tuple:
    """The formula for `x >= 0`: a tuple tree of ("key", _Threshold), ("row", PL) (a row
    condition X(u) >= 0), ("not", t), ("and" | "or", t, ...). Pure, so a residue pair can
    reuse what another one built."""
    cws = {f[1] for g in x for f in g}
    if len(cws) > 1:
        return ("or", *(("and", *(_ge(((f,),)) for f in g)) for g in x))
    c = cws.pop()
    stripped = tuple(tuple((f[0], 0, f[2]) for f in g) for g in x)
    if c == 0:
        return ("row", stripped)
    for g in stripped:
        for f in g:
            if f[0] % c:
                raise _Period("u", abs(c) // math.gcd(f[0], abs(c)))
    return ("key", _Threshold(c, stripped))


def _formula(e: Expr, env: _Env) -> tuple:
    """The formula of a predicate in `_predicate`'s form (and/or/not of comparisons). A
    comparison's formula is cached by its sides' values: residue pairs of a block mask differ
    in their ranges but mostly not in their values."""
    if isinstance(e, Binary) and e.op in ("and", "or"):
        return (e.op, _formula(e.lhs, env), _formula(e.rhs, env))
    if isinstance(e, Unary) and e.op == "not":
        return ("not", _formula(e.operand, env))
    lhs, rhs = _linear(e.lhs, env), _linear(e.rhs, env)
    slot = (e.op, lhs, rhs)
    if slot not in env.cache:
        if e.op in ("==", "!="):
            both = ("and", _ge(_add(lhs, _neg(rhs))), _ge(_add(rhs, _neg(lhs))))
            env.cache[slot] = both if e.op == "==" else ("not", both)
        else:
            big, small = (lhs, rhs) if e.op in (">=", ">") else (rhs, lhs)
            diff = _add(big, _neg(small))
            env.cache[slot] = _ge(_add(diff, _const(-1)) if e.op in (">", "<") else diff)
    return env.cache[slot]


class _System:
    """One residue pair's formula, with its thresholds on the key and its row conditions."""

    def __init__(self, tree: tuple) -> None:
        self.thresholds: dict[_Threshold, int] = {}
        self.rows: dict[PL, int] = {}  # row conditions X(u) >= 0
        self.holds = self._compile(tree)

    def _compile(self, tree) -> Callable[[list[int], list[bool], int], bool]:
        """The formula as a function of (thresholds at the row, row conditions, key)."""
        kind = tree[0]
        if kind == "key":
            i = self.thresholds.setdefault(tree[1], len(self.thresholds))
            return (lambda ts, rows, w: w >= ts[i]) if tree[1].c > 0 else (lambda ts, rows, w: w < ts[i])
        if kind == "row":
            i = self.rows.setdefault(tree[1], len(self.rows))
            return lambda ts, rows, w: rows[i]
        parts = [self._compile(t) for t in tree[1:]]
        if kind == "not":
            return lambda ts, rows, w: not parts[0](ts, rows, w)
        if kind == "and":
            return lambda ts, rows, w: all(p(ts, rows, w) for p in parts)
        return lambda ts, rows, w: any(p(ts, rows, w) for p in parts)

    def count(self, n_rows: int, n_keys: int) -> int:
        """Points (u, w) in [0, n_rows) x [0, n_keys) where the formula holds."""
        thresholds, conditions, holds = list(self.thresholds), list(self.rows), self.holds

        def row(u: int) -> int:
            ts = [t.value(u) for t in thresholds]
            rows = [_evaluate(x, u) >= 0 for x in conditions]
            cuts = sorted({0, n_keys, *(min(max(t, 0), n_keys) for t in ts)})
            return sum(hi - lo for lo, hi in zip(cuts, cuts[1:]) if holds(ts, rows, lo))

        total = 0
        edges = [0, *sorted(c for c in self.cuts(n_keys) if 0 < c < n_rows), n_rows]
        for lo, hi in zip(edges, edges[1:]):
            if hi - lo == 1:
                total += row(lo)
            elif hi > lo:  # affine in u on [lo, hi): the sum of an arithmetic sequence
                total += (row(lo) + row(hi - 1)) * (hi - lo) // 2
        return total

    def cuts(self, n_keys: int) -> set[int]:
        """Rows where some candidate pair's order may change: the first row past each crossing."""
        lines: set[tuple[int, int]] = set()
        pairs: list[tuple[tuple[int, int], tuple[int, int]]] = []
        for x in [t.x for t in self.thresholds] + list(self.rows):
            forms = sorted({(f[0], f[2]) for g in x for f in g})
            pairs += [(f, g) for i, f in enumerate(forms) for g in forms[i + 1:]]
        for x in self.rows:
            pairs += [((f[0], f[2]), (0, 0)) for g in x for f in g]
        for t in self.thresholds:
            lines.update(t.pieces())
        lines.update({(0, 0), (0, n_keys)})
        ordered = sorted(lines)
        pairs += [(f, g) for i, f in enumerate(ordered) for g in ordered[i + 1:]]
        out: set[int] = set()
        for (s1, i1), (s2, i2) in pairs:
            if s1 != s2:  # s1*u + i1 = s2*u + i2 at u = (i2 - i1) / (s1 - s2)
                num, den = i2 - i1, s1 - s2
                if den < 0:
                    num, den = -num, -den
                out.update({-(-num // den), num // den + 1})
        return out


# ---------------------------------------------------------------------------- entry point


def count(clauses: tuple[Expr, ...], variables: tuple[str, ...], extents: dict[str, int],
          scalars: dict[str, int], parts: dict) -> int:
    """The points of the box prod_v [0, extents[v]) over `variables` where every clause holds.

    `scalars` gives dims, params and tiles their integer values; `parts` maps split index
    variables (m1, m0) to their whole (cost_model.predicates.Part). Raises Unsupported when a
    clause is outside the closed form (see the module docstring).
    """
    return _count(tuple(clauses), tuple(variables), tuple(sorted(extents.items())),
                  tuple(sorted(scalars.items())), tuple(sorted(parts.items())))


@lru_cache(maxsize=256)  # a mask's clauses reach every Einsum downstream of it: counted once
def _count(clauses: tuple[Expr, ...], variables: tuple[str, ...], extent_items: tuple, scalar_items: tuple,
           part_items: tuple) -> int:
    extents, scalars, parts = dict(extent_items), dict(scalar_items), dict(part_items)
    if any(extents[v] <= 0 for v in variables):
        return 0
    by_size = sorted(variables, key=lambda v: extents[v], reverse=True)
    key, row, others = by_size[0], (by_size[1] if len(by_size) > 1 else None), by_size[2:]
    if math.prod(extents[v] for v in others) > MAX_FIXED:
        raise Unsupported(f"the clauses join {len(variables)} index variables")
    assignments: list[dict[str, int]] = [{}]
    for v in others:
        assignments = [{**a, v: i} for a in assignments for i in range(extents[v])]
    n_rows, n_keys = (extents[row] if row else 1), extents[key]
    pred = _predicate(clauses[0])
    for clause in clauses[1:]:
        pred = Binary("and", pred, _predicate(clause))
    dr = dk = 1
    while True:
        try:
            return _count_residues(pred, row, key, dr, dk, n_rows, n_keys, assignments, scalars, parts)
        except _Period as period:
            dr, dk = (dr * period.factor, dk) if period.var == "u" else (dr, dk * period.factor)
            if min(dr, n_rows) * min(dk, n_keys) > MAX_RESIDUES:
                raise Unsupported(f"the clauses repeat with periods {dr} x {dk} (more than "
                                  f"{MAX_RESIDUES} residue classes)") from None


def _predicate(e: Expr) -> Expr:
    """`e` as and/or/not of comparisons: builtins expanded, any other value `!= 0`. Built once,
    before the residues: the values' cache is keyed by node."""
    if isinstance(e, Binary) and e.op in ("and", "or"):
        return Binary(e.op, _predicate(e.lhs), _predicate(e.rhs), e.loc)
    if isinstance(e, Unary) and e.op == "not":
        return Unary("not", _predicate(e.operand), e.loc)
    if isinstance(e, Call) and e.fn in PREDICATES:
        return _predicate(PREDICATES[e.fn].expand(e.args))
    if isinstance(e, Binary) and e.op in COMPARISON_OPS:
        return e
    return Binary("!=", e, Num(0), e.loc)


def _count_residues(pred: Expr, row: str | None, key: str, dr: int, dk: int, n_rows: int, n_keys: int,
                    assignments: list[dict[str, int]], scalars: dict[str, int], parts: dict) -> int:
    total = 0
    memo: dict[tuple, int] = {}
    for fixed in assignments:
        cache: dict = {}  # values per residue, for this assignment of the other variables
        for a in range(min(dr, n_rows)):
            rows = -(-(n_rows - a) // dr)
            for b in range(min(dk, n_keys)):
                keys = -(-(n_keys - b) // dk)
                tree = _formula(pred, _Env(row, key, dr, a, dk, b, fixed, scalars, parts, cache))
                if (tree, rows, keys) not in memo:
                    memo[tree, rows, keys] = _System(tree).count(rows, keys)
                total += memo[tree, rows, keys]
    return total
