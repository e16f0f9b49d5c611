"""Grouped reductions over the key rank: `X[..., g] = red[m] Y[..., m] where m // L == g`, read
back at the key's own group, `X[..., m // L]` (landmark attention's softmax inside a block of L
keys). In key tiles aligned to L every group lies in one tile, so such a reduction completes in
the tile that holds its keys: a value per group of the tile, never carried from tile to tile,
and known (with its presence: some point of the group was present) before the tile's
reductions read it.

Plain data: `groupings(c)` finds them once; the stage keeps the ones over its key rank, the
strategy keeps unions present point by point for them, and the emitters reduce a tile's keys
group by group and read a group's value back at each of its keys.
"""
from __future__ import annotations

from dataclasses import dataclass

from einsum_ir.errors import located
from einsum_ir.ir import Access, Binary, Cascade, Einsum, Expr, Index, Name, Num, conjuncts, index_vars, walk
from einsum_ir.printer import print_expr


@dataclass(frozen=True)
class Grouping:
    """`var` (g) numbers the groups of `size` consecutive values of the key variable `key` (m)."""

    var: str
    key: str
    size: Expr  # a Name (an int parameter or dim) or a Num

    def read_at(self) -> Expr:
        """The index a reader gives the group rank: the group of its key, `m // L`."""
        return Binary("//", Index(self.key), self.size)

    def describe(self) -> str:
        return f"{self.var} = {print_expr(self.read_at())}"


def _tie(atom: Expr) -> tuple[str, str, Expr] | None:
    """(g, m, L) for a conjunct `m // L == g` (either side)."""
    if not isinstance(atom, Binary) or atom.op != "==":
        return None
    for left, right in ((atom.lhs, atom.rhs), (atom.rhs, atom.lhs)):
        if (isinstance(right, Index) and isinstance(left, Binary) and left.op == "//"
                and isinstance(left.lhs, Index) and isinstance(left.rhs, (Name, Num))):
            return right.name, left.lhs.name, left.rhs
    return None


def grouping(e: Einsum) -> Grouping | None:
    """How `e` groups its one reduced (key) variable, when it is a grouped reduction: a sum or
    max over m whose predicate ties a left-side variable g to `m // L`, g read nowhere else."""
    if len(e.reduced) != 1 or e.reduce not in ("sum", "max") or e.recurrence_var:
        return None
    atoms = list(conjuncts(e.where))
    for atom in atoms:
        tie = _tie(atom)
        if tie is None:
            continue
        var, key, size = tie
        others = [a for a in atoms if a is not atom]
        if (key == e.reduced[0] and var in e.lhs_vars and var not in index_vars(e.expr)
                and not any(var in index_vars(a) for a in others)):
            return Grouping(var, key, size)
    return None


def groupings(c: Cascade) -> dict[str, Grouping]:
    """The grouped reductions of `c` that every reader reads at its key's group (`X[.., m // L]`,
    with the reduction's own key variable and size), by name."""
    found = {e.name: g for e in c.einsums if (g := grouping(e)) is not None}
    for e in c.einsums:
        for a in (n for x in (e.expr, e.where) if x is not None for n in walk(x) if isinstance(n, Access)):
            g = found.get(a.tensor)
            if g is None:
                continue
            at = c.einsum(a.tensor).target.indices.index(Index(g.var))
            if a.indices[at] != g.read_at():
                del found[a.tensor]
    return found


def no_key_ranges(c: Cascade, grouped: dict[str, Grouping]) -> str | None:
    """Why states over key ranges (partial states, split-KV, a ring's key shards) are not derived
    for a key loop with grouped reductions (None: it has none), located at the first."""
    if not grouped:
        return None
    name, g = next(iter(grouped.items()))
    return located(c.einsum(name), f"{name} reduces the keys in groups ({g.describe()}), which a key range cut "
                                   f"inside a group would split; partial states over key ranges (split-KV, the "
                                   f"ring) are not derived for grouped reductions: run the whole key range at "
                                   f"once (kern(...))")


def group_tie(e: Einsum, g: Grouping) -> Expr:
    """The conjunct of `e.where` that ties its group variable to the key (what a tile aligned to
    the groups holds by construction)."""
    return next(a for a in conjuncts(e.where) if _tie(a) == (g.var, g.key, g.size))
