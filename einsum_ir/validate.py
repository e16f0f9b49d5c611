"""Semantic checks on a parsed or built cascade. Each failure is a located SpecError; the one
check that needs extents, `cross_rank_mismatch`, returns its message for the caller's error."""
from __future__ import annotations

import itertools
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from einsum_ir.errors import SpecError, located
from einsum_ir.builtins import PREDICATES
from einsum_ir.functions import FUNCTIONS, INDEX_FUNCTIONS, INTERSECTING, UNIONS
from einsum_ir.graph import acyclic_view, dependency_graph, einsum_reads, is_carried_read, topological_einsums
from einsum_ir.ir import (
    INT_DTYPES, MAX_DEPTH, NESTED_TOO_DEEPLY, REDUCE_OPS, Access, Binary, Call, Cascade, Einsum, Expr,
    Index, Loc, Name, Num, Unary, accesses, children, conjuncts, index_vars, rank_of, substitute, walk,
)
from einsum_ir.printer import print_expr


def validate(c: Cascade, depth_checked: bool = False) -> None:
    """Raise SpecError on the first problem found; return None for a well-formed cascade.
    `depth_checked`: the caller has run `check_depth` on every expression that may be too deep
    (the parser does, for the long lines: a tree of n tokens is at most n deep)."""
    if not depth_checked:
        for expr in _expressions(c):
            check_depth(expr)
    _check_names(c)
    arity = _tensor_ranks(c)
    for e in c.einsums:
        _check_einsum(c, e, arity)
    for i in c.inits:
        _check_init(c, i, arity)
    order = _check_cycles(c)
    _check_unions(c, order)
    for o in c.outputs:
        if o.name not in arity:
            raise SpecError(f"output {o.name!r} is never assigned", o.loc)


def _fail(message: str, loc: Loc | None, context: str | None = None) -> SpecError:
    return SpecError(message if loc or not context else f"{context}: {message}", loc)


def _expressions(c: Cascade) -> list[Expr]:
    exprs: list[Expr] = [p.expr for p in c.params if p.expr is not None]
    exprs += [x for e in c.einsums for x in (e.target, e.expr, e.where) if x is not None]
    return exprs + [x for i in c.inits for x in (i.target, i.expr)]


def check_depth(expr: Expr) -> None:
    """A located error at the first node nested deeper than MAX_DEPTH: a built or parsed
    expression may nest deeper than the recursive checks below, and every later stage, can
    walk. Iterative, so it runs first on any tree."""
    nodes, depths = [expr], [1]
    while nodes:
        node, depth = nodes.pop(), depths.pop()
        if depth > MAX_DEPTH:
            raise SpecError(NESTED_TOO_DEEPLY, node.loc)
        kids = children(node)
        nodes.extend(kids)
        depths.extend([depth + 1] * len(kids))


def _check_names(c: Cascade) -> None:
    ranks = set(c.rank_names)
    names = ranks | {p.name for p in c.params}
    indices = {r.lower() for r in ranks}
    for s in c.splits:
        if s.rank not in c.dims:
            raise SpecError(f"cannot split {s.rank!r}: not a declared rank", s.loc)
    # in file order; an Einsum's nodes come from its one walk, which the other checks share
    nodes = [n for p in c.params if p.expr is not None for n in walk(p.expr)]
    nodes += [n for e in c.einsums for part in e.nodes for n in part]
    nodes += [n for i in c.inits for x in (i.target, i.expr) for n in walk(x)]
    for node in nodes:
        kind = type(node)
        if kind is Name and node.name not in names:
            raise SpecError(f"unknown name {node.name!r}: not a declared dim or param", node.loc)
        if kind is Index and node.name not in indices:
            raise SpecError(f"unknown index variable {node.name!r}: no rank {rank_of(node.name)!r}",
                            node.loc)
        if kind is not Call:
            continue
        if node.fn not in FUNCTIONS and node.fn not in PREDICATES and node.fn not in UNIONS:
            known = ", ".join(sorted([*FUNCTIONS, *UNIONS]))
            raise SpecError(f"unknown function {node.fn}(...); known functions: {known}; "
                            f"predicates: {', '.join(sorted(PREDICATES))}", node.loc)
        lo, hi = (FUNCTIONS.get(node.fn) or UNIONS.get(node.fn) or PREDICATES[node.fn]).arity
        if not lo <= len(node.args) <= hi:
            want = lo if lo == hi else f"{lo} to {hi}"
            raise SpecError(f"{node.fn}(...) takes {want} arguments, got {len(node.args)}", node.loc)
    for p in c.params:
        if p.expr is not None:
            for node in walk(p.expr):
                if isinstance(node, (Access, Index)):
                    raise SpecError(f"param {p.name} must be a scalar expression over dims, params "
                                    f"and numbers, but uses {print_expr(node)}", node.loc)
                if isinstance(node, Call) and node.fn in UNIONS:  # nothing in a param is ever absent
                    plain = UNIONS[node.fn].combine
                    raise SpecError(f"param {p.name} uses {node.fn}(...), which combines values that may be "
                                    f"absent; a param is always present: write {plain!r} instead", node.loc)


