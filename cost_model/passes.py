"""FuseMax pass analysis (DESIGN section 5).

A pass is a traversal of every element of a fiber of one rank. An Einsum that iterates the rank
and reads a tensor that is only complete after a whole earlier traversal (a full reduction over
the rank, or anything computed from one) must start a new pass. Walking the cascade in
dependency order and giving every Einsum the earliest pass its reads allow yields the count and,
for every step up, the Einsum pair that forces it.

Two things keep work in the same pass, and both are read from the cascade, not assumed:
- a recurrence over the rank's outer part (`RM[m1+1] = max(RM[m1], ...)`) is loop-carried: its
  value at step m1+1 is available during that step, only the final `RM[M1]` is a full reduction;
- a complete tensor that enters a sum over the rank only inside factors constant in the rank,
  term by term of the distributed summand (`O = SN*V/SD`, `O = (E1/D1 - lam*E2/D2)*V`), can be
  applied after each term's sum (sum_m x*c = c*sum_m x): the deferred division of FuseMax, as
  lowering/defer.py rewrites it (one numerator per term).

An Einsum that does not traverse the rank (`LSE = GM + log(SD)`) is in no pass (0): it runs
once its reads are complete, after the traversals.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from einsum_ir.graph import einsum_reads, is_carried_read, topological_einsums
from einsum_ir.ir import Access, Cascade, Einsum, Expr, index_vars, product_terms, walk
from einsum_ir.printer import print_expr


@dataclass(frozen=True)
class Boundary:
    """Why `consumer` starts pass `after`: it revisits the rank and reads `access`, which is
    complete only after pass `before` (written by `producer`)."""

    producer: str
    consumer: str
    access: str
    before: int
    after: int
    reason: str


@dataclass(frozen=True)
class PassReport:
    ranks: tuple[str, ...]
    count: int
    boundaries: tuple[Boundary, ...]
    assignment: dict[str, int] = field(default_factory=dict)  # Einsum -> pass (0: outside any)
    notes: tuple[str, ...] = ()

    @property
    def explanation(self) -> str:
        return str(self)

    def __str__(self) -> str:
        over = "x".join(self.ranks)
        lines = [f"Passes over {over}: {self.count}"]
        for k in range(self.count + 1):
            names = [n for n, p in self.assignment.items() if p == k]
            if names:
                label = f"pass {k}" if k else "outside (no traversal of " + over + ")"
                lines.append(f"  {label}: {', '.join(names)}")
        if self.boundaries:
            lines.append("Pass boundaries:")
            lines += [f"  {b.producer} -> {b.consumer}: {b.reason}" for b in self.boundaries]
        lines += [f"  note: {n}" for n in self.notes]
        if self.count > 1:
            lines.append(f"  {self.count - 1} extra pass(es): each needs an on-chip buffer of a whole "
                         f"{over}-fiber, or off-chip traffic proportional to {over} (see roofline)")
        return "\n".join(lines)


def resolve_ranks(c: Cascade, rank: str | tuple[str, ...]) -> tuple[str, ...]:
    """The ranks one traversal covers. `"M"` is rank M; when a cascade lays its keys out in
    several dimensions (MX, MY, ...) and declares no M, `"M"` means all of them. Several ranks
    may also be named, `"MX,MY"` or a tuple."""
    names = tuple(r.strip() for r in rank.split(",")) if isinstance(rank, str) else tuple(rank)
    out: list[str] = []
    for name in names:
        if name in c.dims:
            out.append(name)
        else:
            parts = {s.outer for s in c.splits} | {s.inner for s in c.splits}
            out += [d for d in c.dims if d.startswith(name) and d not in parts and d != name]
    if not out:
        raise ValueError(f"no rank {rank!r} in the cascade; ranks: {', '.join(c.dims)}")
    return tuple(out)


def rank_vars(c: Cascade, ranks: tuple[str, ...]) -> set[str]:
    """Index variables of the ranks and of their split parts (m, m1, m0)."""
    out = {r.lower() for r in ranks}
    for s in c.splits:
        if s.rank in ranks:
            out |= {s.outer.lower(), s.inner.lower()}
    return out


def analyze(c: Cascade, rank: str | tuple[str, ...] = "M") -> PassReport:
    ranks = resolve_ranks(c, rank)
    rvars = rank_vars(c, ranks)
    avail: dict[str, int] = {d.name: 0 for d in c.inputs}  # pass after which a tensor exists
    assignment: dict[str, int] = {}
    boundaries: list[Boundary] = []
    notes: list[str] = []
    for e in topological_einsums(c):
        traverses = bool(set(e.space) & rvars)
        need, forced_by = (1 if traverses else 0), None
        for a in einsum_reads(e):
            if is_carried_read(c, a):
                continue  # the recurrence's previous step: loop-carried within the pass
            src = avail.get(a.tensor, 0)
            streaming = bool(set(index_vars(a)) & rvars)
            step = src
            if traverses and not streaming and src >= 1:
                if _deferrable(e, a, rvars):
                    notes.append(f"{e.name} reads {print_expr(a)} (complete after pass {src}) only as a "
                                 f"factor constant in {'/'.join(sorted(rvars & set(e.reduced)))}: it is "
                                 f"applied after the sum (deferred), so no new pass")
                else:
                    step = src + 1
            if step > need:
                need, forced_by = step, (a, src) if step > src else None
        assignment[e.name] = need if traverses else 0  # an epilogue (LSE = GM + log(SD)) is in no pass
        avail[e.name] = need
        if forced_by is not None:
            a, src = forced_by
            boundaries.append(Boundary(_producer(c, a.tensor, rvars, avail), e.name, print_expr(a),
                                       src, need, _reason(c, e, a, src, need, rvars)))
    count = max(assignment.values(), default=0)
    return PassReport(ranks, count, tuple(boundaries), assignment, tuple(dict.fromkeys(notes)))


def _producer(c: Cascade, tensor: str, rvars: set[str], avail: dict[str, int]) -> str:
    """The Einsum that completed the traversal `tensor` depends on (itself, if it reduces)."""
    e = c.einsum(tensor)
    if set(e.space) & rvars:
        return e.name
    upstream = [a.tensor for a in einsum_reads(e) if avail.get(a.tensor, 0) == avail[tensor]]
    return _producer(c, upstream[0], rvars, avail) if upstream else e.name


def _reason(c: Cascade, e: Einsum, a: Access, src: int, after: int, rvars: set[str]) -> str:
    writer = c.einsum(a.tensor)
    over = ", ".join(v for v in writer.space if v in rvars)
    if writer.recurrence_var:
        what = f"{print_expr(a)} is the final step of the recurrence over {writer.recurrence_var}"
    elif set(writer.space) & rvars:
        what = f"{a.tensor} = {writer.reduce} over {over} completes only at the end of pass {src}"
    else:
        what = f"{a.tensor} is computed from a reduction completed in pass {src}"
    used = ", ".join(sorted(rvars & set(e.space)))
    return f"{what}; {e.name} iterates {used} again and reads {print_expr(a)}, so it starts pass {after}"


def _deferrable(e: Einsum, a: Access, rvars: set[str]) -> bool:
    """Whether `a` can be applied after `e`'s sum over the rank: in every term of the
    distributed summand, each occurrence is inside a factor or divisor over none of the
    reduced indices (the factors lowering/defer.py moves out of the term's sum)."""
    reduced = set(e.reduced)
    if e.reduce != "sum" or not (reduced & rvars) or set(index_vars(a)) & reduced:
        return False
    if e.where is not None and a in _accesses(e.where):
        return False
    return all(not (set(index_vars(f)) & reduced) for _, term in product_terms(e.expr, distribute=True)
               for _, f in term if a in _accesses(f))


def _accesses(expr: Expr) -> list[Access]:
    return [n for n in walk(expr) if isinstance(n, Access)]
