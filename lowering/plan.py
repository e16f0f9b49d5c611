"""Kernel plans (DESIGN section 6): stages, Einsum classes, grid, tiles, online reductions.

A cascade is first rewritten (division deferral). Then:

1. **Score contractions** are sums over ranks of a product of two operands where each operand
   keeps a rank the other lacks (`S[p,m] = Q[p,e]*K[m,e]`). The kept ranks that some later
   Einsum reduces are the *stream* ranks (M); the other side's kept ranks are the *query*
   ranks (P, and GQA's R: heads sharing a K/V head pack into one query tile); the score's
   remaining kept ranks go to the *grid* (B, H); every other rank is a *feature* rank held
   whole in a tile (E, F, a low-rank R).
2. Each distinct (stream, query) pair is a **stage**: one kernel launch with a grid of
   (query tiles) x (grid ranks) and a loop over key tiles.
3. Every Einsum joins the stage whose stream and query ranks it uses, or, without a stream
   rank, the stage whose carried results it reads (epilogue), or the stage of its first
   reader (prologue). Within its stage it is classified as
   `prologue` (no stream rank, reads no carried value), `key_side` (stream rank, no query
   rank), `stream` (stream and query rank), `carried` (reduces the stream rank) or
   `epilogue` (no stream rank, after the loop). An epilogue that sums a grid rank is an
   atomic accumulation (`grid_reduce`).
4. A carried `max` read inside the loop is **online**: each carried sum whose summand depends
   on it must rescale by a factor that depends only on the old and new maximum; sympy derives
   it (`exp(GM_old - GM_new)` for softmax) or the plan fails with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import sympy

from einsum_ir.errors import LoweringError
from einsum_ir.graph import dependency_graph, topological_einsums
from einsum_ir.ir import Access, Cascade, Einsum, Index, index_vars, product_terms
from einsum_ir.lowering.defer import defer_division
from einsum_ir.lowering.exprs import tensors_read, to_sympy
from einsum_ir.lowering.masks import SkipPlan, skip_plan


@dataclass
class Stage:
    index: int
    stream: tuple[str, ...]
    query: tuple[str, ...]
    grid: tuple[str, ...]
    features: tuple[str, ...] = ()
    einsums: list[Einsum] = field(default_factory=list)
    kind: dict[str, str] = field(default_factory=dict)
    online: list[str] = field(default_factory=list)
    rescale: dict[str, sympy.Expr] = field(default_factory=dict)  # carried sum -> ratio
    loads: list[str] = field(default_factory=list)
    stores: list[str] = field(default_factory=list)
    grid_reduce: set[str] = field(default_factory=set)
    predicate: object = None
    skip: SkipPlan = field(default_factory=SkipPlan)
    tiles: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"stage {self.index}: stream {','.join(self.stream)} | query {','.join(self.query)}"
                 f" | grid {','.join(self.grid) or '-'} | features {','.join(self.features) or '-'}"]
        for e in self.einsums:
            extra = " (online max)" if e.name in self.online else ""
            if e.name in self.rescale and self.rescale[e.name] != 1:
                extra = f" (rescaled by {self.rescale[e.name]})"
            if e.name in self.grid_reduce:
                extra = " (atomic over grid)"
            lines.append(f"  {self.kind[e.name]:9s} {e.name}{extra}")
        lines.append(f"  skipping: {self.skip.describe()}")
        return "\n".join(lines)


@dataclass
class Plan:
    cascade: Cascade  # the rewritten cascade the stages refer to
    stages: list[Stage]
    intermediates: list[str]  # tensors materialized between stages

    def summary(self) -> str:
        return "\n".join(s.summary() for s in self.stages)


def _score_split(e: Einsum):
    """(side-A kept ranks, side-B kept ranks) for a score contraction, else None."""
    if e.reduce != "sum" or not e.reduced or e.where is not None and False:
        return None
    lhs = e.lhs_vars
    for _, factors in product_terms(e.expr, distribute=True):
        accs = [f for r, f in factors if isinstance(f, Access)]
        if len(accs) < 2:
            continue
        vsets = [set(index_vars(a)) for a in accs]
        for i in range(len(accs)):
            for j in range(len(accs)):
                if i == j:
                    continue
                a_only = [v for v in lhs if v in vsets[i] and v not in vsets[j]]
                b_only = [v for v in lhs if v in vsets[j] and v not in vsets[i]]
                # the contracted rank is each operand's last (contiguous, head-dim) index
                shared_red = {v for v in set(e.reduced) & vsets[i] & vsets[j]
                              if accs[i].indices[-1] == Index(v) and accs[j].indices[-1] == Index(v)}
                if a_only and b_only and shared_red:
                    return a_only, b_only
    return None


def _reduced_later(c: Cascade, name: str) -> set[str]:
    g = dependency_graph(c)
    out = set()
    for d in nx.descendants(g, name):
        for w in c.writers(d):
            out |= set(w.reduced)
    return out


def find_stages(c: Cascade) -> list[Stage]:
    stages: dict[tuple, Stage] = {}
    for e in c.einsums:
        split = _score_split(e)
        if split is None:
            continue
        later = _reduced_later(c, e.name)
        a, b = split
        sa, sb = [v for v in a if v in later], [v for v in b if v in later]
        if sb and not sa:
            stream, qside = sb, a
        elif sa and not sb:
            stream, qside = sa, b
        elif sa and sb:  # both sides reduced later: the side reduced by a max / by the direct readers
            direct = set()
            for w in c.einsums:
                if e.name in tensors_read(w.expr):
                    direct |= set(w.reduced)
            stream = [v for v in b if v in direct] or sb
            qside = a if stream == sb or set(stream) <= set(b) else b
        else:
            continue
        # every query-side rank the keys lack tiles the queries: GQA's R (or MQA's H) packs
        # the heads that share a key/value head into one tile, loading each K/V tile once
        query = list(qside)
        grid = [v for v in e.lhs_vars if v not in stream and v not in query]
        key = (tuple(stream), tuple(query))
        if key not in stages:
            stages[key] = Stage(len(stages), tuple(stream), tuple(query), tuple(grid))
    if not stages:
        raise LoweringError("no query-key score contraction (a sum of Q[p,e]*K[m,e]-like products "
                            "kept over two token ranks) to stream over; linear-attention states "
                            "need the chunked-scan lowering")
    return list(stages.values())


def build_plan(c: Cascade) -> Plan:
    if c.inits or any(e.recurrence_var for e in c.einsums):
        raise LoweringError("recurrences (iterative tensors) are not lowered; write the multi-pass "
                            "form and the lowering derives the running reductions itself")
    c = defer_division(c)
    stages = find_stages(c)
    order = topological_einsums(c)
    g = dependency_graph(c)
    owner: dict[str, Stage] = {}
    pending: list[Einsum] = []
    for e in order:
        space = set(e.space)
        cands = [s for s in stages if set(s.stream) <= space and set(s.query) & space]
        cands = cands or [s for s in stages if set(s.stream) & space and set(s.stream) & set(e.reduced)]
        if cands:
            owner[e.name] = cands[0]
            continue
        # no stream rank: epilogue of the latest stage whose values it reads
        reads = nx.ancestors(g, e.name)
        ups = [owner[t] for t in reads if owner.get(t) is not None]  # pending prologues are None
        if ups:
            owner[e.name] = max(ups, key=lambda s: s.index)
        else:
            pending.append(e)
        owner.setdefault(e.name, None)  # type: ignore[arg-type]
    for e in reversed(pending):  # prologue: the stage of the first reader
        readers = [owner[d] for d in nx.descendants(g, e.name) if owner.get(d) is not None]
        if not readers:
            raise LoweringError(f"{e.name} reads no key-side value and feeds no stage")
        owner[e.name] = min(readers, key=lambda s: s.index)
    for e in order:
        s = owner[e.name]
        s.einsums.append(e)
    # stage order: by dependencies
    sg = nx.DiGraph()
    sg.add_nodes_from(s.index for s in stages)
    for a, b in g.edges:
        if a in owner and b in owner and owner[a] is not owner[b]:
            sg.add_edge(owner[a].index, owner[b].index)
    if not nx.is_directed_acyclic_graph(sg):
        raise LoweringError("stages depend on each other in a cycle")
    by_index = {s.index: s for s in stages}
    stages = [by_index[i] for i in nx.topological_sort(sg)]
    for i, s in enumerate(stages):
        s.index = i
    intermediates = []
    for s in stages:
        _classify(c, s, owner)
        for e in s.einsums:
            readers = [w for w in c.einsums if e.name in tensors_read(w.expr) + tensors_read(w.where)]
            if e.name in c.output_names or any(owner[w.name] is not s for w in readers):
                if s.kind[e.name] in ("stream", "key_side"):
                    raise LoweringError(f"{e.name} holds a value per key (rank {','.join(s.stream)}) "
                                        f"that is read after the key loop or returned; storing it "
                                        f"needs another pass")
                s.stores.append(e.name)
                if e.name not in c.output_names:
                    intermediates.append(e.name)
        local = {e.name for e in s.einsums}
        for e in s.einsums:
            for t in tensors_read(e.expr) + tensors_read(e.where):
                if t not in local and t not in s.loads:
                    s.loads.append(t)
        s.features = _features(c, s)
        s.predicate = _stage_predicate(c, s)
        s.skip = skip_plan(s.predicate, s.query, s.stream)
    return Plan(c, stages, intermediates)


def _features(c: Cascade, s: Stage) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for e in s.einsums:
        for v in e.space + index_vars(e.where):
            if v not in s.stream and v not in s.query and v not in s.grid:
                seen[v] = None
    # ranks only used inside index expressions of a tensor predicate (pb, mb) are not tile axes
    return tuple(seen)


def _classify(c: Cascade, s: Stage, owner) -> None:
    local = {e.name for e in s.einsums}
    carried: set[str] = set()
    for e in s.einsums:
        space = set(e.space)
        stream = set(s.stream)
        if stream & set(e.reduced):
            if not stream <= set(e.reduced):
                raise LoweringError(f"{e.name} reduces only part of the key ranks {','.join(s.stream)}")
            if e.reduce not in ("sum", "max"):
                raise LoweringError(f"{e.name} is a {e.reduce} over the key rank; only sum and max "
                                    f"reductions stream")
            kind = "carried"
        elif stream & space:
            kind = "stream" if set(s.query) & space else "key_side"
        else:
            reads = _local_ancestors(c, e.name, local)
            kind = "epilogue" if any(s.kind.get(t) in ("carried", "epilogue") for t in reads) else "prologue"
            if kind == "epilogue" and set(e.reduced) & set(s.grid):
                s.grid_reduce.add(e.name)
                if e.reduce != "sum" or e.where is not None:
                    raise LoweringError(f"{e.name} reduces grid rank(s) with {e.reduce}; only an "
                                        f"unguarded sum over heads/batch can accumulate atomically")
            elif set(e.reduced) & set(s.grid):
                raise LoweringError(f"{e.name} reduces grid rank(s) {set(e.reduced) & set(s.grid)} "
                                    f"before the key loop")
        s.kind[e.name] = kind
        if kind == "carried":
            carried.add(e.name)
    # carried values read inside the loop: only online maxima
    for e in s.einsums:
        if s.kind[e.name] not in ("stream", "key_side", "carried"):
            continue
        for t in tensors_read(e.expr) + tensors_read(e.where):
            if s.kind.get(t) == "carried":
                w = c.einsum(t)
                if w.reduce != "max":
                    raise LoweringError(f"{e.name} reads {t}, a full sum over {','.join(s.stream)}, "
                                        f"inside the key loop; that needs another pass (and the "
                                        f"division could not be deferred)")
                if t not in s.online:
                    s.online.append(t)
            elif s.kind.get(t) == "epilogue":
                raise LoweringError(f"{e.name} reads {t} inside the key loop, but {t} is known only "
                                    f"after it")
    for e in s.einsums:
        if s.kind[e.name] != "carried":
            continue
        s.rescale[e.name] = _rescale(c, s, e)


def _local_ancestors(c: Cascade, name: str, local: set[str]) -> set[str]:
    g = dependency_graph(c)
    return {a for a in nx.ancestors(g, name) if a in local}


def _rescale(c: Cascade, s: Stage, e: Einsum) -> sympy.Expr:
    """The factor a carried reduction's accumulator takes when online maxima grow."""
    online = set(s.online)

    def leaf(a: Access):
        t = a.tensor
        if t in online:
            return sympy.Symbol(f"G_{t}")
        if s.kind.get(t) in ("stream", "key_side"):
            w = c.einsum(t)
            deps = _local_ancestors(c, t, {x.name for x in s.einsums}) | {t}
            if not (deps & online):
                return sympy.Symbol(f"T_{t}")
            if w.reduced:
                raise LoweringError(f"{t} reduces over {','.join(w.reduced)} a value that depends "
                                    f"on the running maximum {sorted(deps & online)}")
            return to_sympy(w.expr, leaf)
        return sympy.Symbol(f"T_{t}")

    body = to_sympy(e.expr, leaf)
    gs = [sympy.Symbol(f"G_{t}") for t in online if sympy.Symbol(f"G_{t}") in body.free_symbols]
    if not gs:
        return sympy.Integer(1)
    if e.reduce == "max":
        raise LoweringError(f"{e.name} takes a max over values that depend on the running maximum "
                            f"{gs[0].name[2:]}; no online form")
    new = {g: sympy.Symbol(g.name + "_new") for g in gs}
    ratio = sympy.simplify(sympy.powsimp(body.subs(new) / body, force=True))
    ratio = sympy.powsimp(sympy.simplify(ratio), force=True)
    allowed = set(gs) | set(new.values())
    if not ratio.free_symbols <= allowed:
        names = ", ".join(g.name[2:] for g in gs)
        raise LoweringError(f"{e.name} depends on the running maximum {names} other than through a "
                            f"factor exp(-max): the online rewrite does not apply (ratio {ratio})")
    return ratio


def _stage_predicate(c: Cascade, s: Stage):
    """The predicate guarding every carried reduction of the stage (for tile skipping)."""
    local = {e.name for e in s.einsums}
    guarded = [e for e in s.einsums if s.kind[e.name] in ("stream", "key_side") and e.where is not None]
    if not guarded:
        return None
    carried = [e for e in s.einsums if s.kind[e.name] == "carried"]
    common = None
    for cr in carried:
        anc = _local_ancestors(c, cr.name, local) | {cr.name}
        mine = {g.name for g in guarded if g.name in anc}
        if cr.where is not None:
            mine.add(cr.name)
        common = mine if common is None else common & mine
    if not common:
        return None
    from einsum_ir.ir import Binary
    pred = None
    for g in guarded:
        if g.name in common:
            pred = g.where if pred is None else Binary("and", pred, g.where)
    return pred