def _tensor_ranks(c: Cascade) -> dict[str, tuple[str, ...]]:
    """Ranks per tensor; checks single assignment, inputs not written, left sides well-formed."""
    ranks: dict[str, tuple[str, ...]] = {}
    for d in c.inputs:
        if d.name in ranks:
            raise SpecError(f"input {d.name!r} declared twice", d.loc)
        ranks[d.name] = tuple(rank_of(i) for i in d.indices)
    inputs = set(ranks)
    iterative = {e.name for e in c.einsums if e.recurrence_var}
    for e in c.einsums:
        if e.name in inputs:
            raise SpecError(f"{e.name!r} is an input and cannot be assigned", e.loc)
        target = tuple(_lhs_rank(e.target.indices[i], e) for i in range(len(e.target.indices)))
        if e.name in ranks and e.name not in iterative:
            raise SpecError(f"{e.name!r} is assigned twice; only iterative tensors (left side "
                            f"indexed x+1) may be, so give the second one a new name", e.target.loc)
        if e.name in ranks and ranks[e.name] != target:
            raise SpecError(f"{e.name!r} is assigned with ranks {list(target)} here but "
                            f"{list(ranks[e.name])} before", e.target.loc)
        ranks[e.name] = target
        if e.reduce not in REDUCE_OPS:
            raise _fail(f"unknown reduction {e.reduce!r}; expected one of {', '.join(REDUCE_OPS)}",
                        e.loc, e.name)
    for i in c.inits:
        if i.target.tensor not in iterative:
            raise SpecError(f"init for {i.target.tensor!r}, which has no recurrence (a left side "
                            f"indexed x+1)", i.target.loc)
    for e in c.einsums:
        if e.recurrence_var and not any(i.target.tensor == e.name for i in c.inits):
            raise SpecError(f"recurrence {e.name} has no init: add a line "
                            f"'init {_init_hint(e)} = ...' for its value at step 0", e.target.loc)
    return ranks


def _lhs_rank(idx: Expr, e: Einsum) -> str:
    if isinstance(idx, Index):
        return rank_of(idx.name)
    var = e.recurrence_var
    if var is not None and index_vars(idx) == [var]:
        return rank_of(var)
    raise SpecError(f"the left side of {e.name} must use plain index variables (or x+1 for a "
                    f"recurrence), not {print_expr(idx)}", idx.loc or e.target.loc)


def _init_hint(e: Einsum) -> str:
    idx = ["0" if e.recurrence_var in index_vars(i) else print_expr(i) for i in e.target.indices]
    return f"{e.name}[{', '.join(idx)}]"


