"""Which keys a query tile visits, and where it needs no mask: key ranges and segments.

The predicate that guards a stage's carried reductions is put in disjunctive normal form. In
each conjunction, every atom is classified against one query variable q and one key variable k:

- *affine*: `a*q + b*k + c >= 0` (c over dims and params): over a query tile [q_lo, q_hi] it
  bounds the keys some query may see (at the loosest q) and the keys every query sees (at
  the tightest q);
- *interval*: an interval `lo(q) <= k < hi(q)` with ends that never decrease in q: a predicate
  builtin's (`nbhd` with dilation 1), or a group equality `(q + c) // G == (k + d) // G` (blocks
  of G keys, shifted by offsets c, d over dims and params: k lies in
  [G*((q + c)//G) - d, G*((q + c)//G) + G - d)): some query sees [lo(q_lo), hi(q_hi)), every
  query sees [lo(q_hi), hi(q_lo));
- *opaque*: anything else (a tensor read at a query or key position, `%`, a dilation): no
  bound, never full.

A **per-program value** is one number per program of the grid: a read of an integer input
whose indices use only the stage's grid index variables, dims, params and constants
(`Len[b]`, `Wh[h]`), or a grid index variable itself (`s` in `s*KS <= m`). Inside `c` it is a
symbol like a param, so `m < Len[b]` and `p - m < Wh[h]` are affine and bound the loop; the
loop records each value (`KeyLoop.values`) for the emitters to define before the bounds. A read
at a query position (GQA's packed heads are a query rank) is not one: it stays opaque.

A conjunction thus gives, per key variable, a `KeyRange`: present points lie in [lo, hi),
and [full_lo, full_hi) is present for every query of the tile. Its **segments** are the
masked prefix [lo, full_lo), the full interior [full_lo, full_hi) and the masked suffix
[full_hi, hi). Each segment becomes one branch-free loop in the generated code; a full one
needs no mask at all. Segments exist in two units: keys (the CPU path slices exactly) and key
tiles of BLOCK_S (the Triton kernel's aligned tiles; a tile is in the full interior only when
it lies inside [full_lo, full_hi) whole, so a ragged last tile is always a masked one).

Two conjunctions (sink tokens plus a window) are visited one after the other, the second
clipped to start where the first ends; more, or several over a multi-rank key axis, visit the
hull masked. A key axis over several ranks (a 2-D neighborhood) has per-rank ranges; its
segments are the full box of interiors and the 2 x ranks masked boxes around it.

An opaque atom makes the stage's tiles known only at run time: with one key rank, a block list
(a small kernel evaluates the mask per tile of the bounded range and lists the full and the
partial tiles, so the attention kernel runs two branch-free loops over them).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy

from einsum_ir.builtins import PREDICATES
from einsum_ir.ir import Access, Binary, Call, Expr, Index, Name, Unary, index_vars, rank_of, rebuild, walk
from einsum_ir.printer import print_expr
from einsum_ir.lowering.symbolic import (
    CeilDiv, FloorDiv, block, evaluate, index_symbol, proves, query_hi, query_lo, symbol, to_sympy,
)

NEGATE = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}
_MIRRORED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "=="}  # a OP b is b MIRRORED[OP] a


def to_dnf(expr: Expr, negate: bool = False) -> list[list[Expr]]:
    """Predicate -> list of conjunctions of atoms (comparisons, builtins, tensor reads)."""
    if isinstance(expr, Unary) and expr.op == "not":
        return to_dnf(expr.operand, not negate)
    if isinstance(expr, Binary) and expr.op in ("and", "or"):
        op = expr.op if not negate else ("or" if expr.op == "and" else "and")
        a, b = to_dnf(expr.lhs, negate), to_dnf(expr.rhs, negate)
        if op == "or":
            return a + b
        return [x + y for x in a for y in b]
    if negate:
        if isinstance(expr, Binary) and expr.op in NEGATE:
            return [[Binary(NEGATE[expr.op], expr.lhs, expr.rhs)]]
        return [[Unary("not", expr)]]
    return [[expr]]


@dataclass(frozen=True)
class Atom:
    kind: str  # "affine" | "interval" | "opaque"
    expr: Expr
    q: str | None = None  # the query variable it reads
    k: str | None = None  # the key variable it bounds
    a: int = 0  # affine: a*q + b*k + c >= 0
    b: int = 0
    c: sympy.Expr = sympy.Integer(0)
    tensor: bool = False  # opaque: reads a tensor
    # interval: its ends over the query's index symbol, and a name for the bounds they define
    lo: sympy.Expr | None = None
    hi: sympy.Expr | None = None
    label: str = ""
    values: tuple[tuple[str, Expr], ...] = ()  # the per-program values its bounds read


@dataclass(frozen=True)
class GridScope:
    """What a per-program value may read: the stage's grid index variables and its integer
    inputs; `names` are taken already (a value's symbol must not alias one)."""

    grid: tuple[str, ...] = ()
    ints: frozenset[str] = frozenset()
    names: frozenset[str] = frozenset()


def _per_program(atom: Expr, qs: tuple[str, ...], ks: tuple[str, ...],
                 scope: GridScope) -> tuple[Expr, dict[sympy.Symbol, sympy.Expr], tuple[tuple[str, Expr], ...]]:
    """`atom` with each per-program tensor read replaced by a Name, the sympy substitution that
    makes those Names (and the grid index symbols) the values' integer symbols, and the values
    it reads as (symbol name, read or grid Index)."""
    found: dict[Expr, str] = {}
    taken = set(scope.names)

    def name_for(e: Expr, base: str) -> str:
        if e not in found:
            n, k = base, 1
            while n in taken:
                k += 1
                n = f"{base}{k}"
            taken.add(n)
            found[e] = n
        return found[e]

    def node(n: Expr) -> Expr | None:
        if isinstance(n, Access) and n.tensor in scope.ints and set(index_vars(n)) <= set(scope.grid) \
                and not any(isinstance(x, Access) for i in n.indices for x in walk(i)) \
                and all(to_sympy(i) is not None for i in n.indices):
            return Name(name_for(n, "_".join([n.tensor, "at"] + index_vars(n))))
        return None

    atom = rebuild(atom, node)
    subs = {symbol(n): sympy.Symbol(n, integer=True) for n in found.values()}  # tensor values may be negative
    for v in index_vars(atom):
        if v in scope.grid and v not in qs and v not in ks:
            subs[index_symbol(v)] = symbol(name_for(Index(v), f"grid_{v}"))
    return atom, subs, tuple((n, e) for e, n in found.items())


def classify(atom: Expr, qs: tuple[str, ...], ks: tuple[str, ...], scope: GridScope = GridScope()) -> list[Atom]:
    """One predicate atom -> analyzed atom(s) (`==` gives two); per-program values of `scope`
    are symbols of `c`."""
    original = atom
    atom, subs, values = _per_program(atom, qs, ks, scope)
    analyzed = _classify(atom, qs, ks, subs)
    if any(a.kind == "opaque" for a in analyzed):
        return [replace(a, expr=original) for a in _classify(original, qs, ks, {})]
    return [replace(a, expr=original, values=values) for a in analyzed]


def _classify(atom: Expr, qs: tuple[str, ...], ks: tuple[str, ...], subs: dict) -> list[Atom]:
    reads_tensor = any(isinstance(n, Access) for n in walk(atom))
    opaque = [Atom("opaque", atom, tensor=reads_tensor)]
    if reads_tensor:
        return opaque
    if isinstance(atom, Call) and atom.fn in PREDICATES:
        interval = PREDICATES[atom.fn].key_interval(atom.args)
        if interval is not None and interval.query in qs and interval.key in ks:
            ends = to_sympy(interval.lo), to_sympy(interval.hi)
            if None not in ends:
                return [Atom("interval", atom, interval.query, interval.key, lo=ends[0], hi=ends[1], label=atom.fn)]
        return opaque
    if not (isinstance(atom, Binary) and atom.op in NEGATE and atom.op != "!="):
        return opaque
    lhs, rhs = to_sympy(atom.lhs), to_sympy(atom.rhs)
    if lhs is None or rhs is None:
        return opaque
    if atom.op == "==" and isinstance(lhs, FloorDiv) and isinstance(rhs, FloorDiv):
        # offsets over grid indices stay index symbols here: _group bounds them by |k - q| < G
        reads = {s: v for s, v in subs.items() if not s.name.startswith("_idx_")}
        return _group(atom, lhs.xreplace(reads), rhs.xreplace(reads), qs, ks) or opaque
    lhs, rhs = _undivided(atom.op, lhs, rhs)
    lhs, rhs = lhs.xreplace(subs), rhs.xreplace(subs)
    used = {s.name[len("_idx_"):] for s in (lhs - rhs).free_symbols if s.name.startswith("_idx_")}
    q = next((v for v in qs if v in used), None)
    k = next((v for v in ks if v in used), None)
    if used - {q, k}:  # other index variables, or two query / key variables
        return opaque
    diffs = {"<=": [rhs - lhs], "<": [rhs - lhs - 1], ">=": [lhs - rhs], ">": [lhs - rhs - 1],
             "==": [rhs - lhs, lhs - rhs]}[atom.op]
    out = []
    qsym, ksym = index_symbol(q or "_"), index_symbol(k or "_")
    for d in diffs:
        d = sympy.expand(d)
        a, b = d.coeff(qsym), d.coeff(ksym)
        rest = sympy.expand(d - a * qsym - b * ksym)
        if not (a.is_Integer and b.is_Integer) or any(s.name.startswith("_idx_") for s in rest.free_symbols):
            return opaque
        out.append(Atom("affine", atom, q, k, int(a), int(b), rest))
    return out


def _undivided(op: str, lhs: sympy.Expr, rhs: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr]:
    """The sides of `u // g OP x` (x an integer) as a comparison of u itself, with the same
    OP: `m // T < J` is `m < J*T`, a bound on the keys, since floor(y) < x exactly when y < x
    for an integer x (`<`, `>=` compare u with x*g; `<=`, `>` with (x + 1)*g - 1). `x OP u // g`
    likewise; other comparisons as they are. A divisor over dims or params may be 0 at a call,
    where the predicate itself divides by zero: the bound uses at least 1."""
    if isinstance(rhs, FloorDiv) and not isinstance(lhs, FloorDiv):
        rhs_, lhs_ = _undivided(_MIRRORED[op], rhs, lhs)
        return lhs_, rhs_
    if not isinstance(lhs, FloorDiv) or op == "==" or not rhs.is_integer \
            or any(s.name.startswith("_idx_") for s in rhs.free_symbols):
        return lhs, rhs
    u, g = lhs.args
    if any(s.name.startswith("_idx_") for s in g.free_symbols):
        return lhs, rhs
    g = g if proves(sympy.simplify(g > 0)) else sympy.Max(g, 1)
    return u, rhs * g if op in ("<", ">=") else (rhs + 1) * g - 1


def _group(atom: Expr, lhs: FloorDiv, rhs: FloorDiv, qs: tuple[str, ...], ks: tuple[str, ...]) -> list[Atom]:
    """`(q + c) // G == (k + d) // G` (either side first) as the interval atom of k's block, or
    [] when it is not one: one divisor, each side one variable with coefficient 1, offsets
    over dims, params and non-negative numbers (so every division is of a non-negative).

    An offset over other index variables (a shift per head, `(2*h // H) * (G // 2)`) is one
    value per program, unknown to the bounds: with the same offset on both sides the keys lie
    within G - 1 of the query (|k - q| < G), which bounds the loop, and whether a tile is full
    is found at run time (the atom stays opaque)."""
    (u, g), (w, g2) = lhs.args, rhs.args
    if g != g2 or any(x.name.startswith("_idx_") for x in g.free_symbols):
        return []
    sides = []
    for x in (u, w):
        var = [v for v in (*qs, *ks) if x.coeff(index_symbol(v)) == 1]
        if len(var) != 1:
            return []
        offset = sympy.expand(x - index_symbol(var[0]))
        if offset.free_symbols & {index_symbol(v) for v in (*qs, *ks)} or not proves(sympy.simplify(offset >= 0)):
            return []
        sides.append((var[0], offset))
    (q, c), (k, d) = sides if sides[0][0] in qs else sides[::-1]
    if q not in qs or k not in ks:
        return []
    # a divisor over params may be 0 at a call, where the predicate itself divides by zero: the
    # bounds divide by at least 1, so they never fault before the predicate does
    g = g if proves(sympy.simplify(g > 0)) else sympy.Max(g, 1)
    if any(x.name.startswith("_idx_") for x in (c - d).free_symbols | c.free_symbols):
        if sympy.simplify(c - d) != 0:
            return []
        return [Atom("affine", atom, q, k, -1, 1, g - 1), Atom("affine", atom, q, k, 1, -1, g - 1),
                Atom("opaque", atom)]
    start = g * FloorDiv(index_symbol(q) + c, g) - d
    # clamped at 0 here: the bounds name each end as a symbol, which sympy takes as non-negative
    return [Atom("interval", atom, q, k, lo=sympy.Max(start, 0), hi=sympy.Max(start + g, 0), label="group")]


@dataclass(frozen=True)
class KeyRange:
    """Along key variable `var`: present points of a query tile lie in [lo, hi); every query
    of the tile sees all of [full_lo, full_hi). lo <= full_lo <= full_hi <= hi, in [0, extent]."""

    var: str
    lo: sympy.Expr
    full_lo: sympy.Expr
    full_hi: sympy.Expr
    hi: sympy.Expr

    @property
    def bounds(self) -> tuple[sympy.Expr, ...]:
        return self.lo, self.full_lo, self.full_hi, self.hi


def tile_range(r: KeyRange, tile: sympy.Expr) -> KeyRange:
    """The range in key tiles of size `tile`: the interior holds only tiles inside
    [full_lo, full_hi) whole, so every other visited tile is masked."""
    t0, t3 = FloorDiv(r.lo, tile), CeilDiv(r.hi, tile)
    if r.full_lo == r.full_hi:  # never full: one masked run
        return KeyRange(r.var, t0, t0, t0, t3)
    t1 = sympy.Min(t3, CeilDiv(r.full_lo, tile))
    t2 = sympy.Max(t1, FloorDiv(r.full_hi, tile))
    return KeyRange(r.var, t0, t1, t2, t3)


def _ceil_div(x: sympy.Expr, b: int) -> sympy.Expr:
    """ceil(x / b) clamped below at 0 (a lower key bound)."""
    return CeilDiv(sympy.Max(x, 0), b) if b != 1 else x


def _bounds(conj: list[Atom], k: str, extent: sympy.Expr, names: "_Names", tag: str) -> KeyRange:
    lows, highs = [sympy.Integer(0)], [extent]  # some query of the tile may see [lo, hi)
    full_lows, full_highs = [sympy.Integer(0)], [extent]  # every query sees [full_lo, full_hi)
    never_full = False
    for at in conj:
        if at.kind == "opaque":
            never_full = True
            continue
        if at.k not in (k, None):
            continue  # bounds another key variable of the box
        lo_q, hi_q = (query_lo(at.q), query_hi(at.q)) if at.q else (sympy.Integer(0), sympy.Integer(0))
        if at.kind == "interval":  # ends non-decreasing in q: the first query starts and ends earliest
            first = [names(f"{at.label}_{end}_first{tag}", x.xreplace({index_symbol(at.q): lo_q}))
                     for end, x in (("lo", at.lo), ("hi", at.hi))]
            last = [names(f"{at.label}_{end}_last{tag}", x.xreplace({index_symbol(at.q): hi_q}))
                    for end, x in (("lo", at.lo), ("hi", at.hi))]
            lows.append(first[0])
            highs.append(last[1])
            full_lows.append(last[0])
            full_highs.append(first[1])
            continue
        a, b, c = at.a, at.b, at.c
        loose = hi_q if a > 0 else lo_q  # maximizes a*q: the query that sees the most keys
        tight = lo_q if a > 0 else hi_q
        if b > 0:  # k >= ceil((-a q - c) / b)
            lows.append(_ceil_div(-a * loose - c, b))
            full_lows.append(_ceil_div(-a * tight - c, b))
        elif b < 0:  # k <= floor((a q + c) / -b), i.e. k < floor((a q + c - b) / -b)
            highs.append(FloorDiv(sympy.Max(a * loose + c - b, 0), -b))
            full_highs.append(FloorDiv(sympy.Max(a * tight + c - b, 0), -b))
        else:  # no key: the whole tile holds or not, query by query
            highs.append(sympy.Piecewise((extent, a * loose + c >= 0), (0, True)))
            full_highs.append(sympy.Piecewise((extent, a * tight + c >= 0), (0, True)))
    hi = sympy.Max(0, sympy.Min(*highs))
    lo = sympy.Min(hi, sympy.Max(*lows))
    if never_full:
        return KeyRange(k, lo, lo, lo, hi)
    full_hi = sympy.Max(lo, sympy.Min(hi, *full_highs))
    full_lo = sympy.Min(full_hi, sympy.Max(lo, *full_lows))
    return KeyRange(k, lo, full_lo, full_hi, hi)


@dataclass(frozen=True)
class Segment:
    """A box of keys (or key tiles) that one loop visits with one body: per key variable,
    [lo, hi). `masked` bodies test the predicate and key bounds; full ones test nothing."""

    masked: bool
    box: tuple[tuple[str, sympy.Expr, sympy.Expr], ...]

    def extent(self, var: str) -> tuple[sympy.Expr, sympy.Expr]:
        return next((lo, hi) for v, lo, hi in self.box if v == var)


@dataclass(frozen=True)
class KeyLoop:
    """The key side of a stage: named bounds, then segments over them, in keys (the CPU path)
    and in key tiles (Triton). `key_defs` and `tile_defs` are (symbol, expression) pairs in
    order, each over the query tile's symbols, dims, params and earlier definitions."""

    key_defs: tuple[tuple[sympy.Symbol, sympy.Expr], ...]
    tile_defs: tuple[tuple[sympy.Symbol, sympy.Expr], ...]
    key_segments: tuple[Segment, ...]
    tile_segments: tuple[Segment, ...]
    block_list: bool  # tiles come from a run-time list (opaque atoms, one key rank)
    exact: bool  # every atom was analyzed
    atoms: tuple[tuple[str, ...], ...]  # per conjunction, the atom kinds (for descriptions)
    heavy_last: bool  # later query tiles visit more keys (causal-like): launch them first
    # per-program values the bounds read: (symbol name, the tensor read or grid Index), each
    # defined by the emitters before the bounds (one per program; the CPU path takes every
    # program's at once)
    values: tuple[tuple[str, Expr], ...] = ()

    def describe(self) -> str:
        if not self.atoms:
            return "dense: every key tile; a full interior and a masked ragged last tile"
        conj = " or ".join("[" + ", ".join(kinds) + "]" for kinds in self.atoms)
        full = sum(not s.masked for s in self.tile_segments)
        text = (f"key ranges from {conj}; {len(self.tile_segments)} loop(s) over key tiles, "
                f"{full} of them unmasked")
        if self.block_list:
            text = (f"key ranges from {conj}; the live key tiles come from a block list the mask "
                    f"builds at run time, full and partial tiles in separate loops")
        if self.values:
            text += "; bounds read per program " + ", ".join(print_expr(e) for _, e in self.values)
        if self.heavy_last:
            text += "; heaviest query tiles first"
        return text


def masked_everywhere(loop: KeyLoop) -> KeyLoop:
    """The same loop with every tile masked: for a stage whose values are guarded by predicates
    that the skipped region does not decide (a tile outside it may still hold absent points)."""
    def masked(segments):  # consecutive ranges of one key rank, now alike, as one loop
        out: list[Segment] = []
        for s in segments:
            if out and len(s.box) == len(out[-1].box) == 1:
                (k, lo, mid), ((k2, start, hi),) = out[-1].box[0], s.box
                if k == k2 and mid == start:
                    out[-1] = Segment(True, ((k, lo, hi),))
                    continue
            out.append(replace(s, masked=True))
        return tuple(out)
    key_segments, tile_segments = masked(loop.key_segments), masked(loop.tile_segments)
    need = {x for seg in key_segments + tile_segments for _, lo, hi in seg.box for x in lo.free_symbols | hi.free_symbols}
    for sym, e in reversed(loop.key_defs + loop.tile_defs):  # the bounds the merged loops still read
        if sym in need:
            need |= e.free_symbols
    return replace(loop, key_defs=tuple(d for d in loop.key_defs if d[0] in need),
                   tile_defs=tuple(d for d in loop.tile_defs if d[0] in need),
                   key_segments=key_segments, tile_segments=tile_segments)


class _Names:
    """Named definitions: an expression gets a symbol unless it already is an atom."""

    def __init__(self):
        self.defs: list[tuple[sympy.Symbol, sympy.Expr]] = []

    def __call__(self, name: str, e: sympy.Expr) -> sympy.Expr:
        if e.is_Atom:
            return e
        same = next((sym for sym, x in self.defs if x == e), None)
        if same is not None:  # one name per value: equal bounds stay equal symbols
            return same
        taken, base, k = {str(s) for s, _ in self.defs}, name, 1
        while name in taken:  # two atoms of one kind (nbhd twice) bound differently: two names
            k += 1
            name = f"{base}_{k}"
        sym = symbol(name)
        self.defs.append((sym, e))
        return sym


def _named(r: KeyRange, names: _Names, tag: str) -> KeyRange:
    parts = [names(f"{n}{tag}", e) for n, e in zip(("lo", "full_lo", "full_hi", "hi"), r.bounds)]
    return KeyRange(r.var, *parts)


def _segments(ranges: list[tuple[KeyRange, ...]], ks: tuple[str, ...], names: _Names) -> tuple[Segment, ...]:
    if len(ranges) == 1 and len(ks) == 1:
        return _one_range(ranges[0][0])
    if len(ranges) == 2 and len(ks) == 1:
        a, b = ranges[0][0], ranges[1][0]
        if not proves(sympy.simplify(a.lo <= b.lo)):
            if proves(sympy.simplify(b.lo <= a.lo)):
                a, b = b, a
            else:  # visit the conjunction that starts first first
                first = a.lo <= b.lo
                tag = a.var
                a, b = (KeyRange(a.var, *(names(f"{n}_first_{tag}", sympy.Piecewise((x, first), (y, True)))
                                          for n, x, y in zip(("lo", "flo", "fhi", "hi"), a.bounds, b.bounds))),
                        KeyRange(a.var, *(names(f"{n}_second_{tag}", sympy.Piecewise((y, first), (x, True)))
                                          for n, x, y in zip(("lo", "flo", "fhi", "hi"), a.bounds, b.bounds))))
        clipped = KeyRange(b.var, *(names(f"{n}_after_{b.var}", sympy.Max(x, a.hi))
                                    for n, x in zip(("lo", "flo", "fhi", "hi"), b.bounds)))
        return _one_range(a) + _one_range(clipped)
    if len(ranges) == 1:  # a multi-rank box: the full interior box, then the masked rim
        rs = {r.var: r for r in ranges[0]}
        out = [Segment(False, tuple((k, rs[k].full_lo, rs[k].full_hi) for k in ks))]
        for i, k in enumerate(ks):
            inner = [(v, rs[v].full_lo, rs[v].full_hi) for v in ks[:i]]
            outer = [(v, rs[v].lo, rs[v].hi) for v in ks[i + 1:]]
            out.append(Segment(True, tuple(inner + [(k, rs[k].lo, rs[k].full_lo)] + outer)))
            out.append(Segment(True, tuple(inner + [(k, rs[k].full_hi, rs[k].hi)] + outer)))
        return tuple(s for s in out if not _empty(s))
    hull = []  # several conjunctions over several ranks: their hull, every tile masked
    for j, k in enumerate(ks):
        lo = names(f"lo_{k}", sympy.Min(*(rs[j].lo for rs in ranges)))
        hi = names(f"hi_{k}", sympy.Max(*(rs[j].hi for rs in ranges)))
        hull.append((k, lo, hi))
    return (Segment(True, tuple(hull)),)


def _one_range(r: KeyRange) -> tuple[Segment, ...]:
    segs = (Segment(True, ((r.var, r.lo, r.full_lo),)), Segment(False, ((r.var, r.full_lo, r.full_hi),)),
            Segment(True, ((r.var, r.full_hi, r.hi),)))
    return tuple(s for s in segs if not _empty(s))


def _empty(s: Segment) -> bool:
    return any(lo == hi for _, lo, hi in s.box)


def key_loop(pred: Expr | None, qs: tuple[str, ...], ks: tuple[str, ...], dims: tuple[str, ...],
             scope: GridScope = GridScope()) -> KeyLoop:
    """The key loop of a stage whose carried reductions are all guarded by `pred`; `dims` are the
    cascade's dims (the other symbols in bounds are params); `scope` says what a per-program
    value may read (a key axis over several ranks takes none: its boxes are not merged across
    programs)."""
    extents = {k: symbol(rank_of(k)) for k in ks}
    scope = scope if len(ks) == 1 else GridScope()
    dnf = [[a for at in conj for a in classify(at, qs, ks, scope)] for conj in to_dnf(pred)] if pred is not None else []
    values = tuple(dict.fromkeys(v for conj in dnf for a in conj for v in a.values))
    keys = _Names()
    ranges = [tuple(_bounds(conj, k, extents[k], keys, f"{i}_{k}") for k in ks) for i, conj in enumerate(dnf)] or \
             [tuple(KeyRange(k, sympy.Integer(0), sympy.Integer(0), extents[k], extents[k]) for k in ks)]
    opaque = any(a.kind == "opaque" for conj in dnf for a in conj)
    block_list = opaque and len(ks) == 1
    if block_list:  # the list kernel scans the bounded hull; whether a tile is full is found then
        lo = sympy.Min(*(r[0].lo for r in ranges))
        hi = sympy.Max(*(r[0].hi for r in ranges))
        ranges = [(KeyRange(ks[0], lo, lo, lo, hi),)]
    heavy_last = _grows_with_query(ranges, keys.defs, qs, set(dims))
    named = [tuple(_named(r, keys, f"{i}_{r.var}") for r in rs) for i, rs in enumerate(ranges)]
    tiles = _Names()
    tiled = [tuple(_named(tile_range(r, block(r.var, ks)), tiles, f"{i}_{r.var}_t") for r in rs)
             for i, rs in enumerate(named)]
    key_segments = _segments(named, ks, keys)
    tile_segments = _segments(tiled, ks, tiles)
    block_list = block_list and bool(key_segments)  # an empty hull: no tile to test, nothing visited
    return KeyLoop(tuple(keys.defs), tuple(tiles.defs), key_segments, tile_segments, block_list,
                   not opaque, tuple(tuple(a.kind for a in conj) for conj in dnf), heavy_last, values)


def _grows_with_query(ranges, defs, qs: tuple[str, ...], dims: set[str]) -> bool:
    """Whether later query tiles reach more keys (a causal-like mask), judged at a sample shape
    (dims 4096, params 256, 64-query tiles): the first query tile against the last."""
    def reach(t: int) -> float:
        env = {}
        for q in qs:
            env[query_lo(q)] = sympy.Integer(64 * t)
            env[query_hi(q)] = sympy.Integer(min(64 * t + 63, 4095))
        sizes = [(symbol("_size"), sympy.Mul(*(r.hi - r.lo for r in rs))) for rs in ranges]
        values = evaluate(list(defs) + sizes, env, lambda s: 4096 if s.name in dims else 256)
        return sum(float(size.xreplace(values)) for _, size in sizes)

    try:
        return reach(63) > reach(0)
    except (TypeError, ValueError):
        return False