def _check_access(c: Cascade, a: Access, ranks: dict[str, tuple[str, ...]], context: str) -> None:
    if a.tensor not in ranks:
        raise SpecError(f"undefined tensor {a.tensor!r}: it is neither an input nor assigned", a.loc)
    want = ranks[a.tensor]
    if len(a.indices) != len(want):
        raise SpecError(f"{a.tensor} has {len(want)} indices [{', '.join(r.lower() for r in want)}], "
                        f"but {len(a.indices)} are given here", a.loc)
    for pos, idx in enumerate(a.indices):
        if isinstance(idx, Index) and rank_of(idx.name) != want[pos]:
            _check_cross_rank(c, a, pos, idx, want[pos])
        _check_index_expr(c, idx, a, pos, want[pos])


def _check_cross_rank(c: Cascade, a: Access, pos: int, idx: Index, declared: str) -> None:
    """A plain index of another rank is a cross-rank read: allowed for an input, between two
    ranks of the dims line, whose extents `bind_shapes` then compares. An intermediate's extents
    come from its Einsum, and a split rank's from a tile, so neither can be read that way."""
    read = rank_of(idx.name)
    split = next((r for r in (read, declared) if r not in c.dims), None)
    if a.tensor in c.input_names and split is None:
        return
    why = ("only an input may be read at another rank's index" if split is None else
           f"a cross-rank read pairs two ranks of the dims line, and {split} is a split rank")
    raise SpecError(f"index {idx.name} is bound to rank {read}, but position {pos + 1} of {a.tensor} has "
                    f"rank {declared}; {why}: use {declared.lower()} or an index expression",
                    idx.loc or a.loc)


def cross_rank_mismatch(cascade: Cascade, extents: Mapping[str, object]) -> str | None:
    """The message for the first cross-rank read whose two ranks have different integer
    extents in `extents` (ints, or sympy Integers; a symbolic extent is not compared)."""
    for r in cascade.cross_rank_reads:
        read, own = rank_of(r.var), rank_of(r.declared)
        x, y = extents.get(read), extents.get(own)
        if isinstance(x, numbers.Integral) and isinstance(y, numbers.Integral) and x != y:
            return located(r.access, f"{r.access.tensor} is read at {r.var} (rank {read}) in {r.reader}, declared "
                                     f"at {r.declared} (rank {own}): {read}={x} and {own}={y} differ; a "
                                     f"cross-rank read needs equal extents")
    return None


def _check_index_expr(c: Cascade, idx: Expr, a: Access, pos: int, rank: str) -> None:
    stack = [idx]
    while stack:
        node = stack.pop()
        bad = None
        if isinstance(node, Access):  # its own indices are checked as its own read's
            _check_indirect(c, node, a, pos, rank)
            continue
        stack.extend(reversed(children(node)))  # left to right, as `walk`
        if isinstance(node, Binary) and node.op not in ("+", "-", "*", "//", "%"):
            bad = f"'{node.op}' (index expressions use + - * // % min max)"
        elif isinstance(node, Call) and node.fn not in INDEX_FUNCTIONS:
            bad = f"{node.fn}(...) (index expressions use + - * // % min max)"
        elif isinstance(node, Num) and not isinstance(node.value, int):
            bad = f"the non-integer {node.value}"
        if bad:
            raise SpecError(f"index of {a.tensor} uses {bad}", node.loc or a.loc)


INDEX_DTYPES = tuple(d for d in INT_DTYPES if d != "bool")


def _check_indirect(c: Cascade, table: Access, a: Access, pos: int, rank: str) -> None:
    """An indirect index (docs/spec.md, "Indirect indices"): position `pos` of `a` (rank `rank`)
    reads the integer input `table` at index expressions of the Einsum's index variables. Its
    values index `rank`, whose extent comes from `a.tensor`'s shape; a value outside 0..rank-1
    (or a read outside `table`) makes the point absent, so nothing is compared at bind time
    beyond each input's own shape."""
    where = f"position {pos + 1} of {a.tensor} (rank {rank}) reads {table.tensor}"
    decl = next((d for d in c.inputs if d.name == table.tensor), None)
    if decl is None:
        what = "computed by an Einsum" if c.writers(table.tensor) else "neither an input nor assigned"
        raise SpecError(f"{where}, which is {what}; an index position may read only an integer input "
                        f"(a table given at call time, such as a block table: 'input {table.tensor}[...]: int32')",
                        table.loc or a.loc)
    dtype = decl.dtype or "fp32 (no dtype declared)"
    if decl.dtype not in INDEX_DTYPES:
        raise SpecError(f"{where}, which is {dtype}; an index position reads an integer input: declare it "
                        f"'{table.tensor}[{', '.join(decl.indices)}]: int32' (or int64)", table.loc or a.loc)
    nested = next((n for i in table.indices for n in walk(i) if isinstance(n, Access)), None)
    if nested is not None:
        raise SpecError(f"{where} at an index that reads {nested.tensor}: indirect reads do not nest; read "
                        f"{table.tensor} at index expressions of the index variables (compose the two "
                        f"tables into one before the call)", nested.loc or table.loc)


def _check_einsum(c: Cascade, e: Einsum, ranks: dict[str, tuple[str, ...]]) -> None:
    if e.reduce != "sum" and not e.reduced:
        raise SpecError(f"{e.reduce} reduces nothing: every index on the right of {e.name} is also "
                        f"on its left; drop the {e.reduce}[...] or remove an index from the left",
                        e.loc)
    lhs = [i.name for i in e.target.indices if isinstance(i, Index)]
    dup = {v for v in lhs if lhs.count(v) > 1}
    if dup:
        raise SpecError(f"index {dup.pop()} appears twice on the left side of {e.name}", e.target.loc)
    for a in einsum_reads(e):
        _check_access(c, a, ranks, e.name)
    if e.where is not None:
        for a in accesses(e.where):
            dtype = next((d.dtype for d in c.inputs if d.name == a.tensor), None)
            if dtype not in INT_DTYPES:
                raise SpecError(
                    f"the where-predicate reads {a.tensor}, which is {dtype or 'a float tensor'}; "
                    f"predicates read integer or boolean inputs only (declare it ': bool' or ': int32')",
                    a.loc)
        _check_predicate(c, e.where)
    _check_values(c, e.expr)
    _check_contraction_in_nonlinear(e)


def _check_init(c: Cascade, i, ranks) -> None:
    for a in accesses(i.expr):
        _check_access(c, a, ranks, i.target.tensor)


PREDICATE_NODES = ("<", "<=", ">", ">=", "==", "!=", "and", "or")


def _check_predicate(c: Cascade, expr: Expr) -> None:
    if isinstance(expr, Binary) and expr.op in ("and", "or"):
        _check_predicate(c, expr.lhs)
        _check_predicate(c, expr.rhs)
    elif isinstance(expr, Unary) and expr.op == "not":
        _check_predicate(c, expr.operand)
    elif isinstance(expr, Binary) and expr.op in PREDICATE_NODES:
        return
    elif isinstance(expr, Call) and expr.fn in PREDICATES:
        return
    elif isinstance(expr, Access):  # a tensor as a truth value: integer or boolean inputs only
        dtype = next((d.dtype for d in c.inputs if d.name == expr.tensor), None)
        if dtype not in INT_DTYPES:
            raise SpecError(f"{expr.tensor} is {dtype or 'a float tensor'} and cannot be a predicate; a predicate "
                            f"reads integer or boolean inputs (declare it ': bool'), or compare it: "
                            f"{print_expr(expr)} > 0", expr.loc)
    else:
        raise SpecError(f"a where-predicate must be a comparison, nbhd(...), a boolean tensor, or "
                        f"those joined by and/or/not; got {print_expr(expr)}", expr.loc)


def _check_values(c: Cascade, expr: Expr) -> None:
    """Value expressions: predicates only as where(...)'s first argument, nbhd only in predicates."""
    if isinstance(expr, Call) and expr.fn == "where":
        _check_predicate(c, expr.args[0])
        for arg in expr.args[1:]:
            _check_values(c, arg)
        return
    if isinstance(expr, Call) and expr.fn in PREDICATES:
        raise SpecError(f"{expr.fn}(...) is a predicate; use it after 'where' or as "
                        f"where({expr.fn}(...), a, b)", expr.loc)
    if isinstance(expr, Binary) and expr.op in PREDICATE_NODES or isinstance(expr, Unary) and expr.op == "not":
        raise SpecError(f"'{expr.op}' makes a predicate; a value uses it only inside where(cond, a, b)",
                        expr.loc)
    if isinstance(expr, Access):
        return
    for child in (expr.args if isinstance(expr, Call) else
                  (expr.lhs, expr.rhs) if isinstance(expr, Binary) else
                  (expr.operand,) if isinstance(expr, Unary) else ()):
        _check_values(c, child)


def _check_contraction_in_nonlinear(e: Einsum) -> None:
    """A reduced index shared by two reads inside exp/tanh/... is almost always a mistake:
    the map applies per point, so `S[p,m] = tanh(Q[p,e]*K[m,e])` sums tanh over e."""
    calls = [n for n in e.nodes[1] if isinstance(n, Call) and n.fn in FUNCTIONS and n.fn != "where"]
    reduced = set(e.reduced) if calls else set()  # most Einsums call nothing: skip the walks
    for node in calls if reduced else ():
        reads = accesses(Call(node.fn, node.args))
        for var in sorted(reduced):
            users = [a for a in reads if var in index_vars(a)]
            if len(users) >= 2:
                raise SpecError(
                    f"index {var} is summed over the whole right side but appears inside "
                    f"{node.fn}(...), where it joins {users[0].tensor} and {users[1].tensor}: this "
                    f"computes {e.reduce} over {var} of {node.fn}(...), not {node.fn} of the "
                    f"contraction. Compute the contraction in a separate Einsum first",
                    node.loc or e.loc)


def _write_order(c: Cascade) -> list[Einsum] | None:
    """The Einsums in an order that writes every tensor before a (non-carried) read of it, or
    None when the reads form a cycle: Kahn's algorithm over the tensors, linear in the spec and
    without building a graph object (a 10,000-line spec checks in about a second)."""
    writers: dict[str, list[Einsum]] = {}
    for e in c.einsums:
        writers.setdefault(e.name, []).append(e)
    needs: dict[str, set[str]] = {name: set() for name in writers}  # tensor -> written tensors it reads
    for e in c.einsums:
        needs[e.name] |= {a.tensor for a in einsum_reads(e) if a.tensor in writers and not is_carried_read(c, a)}
    users: dict[str, list[str]] = {name: [] for name in writers}
    for name, deps in needs.items():
        for d in deps:
            users[d].append(name)
    waiting = {name: len(deps) for name, deps in needs.items()}
    ready = [name for name, n in waiting.items() if n == 0]
    order: list[Einsum] = []
    while ready:
        name = ready.pop()
        order += writers[name]
        for u in users[name]:
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    return order if len(order) == len(c.einsums) else None


def _check_cycles(c: Cascade) -> list[Einsum]:
    """The Einsums in an order that writes before it reads (`_write_order`), or a SpecError
    naming a cycle, found with networkx only then."""
    order = _write_order(c)
    if order is not None:
        return order
    import networkx as nx  # not at import time: see einsum_ir/graph.py

    g = acyclic_view(dependency_graph(c))
    cycle = nx.find_cycle(g)
    members = {a for a, _ in cycle}
    first = next(e for e in c.einsums if e.name in members)  # report where the cycle starts in the file
    start = [a for a, _ in cycle].index(first.name)
    names = [a for a, _ in cycle[start:] + cycle[:start]] + [first.name]
    raise SpecError(f"cycle: {' -> '.join(names)}; a tensor cannot depend on itself (a recurrence "
                    f"reads the previous step, x, and writes x+1)", first.target.loc)


# ---------------------------------------------------------------------------- presence
#
# Which points of a value are present, as a conjunction of atoms over the value's index
# variables (docs/spec.md, "Unions"): a conjunct of a `where` predicate, `Exists` (a reduction:
# present where some reduced point is), or `AnyOf` (a union form). The empty set is "present
# everywhere". Out-of-bounds reads are not modeled: the check is about different predicates.


@dataclass(frozen=True)
class Exists:
    """Present where some point of the bound (reduced) variables makes `body` hold."""

    bound: tuple[str, ...]  # fresh index variable names
    body: frozenset


@dataclass(frozen=True)
class AnyOf:
    """Present where one of the branches (conjunctions) holds: a union form's operands."""

    branches: tuple[frozenset, ...]


Presence = frozenset


def _free(atom) -> set[str]:
    if isinstance(atom, Exists):
        return set().union(*map(_free, atom.body)) - set(atom.bound)
    if isinstance(atom, AnyOf):
        return set().union(*(_free(x) for b in atom.branches for x in b))
    return set(index_vars(atom))


def _subst(atom, mapping: dict[str, Expr]):
    if isinstance(atom, Exists):
        inner = {k: v for k, v in mapping.items() if k not in atom.bound}
        return Exists(atom.bound, frozenset(_subst(x, inner) for x in atom.body))
    if isinstance(atom, AnyOf):
        return AnyOf(tuple(frozenset(_subst(x, mapping) for x in b) for b in atom.branches))
    return substitute(atom, mapping)


def _freshen(atom, tag: str):
    """`atom` with the variables its Exists bind renamed apart (`m'GM` -> `m'GM.SN3`)."""
    if isinstance(atom, Exists):
        names = {b: f"{b}.{tag}" for b in atom.bound}
        body = frozenset(_freshen(_subst(x, {b: Index(n) for b, n in names.items()}), tag) for x in atom.body)
        return Exists(tuple(names.values()), body)
    if isinstance(atom, AnyOf):
        return AnyOf(tuple(frozenset(_freshen(x, tag) for x in b) for b in atom.branches))
    return atom


def _flat(atoms) -> set:
    """The atoms with every Exists opened: its bound variables then stand for one witness."""
    out: set = set()
    for a in atoms:
        out |= _flat(a.body) if isinstance(a, Exists) else {a}
    return out


def implies(have: Presence, atom: Expr | Exists | AnyOf) -> bool:
    """`have` (a conjunction) implies `atom`: structurally, with the witnesses of an Exists
    searched among the index variables `have` and the atom mention (a few: one per rank, at most)."""
    if atom in have or isinstance(atom, Binary) and atom.op in ("==", "<=", ">=") and atom.lhs == atom.rhs:
        return True  # held, or true everywhere (`m // L == m // L`, once a witness is put in)
    if isinstance(atom, AnyOf):
        return any(all(implies(have, x) for x in b) for b in atom.branches)
    flat = _flat(have)
    if atom in flat:
        return True
    # a union in what we have implies the atom when each of its branches does
    if any(isinstance(a, AnyOf) and all(implies(frozenset(b) | (flat - {a}), atom) for b in a.branches)
           for a in flat):
        return True
    if isinstance(atom, Exists):  # witnesses: the variables we have, and the atom's own free ones
        names = sorted(set().union(*map(_free, flat), _free(atom)))  # (`some m' has m' // L == m // L`: m)
        for witness in itertools.islice(itertools.product(names, repeat=len(atom.bound)), 512):
            sigma = {v: Index(w) for v, w in zip(atom.bound, witness)}
            if all(implies(flat, _subst(x, sigma)) for x in atom.body):
                return True
    return False


def _from_reduction(atom) -> bool:
    """The atom can fail because a reduction saw no present point (a row of no key)."""
    if isinstance(atom, Exists):
        return True
    return isinstance(atom, AnyOf) and any(_from_reduction(x) for b in atom.branches for x in b)


def _simplify(atoms: Presence) -> Presence:
    """`atoms` without those the others imply (a union implied by one of its own branches)."""
    if all(not isinstance(a, (Exists, AnyOf)) for a in atoms):
        return atoms  # predicate conjuncts imply one another only when equal: a set has each once
    out = set(atoms)
    for a in sorted(atoms, key=lambda x: not isinstance(x, AnyOf)):  # drop unions first
        if implies(frozenset(out - {a}), a):
            out.discard(a)
    return frozenset(out)


def describe_presence(atoms: Presence) -> str:
    """A presence (frozenset of atoms) as words: `some m has m <= p and p - m < W`. A witness
    takes its rank's variable name, primed where that name is also free (`some m' has
    m' // L == m // L`)."""
    names: dict[str, str] = {}
    taken = {v for x in _flat(atoms) for v in index_vars(x) if "'" not in v}

    def witness(v: str) -> str:
        if v not in names:
            name = v.split("'")[0]
            while name in taken:
                name += "'"
            names[v] = name
            taken.add(name)
        return names[v]

    def one(a) -> str:
        if isinstance(a, Exists):
            inner = " and ".join(sorted(one(x) for x in a.body))
            return f"some {', '.join(witness(v) for v in a.bound)} has {inner}"
        if isinstance(a, AnyOf):
            return "(" + " or ".join(" and ".join(sorted(one(x) for x in b)) for b in a.branches) + ")"
        plain = {v: Index(witness(v)) for v in index_vars(a) if "'" in v}
        return print_expr(substitute(a, plain) if plain else a)

    return " and ".join(sorted(one(a) for a in atoms)) or "everywhere"


_EVERYWHERE: Presence = frozenset()


class PresenceAnalysis:
    """Presence of every tensor, computed once, and the check of each intersecting operation.
    `of(expr)` is an expression's presence (a frozenset of atoms, empty: everywhere); the
    lowering asks it whether a union operand is present exactly where its predicates hold."""

    def __init__(self, c: Cascade, order: list[Einsum] | None = None, tile_local: frozenset[str] = frozenset()):
        """`order`: the Einsums, each after those it reads (default: `topological_einsums`).
        `tile_local`: reductions the lowering knows, with their presence, inside each key tile
        (grouped reductions, lowering.groups), taken as present wherever read: what the
        lowering asks is whether a value is known only after the key loop."""
        self.c = c
        self.fresh = itertools.count()
        self.tensors: dict[str, Presence] = {}
        # The presence of every node of every Einsum's right side, by node identity (the
        # cascade holds the nodes, so no id is reused): `check` and the lowering read these
        # instead of walking each operand again, so the analysis is linear in the spec.
        self.nodes: dict[int, Presence] = {}
        iterative = {e.name for e in c.einsums if e.recurrence_var}
        for e in topological_einsums(c) if order is None else order:
            if e.name in iterative or e.name in tile_local:
                # An iterative tensor's absent update keeps its previous value, so its reads are
                # present (the carry is already the union with the previous step); a tile-local
                # one is known, with its presence, wherever the key loop reads it.
                self.tensors[e.name] = frozenset()
                continue
            space = frozenset(conjuncts(e.where)) | self.of(e.expr)
            self.tensors[e.name] = _simplify(self.reduce(space, e.reduced, e.name))

    def reduce(self, atoms: Presence, reduced: list[str], tag: str) -> Presence:
        if not reduced:
            return atoms
        inner = [a for a in atoms if _free(a) & set(reduced)]
        outer = atoms - set(inner)
        if not inner:
            return outer
        body = frozenset(_flat(inner))
        bound = tuple(v for v in reduced) + tuple(b for a in inner if isinstance(a, Exists) for b in a.bound)
        names = {v: f"{v}'{tag}" for v in reduced}
        body = frozenset(_subst(x, {v: Index(n) for v, n in names.items()}) for x in body)
        return outer | {Exists(tuple(names.get(v, v) for v in bound), body)}

    def read(self, a: Access) -> Presence:
        atoms = self.tensors.get(a.tensor, frozenset())
        if not atoms:
            return atoms
        e = self.c.einsum(a.tensor)
        mapping = {i.name: x for i, x in zip(e.target.indices, a.indices) if i != x}
        if not mapping and not any(isinstance(x, (Exists, AnyOf)) for x in atoms):
            return atoms  # read at its own indices, no witness to rename: the atoms as they are
        k = next(self.fresh)  # a fresh witness per read: two reads of one tensor are two rows
        return frozenset(_subst(_freshen(x, f"{a.tensor}{k}"), mapping) for x in atoms)

    def of(self, expr: Expr) -> Presence:
        known = self.nodes.get(id(expr))
        if known is None:
            known = self.nodes[id(expr)] = self._of(expr)
        return known

    def _of(self, expr: Expr) -> Presence:
        kind = type(expr)
        if kind is Access:
            return self.read(expr)
        if kind is Num or kind is Name or kind is Index:
            return _EVERYWHERE
        if kind is Binary and expr.op not in PREDICATE_NODES:  # most nodes: the union of two operands'
            a, b = self.of(expr.lhs), self.of(expr.rhs)
            return a if not b or a == b else b if not a else a | b
        if isinstance(expr, Call) and expr.fn in UNIONS:
            branches = tuple(dict.fromkeys(self.of(x) for x in expr.args))
            if any(not b for b in branches):
                return frozenset()
            return branches[0] if len(branches) == 1 else frozenset({AnyOf(branches)})
        if isinstance(expr, Call) and expr.fn == "where":  # the condition is read as a truth value
            return self.of(expr.args[1]) | self.of(expr.args[2])
        if isinstance(expr, Binary) and expr.op in PREDICATE_NODES or isinstance(expr, Call) and expr.fn in PREDICATES:
            return frozenset()
        return frozenset().union(*(self.of(x) for x in children(expr))) if children(expr) else frozenset()

    def check(self, e: Einsum) -> None:
        if e.recurrence_var:  # an absent update keeps the previous step: a union already
            return
        context = frozenset(conjuncts(e.where))  # points the Einsum drops anyway do not matter
        for node in e.nodes[1]:
            op = node.op if isinstance(node, Binary) else node.fn if isinstance(node, Call) else None
            if op not in INTERSECTING or isinstance(node, Call) and len(node.args) != 2:
                continue
            a, b = (node.lhs, node.rhs) if isinstance(node, Binary) else node.args
            pa, pb = self.of(a), self.of(b)
            if pa == pb or not (accesses(a) and accesses(b)):  # a constant, param or index is present everywhere
                continue
            xa = {x for x in pa if not implies(pb | context, x)}
            xb = {x for x in pb if not implies(pa | context, x)}
            lost = None
            if xa and xb:
                lost = f"{print_expr(a)} is present where {describe_presence(pa)}, {print_expr(b)} where {describe_presence(pb)}"
            for x, y, px, other in ((xa, b, pa, a), (xb, a, pb, b)):
                if lost is None and any(map(_from_reduction, x)) and accesses(y):
                    lost = (f"{print_expr(other)} is absent where {describe_presence(x)} fails, while "
                            f"{print_expr(y)} is present there")
            if lost is None:
                continue
            union = INTERSECTING[op]
            fix = (f"{union}({print_expr(a)}, {print_expr(Unary('-', b))})" if op == "-" else
                   f"{union}({print_expr(a)}, {print_expr(b)})")
            raise SpecError(
                f"in {e.name}, '{op}' intersects operands whose presence differs: {lost}, so the "
                f"result is absent (its fill, 0) wherever either one is. To combine them with the "
                f"absent one acting as the identity (a softmax over the union of key sets), write "
                f"{fix}", node.loc or e.loc)


def _check_unions(c: Cascade, order: list[Einsum]) -> None:
    """A plain + - max min whose operands are present at different points, because of different
    predicates, drops the points one of them lacks: reject it and name the union form."""
    if not any(e.where is not None for e in c.einsums):
        return  # nothing is absent by a predicate (out-of-bounds reads are not this check's)
    # any order that writes before it reads gives the same presence
    presence = PresenceAnalysis(c, order)
    for e in c.einsums:
        presence.check(e)
