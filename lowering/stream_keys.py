"""Strategy "stream keys under a query tile": the FlashAttention-shaped forward kernel.

The cascade is first rewritten: recurrences folded into reductions (lowering.recurrence),
division deferral (`O = O_num / SD`), normalized weights scaled per row against underflow
(lowering.underflow), then base-2 scores (lowering.base2).
Then:

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
   reader (prologue), and gets its class (lowering.plan.Stage). An epilogue that sums a grid
   rank is an atomic accumulation.
4. A carried `max` read inside the loop is **online**: each carried sum whose summand depends
   on it is rescaled by the factor lowering.online derives (`exp2(GM_old - GM_new)`), or the
   strategy declines with the reason.
5. The predicate that guards every carried reduction gives the key loop (lowering.keyranges):
   segments of full and masked tiles, or a block list. In masked tiles each *root* stream
   value (one that reads no other in-loop value) is guarded by its predicate and the key
   bound; lowering.absence decides whether absent points can simply hold a sentinel value.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from einsum_ir.errors import LoweringError, located
from einsum_ir.graph import CascadeGraph, cascade_graph
from einsum_ir.indirect import bound_indirect, indirect_reads, read_bounds
from einsum_ir.ir import (
    INT_DTYPES, Access, Binary, Call, Cascade, Einsum, Expr, Index, Name, chain, children, conjuncts, index_vars,
    product_terms, rank_of, rebuild,
)
from einsum_ir.functions import UNIONS
from einsum_ir.lowering.absence import place_sentinels
from einsum_ir.lowering.base2 import fold_log2e
from einsum_ir.lowering.bounds import magnitudes
from einsum_ir.lowering.exprs import tensors_read
from einsum_ir.lowering.groups import Grouping, groupings
from einsum_ir.lowering.keyranges import GridScope, classify, key_loop, masked_everywhere
from einsum_ir.lowering.online import carried_ratio, prepare
from einsum_ir.lowering.plan import Plan, PresenceGroup, Stage
from einsum_ir.lowering.underflow import scale_rows
from einsum_ir.lowering.unions import has_unions

NAME = "stream keys under a query tile"


@dataclass
class _Draft:
    """A stage while it is being planned (the frozen Stage is built at the end)."""

    stream: tuple[str, ...]
    query: tuple[str, ...]
    grid: tuple[str, ...]
    einsums: list[Einsum] = field(default_factory=list)


def lower(c: Cascade) -> Plan:
    """The plan, or LoweringError with the reason this strategy does not apply."""
    bounded = bound_indirect(c)  # an indirect read's absent points as predicates (einsum_ir.indirect)
    marks = ("indirect reads bounded",) if bounded is not c else ()
    c, rewrites, graph = prepare(bounded)
    rewrites = marks + rewrites
    summed = _sum_terms_where_read(c, graph)
    if summed is not c:
        rewrites = rewrites + ("sums of terms summed term by term",)
        c, graph = summed, cascade_graph(summed)
    scaled = scale_rows(c, graph)
    if scaled is not c:
        rewrites = rewrites + ("row scaling against underflow",)
        c, graph = scaled, cascade_graph(scaled)
    base2, graph = fold_log2e(c, graph)
    if base2 is not c:
        rewrites = rewrites + ("base-2 scores",)
        c = base2
    drafts = _find_stages(c, graph)
    owner = _assign(c, graph, drafts)
    # a score split that another stage's (stream, query) pair took every Einsum of launches nothing
    drafts = _order(graph, [d for d in drafts if d.einsums], owner)
    stages, intermediates = [], []
    for i, d in enumerate(drafts):
        stage = _stage(c, graph, i, d, owner)
        stages.append(stage)
        intermediates += [t for t in stage.stores if t not in c.output_names]
    return Plan(NAME, c, tuple(stages), tuple(intermediates), rewrites)


def _sum_terms_where_read(c: Cascade, graph: CascadeGraph) -> Cascade:
    """A map that is a sum of terms (a union's present value, `E1*V + E2*VP`), read only by a
    sum over some of its indices, as a factor at its own indices, is inlined there: the sum
    then takes each term as a contraction of its own (two products of 2-D tiles) instead of a
    map over all the indices of every term (three tile axes, p, m, f, which no kernel tile
    holds). Exact: the reader sums the points where both predicates hold and every factor,
    the map's terms included, is present, which are the points it summed before."""
    for x in c.einsums:
        if x.reduced or x.recurrence_var or x.name in c.output_names or len(product_terms(x.expr)) < 2:
            continue
        readers = graph.readers.get(x.name, ())
        if len(readers) != 1:
            continue
        (r,) = c.writers(readers[0])
        own = Access(x.name, x.target.indices)
        reads = [a for a in r.reads if a.tensor == x.name]
        if r.reduce != "sum" or reads != [own] or not set(r.reduced) & set(x.lhs_vars) or \
                not any(own in (f for _, f in factors) for _, factors in product_terms(r.expr)):
            continue
        where = x.where if r.where is None else r.where if x.where is None else Binary("and", r.where, x.where)
        inlined = replace(r, expr=rebuild(r.expr, lambda n: x.expr if n == own else None), where=where)
        einsums = tuple(inlined if e is r else e for e in c.einsums if e is not x)
        return _sum_terms_where_read(c.replace(einsums=einsums), cascade_graph(c.replace(einsums=einsums)))
    return c


# ---------------------------------------------------------------------------- stages


def _score_pairs(e: Einsum):
    """Each pair of reads that contracts like a score: (read A, read B, A's kept ranks, B's kept
    ranks, the contracted ranks), in any storage layout."""
    if e.reduce != "sum" or not e.reduced:
        return
    lhs = e.lhs_vars
    for _, factors in product_terms(e.expr, distribute=True):
        accs = [f for r, f in factors if isinstance(f, Access)]
        vsets = [set(index_vars(a)) for a in accs]
        for i in range(len(accs)):
            for j in range(len(accs)):
                if i == j:
                    continue
                a_only = [v for v in lhs if v in vsets[i] and v not in vsets[j]]
                b_only = [v for v in lhs if v in vsets[j] and v not in vsets[i]]
                shared = set(e.reduced) & vsets[i] & vsets[j]
                if a_only and b_only and shared:
                    yield accs[i], accs[j], a_only, b_only, shared


def _score_split(e: Einsum, inputs: frozenset[str] = frozenset()):
    """(side-A kept ranks, side-B kept ranks) for a score contraction, else None. The contracted
    rank is each operand's last (head-dim) index: what tells a score (Q[p,e]*K[m,e]) from a
    linear-attention state (K[m,e]*V[m,f]) or a weighted sum (A[p,m]*V[m,f]). An operand that
    is one of `inputs` may hold it anywhere (a key tensor stored K[b,h,e,m]: the kernels read
    every input by its strides)."""
    for a, b, a_only, b_only, shared in _score_pairs(e):
        if any(a.indices[-1] == Index(v) and (b.indices[-1] == Index(v) or b.tensor in inputs) for v in shared):
            return a_only, b_only
    return None


def _reduced_later(c: Cascade, graph: CascadeGraph, name: str) -> set[str]:
    out: set[str] = set()
    for d in graph.descendants[name]:
        for w in c.writers(d):
            out |= set(w.reduced)
    return out


def _keepers(c: Cascade, ranks: list[str]) -> int:
    """How many of the cascade's outputs keep one of `ranks` (a query side). Counted over all
    outputs, so every score contraction of one token-rank pair streams the same side."""
    return sum(1 for o in c.output_names if set(ranks) & set(c.einsum(o).lhs_vars))


def _find_stages(c: Cascade, graph: CascadeGraph) -> list[_Draft]:
    # scores in the head-dim-last layout; only a cascade with none reads its inputs in another
    # layout (where a weighted sum A[p,m]*V[m,f] would pass for a score beside a real one)
    splits = [(e, _score_split(e)) for e in c.einsums]
    if all(split is None for _, split in splits):
        inputs = frozenset(d.name for d in c.inputs)
        splits = [(e, _score_split(e, inputs)) for e in c.einsums]
    drafts: dict[tuple, _Draft] = {}
    for e, split in splits:
        if split is None:
            continue
        later = _reduced_later(c, graph, e.name)
        a, b = split
        sa, sb = [v for v in a if v in later], [v for v in b if v in later]
        if sb and not sa:
            stream, qside = sb, a
        elif sa and not sb:
            stream, qside = sa, b
        elif sa and sb and _keepers(c, a) != _keepers(c, b):
            # both sides reduced later: stream the side fewer outputs keep, so that fewest
            # outputs are summed across programs (a backward keeps the keys in dK and dV, the
            # queries in dQ: it streams the queries, and dQ is added up tile by tile)
            stream, qside = (sb, a) if _keepers(c, a) > _keepers(c, b) else (sa, b)
        elif sa and sb:  # otherwise the side its direct readers reduce
            direct = set()
            for r in graph.readers.get(e.name, ()):
                direct |= set(c.einsum(r).reduced)
            stream = [v for v in b if v in direct] or sb
            qside = a if stream == sb or set(stream) <= set(b) else b
        else:
            continue
        # every query-side rank the keys lack tiles the queries: GQA's R (or MQA's H) packs
        # the heads that share a key/value head into one tile, loading each K/V tile once
        grid = [v for v in e.lhs_vars if v not in stream and v not in qside]
        key = (tuple(stream), tuple(qside))
        drafts.setdefault(key, _Draft(tuple(stream), tuple(qside), tuple(grid)))
    if not drafts:
        raise LoweringError("no query-key score contraction (a sum of Q[p,e]*K[m,e]-like products "
                            "kept over two token ranks) to stream over; linear-attention states "
                            "are the chunked scan's, whose backward is a scan too")
    return list(drafts.values())


def _assign(c: Cascade, graph: CascadeGraph, drafts: list[_Draft]) -> dict[str, _Draft]:
    owner: dict[str, _Draft | None] = {}
    pending: list[Einsum] = []
    for e in graph.order:
        space = set(e.space)
        cands = [d for d in drafts if set(d.stream) <= space and set(d.query) & space]
        cands = cands or [d for d in drafts if set(d.stream) & space and set(d.stream) & set(e.reduced)]
        if cands:
            owner[e.name] = cands[0]
            continue
        # no stream rank: epilogue of the latest stage whose values it reads
        ups = [owner[t] for t in graph.ancestors[e.name] if owner.get(t) is not None]
        if ups:
            owner[e.name] = max(ups, key=drafts.index)
        else:
            owner[e.name] = None
            pending.append(e)
    for e in reversed(pending):  # prologue: the stage of the first reader
        readers = [owner[d] for d in graph.descendants[e.name] if owner.get(d) is not None]
        if not readers:  # feeds no stage: computed once per query tile of a stage it fits
            readers = [d for d in drafts if set(e.space) <= set(d.query) | set(d.grid) | _feature_vars(c, e, d)
                       and set(d.query) & set(e.lhs_vars)]
        if not readers:
            raise LoweringError(f"{e.name} reads no key-side value and feeds no stage")
        owner[e.name] = min(readers, key=drafts.index)
    for e in graph.order:
        owner[e.name].einsums.append(e)
    return owner  # type: ignore[return-value]


def _feature_vars(c: Cascade, e: Einsum, d: _Draft) -> set[str]:
    """The index variables of `e` that are neither token nor grid ranks of stage `d`."""
    return {v for v in e.space if v not in d.stream and v not in d.query and v not in d.grid}


def _order(graph: CascadeGraph, drafts: list[_Draft], owner: dict[str, _Draft]) -> list[_Draft]:
    """Stages in dependency order."""
    import networkx as nx

    sg = nx.DiGraph()
    sg.add_nodes_from(range(len(drafts)))
    for a, b in graph.graph.edges:
        if a in owner and b in owner and owner[a] is not owner[b]:
            i, j = drafts.index(owner[a]), drafts.index(owner[b])
            if not sg.has_edge(i, j):
                sg.add_edge(i, j, read=(a, b))  # the first read that orders the two stages
    if not nx.is_directed_acyclic_graph(sg):
        reads = [sg.edges[i, j]["read"] for i, j in nx.find_cycle(sg)]

        def loop(name: str) -> str:
            return "the loop over " + ",".join(owner[name].stream)

        chain = ", and ".join(f"{b} ({loop(b)}) reads {a} ({loop(a)})" for a, b in reads)
        first = graph.cascade.einsum(reads[0][1])
        raise LoweringError(located(first, (
            f"{first.name}: the key loops cannot be ordered: {chain}. One softmax over keys of "
            f"several ranks needs one loop per rank and a merge of their partial states, which is "
            f"not derived: stream the key sets as one rank (keys concatenated, each set selected by "
            f"a predicate on it, docs/spec.md \"Unions\"), or run it on the interpreter (backend "
            f"'reference', or 'auto')")))
    return [drafts[i] for i in nx.topological_sort(sg)]


# ---------------------------------------------------------------------------- one stage


IN_LOOP = ("stream", "key_side", "group", "carried", "tile_sum")
REDUCTIONS = ("carried", "tile_sum")  # what the key loop's skipped tiles must not reach


def _stage(c: Cascade, graph: CascadeGraph, index: int, d: _Draft, owner: dict[str, _Draft]) -> Stage:
    local = {e.name for e in d.einsums}
    grouped = {n: g for n, g in groupings(c).items() if n in local and g.key in d.stream}
    if len(set(grouped.values())) > 1:
        raise LoweringError(f"the key loop over {','.join(d.stream)} groups its keys in more than one way "
                            f"({', '.join(sorted({g.describe() for g in grouped.values()}))}); one key tile "
                            f"holds whole groups of one size: give the grouped reductions one group rank")
    kinds = _classify(c, graph, d, local, grouped)
    # unions left in the loop (grouped reductions keep them) are taken by each point's presence
    by_presence = bool(grouped) or has_unions(e.expr for e in d.einsums if kinds[e.name] in IN_LOOP)
    online = _online(c, d, kinds)
    in_loop = [e for e in d.einsums if kinds[e.name] in IN_LOOP]
    depends = {e.name: frozenset(graph.ancestors[e.name] & local) for e in d.einsums}
    per_point = {t for t, k in kinds.items() if k in ("stream", "key_side", "group")}
    grouped_sums = {t for t, k in kinds.items() if k == "group"}
    rescale = {e.name: carried_ratio(c, e, set(online), grouped_sums, per_point)
               for e in in_loop if kinds[e.name] == "carried"}
    stores, loads, tile_stores = [], [], []
    for e in d.einsums:
        readers = graph.readers.get(e.name, ())
        if e.name in c.output_names or any(owner[r] is not d for r in readers):
            if (kinds[e.name] == "stream" and e.name in c.output_names and not any(owner[r] is not d for r in readers)
                    and set(d.stream) | set(d.query) <= set(e.lhs_vars)):
                tile_stores.append(e.name)  # an output over queries and keys: each tile written once
                continue
            if kinds[e.name] == "tile_sum":
                continue  # added to its output inside the loop
            if kinds[e.name] in ("stream", "key_side"):
                raise LoweringError(f"{e.name} holds a value per key (rank {','.join(d.stream)}) that "
                                    f"is read after the key loop; storing it needs another pass")
            stores.append(e.name)
    for e in d.einsums:
        for t in tensors_read(e.expr) + tensors_read(e.where):
            if t not in local and t not in loads:
                loads.append(t)
    atomic = _atomic(d, kinds, tile_stores)
    tested = _read_bounds(c, d)
    predicate = _stage_predicate(d, kinds, depends, tested, by_presence)
    loop = key_loop(predicate, d.query, d.stream, c.dims, _scope(c, d))
    with_bounds = _stage_predicate(d, kinds, depends, by_presence=by_presence)
    if loop.block_list and predicate != with_bounds:
        # a block list is built anyway (a selection read through the table): it tests the bounds too
        predicate = with_bounds
        loop = key_loop(predicate, d.query, d.stream, c.dims, _scope(c, d))
    if loop.block_list and by_presence:
        # every tile is masked anyway: skip by the conjuncts that bound the keys, test the rest
        bounding = [a for a in conjuncts(predicate) if not key_loop(a, d.query, d.stream, c.dims, _scope(c, d)).block_list]
        predicate = _conjunction(bounding) if bounding else None
        loop = key_loop(predicate, d.query, d.stream, c.dims, _scope(c, d))
    undecided = _undecided_wheres(d, kinds, predicate) or by_presence
    if undecided and loop.block_list:
        raise LoweringError(f"{undecided[0].name}'s predicate is not shared by every carried reduction and the "
                            f"key loop's mask is built at run time; give the reductions one predicate")
    tile_checks, checked_loop = None, None
    if undecided and not by_presence and not loop.block_list and len(d.stream) == 1:
        # the bounds left to the masks decide nothing else: a tile full by the loop is full
        # wherever they hold, which one test of the tile's page ids says (an emitter's choice)
        checked = [b for b in tested if any(b in conjuncts(e.where) for e in d.einsums if kinds[e.name] in IN_LOOP)]
        if checked and not _undecided_wheres(d, kinds, _conjunction(list(conjuncts(predicate)) + checked)):
            tile_checks, checked_loop = _conjunction(checked), loop
    if undecided:
        loop = masked_everywhere(loop)
    guards = _guards(d, kinds, local)
    stored_guards = {t: tuple(g for g in guards if g in depends[t] | {t}) for t in tile_stores}
    for t in set(tile_stores) & atomic:
        e = next(e for e in d.einsums if e.name == t)
        if e.reduce != "sum" or any(set(index_vars(guards[g])) & set(e.reduced) for g in stored_guards[t]):
            raise LoweringError(f"{t} is written tile by tile and reduces {','.join(e.reduced)} across "
                                f"programs; that is done for sums whose presence does not depend on "
                                f"{','.join(e.reduced)}: reduce it after the cascade instead")
    carried = [e for e in in_loop if kinds[e.name] == "carried"]
    sums = {n: "carried" if k == "tile_sum" else k for n, k in kinds.items()}  # both take identities
    sentinels = None if by_presence else place_sentinels(in_loop, sums, list(guards), set(online), depends) if guards else {}
    self_masked = {}
    if sentinels is not None:  # reductions the sentinels do not reach mask themselves
        for e in (e for e in in_loop if kinds[e.name] in REDUCTIONS):
            parts = [e.where] if e.where is not None else []
            if not depends[e.name] & set(guards):
                parts.append(_key_bound(d))
            if parts:
                self_masked[e.name] = _conjunction(parts)
    maps = {e.name for e in in_loop if kinds[e.name] in ("stream", "key_side") and not e.reduced}
    maxima = {t: c.einsum(t).expr for t in online if isinstance(c.einsum(t).expr, Access)}
    return Stage(index, d.stream, d.query, d.grid, _features(d, grouped), tuple(d.einsums), kinds, tuple(online),
                 rescale, tuple(loads), tuple(stores), frozenset(atomic),
                 stored_guards, predicate, loop,
                 guards, sentinels, self_masked, _groups(carried, guards, depends, online, d, by_presence),
                 _last_use(in_loop), magnitudes(in_loop, maps, maxima), grouped, by_presence,
                 tile_checks, checked_loop)


def _classify(c: Cascade, graph: CascadeGraph, d: _Draft, local: set[str],
              grouped: dict[str, Grouping]) -> dict[str, str]:
    kinds: dict[str, str] = {}
    stream = set(d.stream)
    for e in d.einsums:
        space = set(e.space)
        if e.name in grouped:
            if set(e.lhs_vars) & set(d.grid) != set(d.grid) or not set(d.query) <= set(e.lhs_vars):
                raise LoweringError(located(e, f"{e.name} reduces the keys {grouped[e.name].describe()} in "
                                               f"groups but not per query row and program; keep the query "
                                               f"and batch ranks on its left side"))
            kinds[e.name] = "group"
        elif stream & set(e.reduced):
            if not stream <= set(e.reduced):
                raise LoweringError(f"{e.name} reduces only part of the key ranks {','.join(d.stream)}")
            if e.reduce not in ("sum", "max"):
                raise LoweringError(f"{e.name} is a {e.reduce} over the key rank; only sum and max "
                                    f"reductions stream")
            across = set(e.reduced) & (set(d.query) | set(d.grid))
            if across and (e.reduce != "sum" or not set(d.query) <= set(e.reduced) and set(d.query) & across):
                raise LoweringError(f"{e.name} reduces {sorted(across)} across programs with {e.reduce}; only "
                                    f"a sum over whole query ranks adds up atomically")
            kinds[e.name] = "carried"
        elif stream & space and set(d.query) <= set(e.reduced):
            # a value per key summed over the program's queries (a gradient dQ when the keys'
            # programs stream the queries): each program adds its share, tile by tile
            if e.reduce != "sum" or e.name not in c.output_names or graph.readers.get(e.name):
                raise LoweringError(f"{e.name} sums the query rank(s) {','.join(d.query)} inside the key loop; "
                                    f"that adds up across programs only for an output sum nothing else reads")
            kinds[e.name] = "tile_sum"
        elif stream & space:
            kinds[e.name] = "stream" if set(d.query) & space else "key_side"
        else:
            reads = graph.ancestors[e.name] & local
            after = any(kinds.get(t) in ("carried", "epilogue") for t in reads)
            kinds[e.name] = "epilogue" if after else "prologue"
            reduced_grid = set(e.reduced) & set(d.grid)
            if reduced_grid and not after:
                raise LoweringError(f"{e.name} reduces grid rank(s) {sorted(reduced_grid)} before the key loop")
            if reduced_grid and (e.reduce != "sum" or e.where is not None):
                raise LoweringError(f"{e.name} reduces grid rank(s) with {e.reduce}; only an unguarded "
                                    f"sum over heads/batch can accumulate atomically")
    return kinds


def _atomic(d: _Draft, kinds: dict[str, str], tile_stores: list[str]) -> set[str]:
    """Values summed across programs: an epilogue over a grid rank (MoH's sum over heads), a
    carried sum that also reduces a query or grid rank (a per-head scalar's gradient), a value
    written tile by tile that reduces a grid rank (a bias gradient broadcast over the batch)."""
    across = set(d.grid) | set(d.query)
    return {e.name for e in d.einsums if (kinds[e.name] == "epilogue" and set(e.reduced) & set(d.grid))
            or (kinds[e.name] == "carried" and set(e.reduced) & across)
            or (e.name in tile_stores and set(e.reduced) & set(d.grid))}


def _online(c: Cascade, d: _Draft, kinds: dict[str, str]) -> list[str]:
    """Carried values read inside the loop: only maxima, which become running maxima."""
    online: list[str] = []
    for e in d.einsums:
        if kinds[e.name] not in IN_LOOP:
            continue
        for t in tensors_read(e.expr) + tensors_read(e.where):
            if kinds.get(t) == "carried" and kinds[e.name] == "tile_sum":
                raise LoweringError(f"{e.name} is added to its output tile by tile but reads the running {t}")
            if kinds.get(t) == "carried":
                if c.einsum(t).reduce != "max":
                    raise LoweringError(f"{e.name} reads {t}, a full sum over {','.join(d.stream)}, inside "
                                        f"the key loop; that needs another pass (and the division could "
                                        f"not be deferred)")
                if t not in online:
                    online.append(t)
            elif kinds.get(t) == "epilogue":
                raise LoweringError(f"{e.name} reads {t} inside the key loop, but {t} is known only after it")
    return online


def _stage_predicate(d: _Draft, kinds, depends, unskipped: tuple[Expr, ...] = (),
                     by_presence: bool = False) -> Expr | None:
    """The predicate guarding every carried reduction of the stage (what tiles may be skipped
    by), less the atoms in `unskipped`, which the masks of every tile test instead. With values
    present point by point (`by_presence`), what every reduction's summand needs to be present."""
    guarded = [e for e in d.einsums if kinds[e.name] in IN_LOOP and e.where is not None]
    common: list[Expr] | None = None
    needs = _needed_atoms(d, kinds) if by_presence else None
    for cr in (e for e in d.einsums if kinds[e.name] in REDUCTIONS):  # by conjunct: `A and B` shares A with `A`
        if needs is not None:
            mine = list(needs[cr.name])
        else:
            mine = [a for g in guarded if g.name in depends[cr.name] | {cr.name} for a in conjuncts(g.where)]
        common = mine if common is None else [w for w in common if w in mine]
    common = [w for w in common or () if w not in unskipped]
    if not common:
        return None
    return _conjunction(list(dict.fromkeys(common)))


def _needed_atoms(d: _Draft, kinds) -> dict[str, tuple[Expr, ...]]:
    """Per in-loop Einsum, conjuncts that hold wherever its value is present: its own
    predicate's and those of every value it reads, but of a union form only those its operands
    share (present where any is), and none through a grouped reduction's read (present where
    some key of the group is). Computed in cascade order."""
    needs: dict[str, tuple[Expr, ...]] = {}

    def of(x: Expr) -> tuple[Expr, ...]:
        if isinstance(x, Access):
            return needs.get(x.tensor, ()) if kinds.get(x.tensor) != "group" else ()
        if isinstance(x, Call) and x.fn in UNIONS:
            shared = [of(a) for a in x.args]
            return tuple(a for a in shared[0] if all(a in other for other in shared[1:]))
        if isinstance(x, Call) and x.fn == "where":
            return tuple(dict.fromkeys(of(x.args[1]) + of(x.args[2])))
        parts: tuple[Expr, ...] = ()
        for child in children(x):
            parts += of(child)
        return tuple(dict.fromkeys(parts))

    for e in d.einsums:
        if kinds[e.name] in IN_LOOP:
            own = () if kinds[e.name] == "group" else tuple(conjuncts(e.where))
            needs[e.name] = tuple(dict.fromkeys(own + of(e.expr)))
    return needs


def _read_bounds(c: Cascade, d: _Draft) -> tuple[Expr, ...]:
    """The bounds of the stage's indirect reads that the key loop cannot state (a page id in
    range, `Tbl[b, m // T] >= 0`, einsum_ir.indirect): an id out of range is an edge case, not
    a pattern to skip tiles by, so they are left to the masks, and the loop keeps its bounds
    from the rest (`m < Len[b]`, and the table's extent `m // T < J`, an affine bound) with no
    block list of tiles to build per call (unless the rest needs one)."""
    scope = _scope(c, d)
    found = (b for e in d.einsums for a in indirect_reads(e.expr) + indirect_reads(e.where) for b in read_bounds(c, a))
    return tuple(dict.fromkeys(b for b in found
                               if any(a.kind == "opaque" for a in classify(b, d.query, d.stream, scope))))


def _scope(c: Cascade, d: _Draft) -> GridScope:
    """Per-program values of the stage's bounds: reads of integer inputs at its grid indices."""
    ints = frozenset(t.name for t in c.inputs if c.tensors[t.name].dtype in INT_DTYPES and c.tensors[t.name].dtype != "bool")
    names = frozenset(list(c.tensors) + list(c.dims) + [p.name for p in c.params])
    return GridScope(d.grid, ints, names)


def _undecided_wheres(d: _Draft, kinds, predicate: Expr | None) -> list[Einsum]:
    """In-loop Einsums whose predicate is not part of the skip predicate: a tile the loop calls
    full may still hold their absent points."""
    decided = set(conjuncts(predicate))
    return [e for e in d.einsums if kinds[e.name] in IN_LOOP and e.where is not None
            and not set(conjuncts(e.where)) <= decided]


def _conjunction(parts: list[Expr]) -> Expr:
    return chain("and", parts)


def _key_bound(d: _Draft) -> Expr:
    """Keys inside their ranks' extents (a ragged last tile reads past the end)."""
    return _conjunction([Binary("<", Index(k), Name(rank_of(k))) for k in d.stream])


def _guards(d: _Draft, kinds, local: set[str]) -> dict[str, Expr]:
    """What masked tiles test, per stream value: a root (reading no other in-loop value) is
    present within the key bounds and where its predicate holds; any other value with a
    predicate where that holds (it is absent where its operands are, too)."""
    guards = {}
    loop_values = {e.name for e in d.einsums if kinds[e.name] in ("stream", "key_side")}
    for e in d.einsums:
        if e.name not in loop_values:
            continue
        root = not (set(tensors_read(e.expr)) & loop_values)
        parts = ([e.where] if e.where is not None else []) + ([_key_bound(d)] if root else [])
        if parts:
            guards[e.name] = _conjunction(parts)
    return guards


def _groups(carried: list[Einsum], guards, depends, online, d: _Draft,
            by_presence: bool = False) -> tuple[PresenceGroup, ...]:
    """Carried reductions grouped by the guards their summands are subject to; only guards that
    a predicate (not just the key bound) holds matter for presence after the loop. With values
    present point by point (`by_presence`) each reduction is a group of its own, seen where its
    summand's presence holds: a union's operands do not intersect. A group's members share
    their query rows too (one counter per row: a per-head sum is not counted with a per-row one)."""
    by_key: dict[tuple[frozenset, tuple[str, ...]], list[Einsum]] = {}
    for e in carried:
        key = frozenset(g for g in guards if g in depends[e.name] and _has_where(d, g))
        if e.where is not None:
            key |= {e.name}
        if by_presence and key:
            key = frozenset({e.name})
        if key:
            by_key.setdefault((key, tuple(v for v in e.lhs_vars if v in d.query)), []).append(e)
    groups = []
    for (key, rows), members in by_key.items():
        maximum = next((e.name for e in members if e.reduce == "max"
                        and tuple(v for v in e.lhs_vars if v not in d.grid) == rows), None)
        counter = None if maximum else f"{members[0].name}_seen"
        groups.append(PresenceGroup(key, tuple(e.name for e in members), maximum, counter))
    return tuple(groups) if by_presence else _share_maxima(groups, d)


def _share_maxima(groups: list[PresenceGroup], d: _Draft) -> tuple[PresenceGroup, ...]:
    """A group that would count its presence joins a group under the same predicates (other
    guards, one condition: a union's maximum and its sums, each under `A or B`) whose running
    maximum covers its rows: the maximum's > -inf says the same and costs no counter."""
    def preds(g: PresenceGroup) -> frozenset:
        return frozenset(_where_of(d, n) for n in g.guards)

    def rows(name: str) -> set[str]:
        return {v for v in next(e for e in d.einsums if e.name == name).lhs_vars if v in d.query}

    out = list(groups)
    for g in groups:
        host = next((h for h in out if h is not g and h.maximum and g.counter and preds(h) == preds(g)
                     and all(rows(m) <= rows(h.maximum) for m in g.members)), None)
        if host is not None:
            out[out.index(host)] = PresenceGroup(host.guards | g.guards, host.members + g.members, host.maximum, None)
            out.remove(g)
    return tuple(out)


def _has_where(d: _Draft, name: str) -> bool:
    return _where_of(d, name) is not None


def _where_of(d: _Draft, name: str) -> Expr | None:
    return next(e for e in d.einsums if e.name == name).where


def _last_use(in_loop: list[Einsum]) -> dict[str, str]:
    """The last in-loop reader of each tensor. A plain copy `X = Y` may share Y's tile, so Y
    lives as long as X does."""
    position = {e.name: k for k, e in enumerate(in_loop)}
    last: dict[str, str] = {}
    for e in in_loop:
        for t in tensors_read(e.expr) + tensors_read(e.where):
            last[t] = e.name
    for e in reversed(in_loop):
        if isinstance(e.expr, Access) and not e.reduced and e.where is None and e.name in last:
            y = e.expr.tensor
            if y in last and position[last[e.name]] > position[last[y]]:
                last[y] = last[e.name]
    return last


def _features(d: _Draft, grouped: dict[str, Grouping]) -> tuple[str, ...]:
    groups = {g.var for g in grouped.values()}  # a group rank is a tile axis: the key tile's groups
    seen: dict[str, None] = {}
    for e in d.einsums:
        for v in e.space + index_vars(e.where):
            if v not in d.stream and v not in d.query and v not in d.grid and v not in groups:
                seen[v] = None
    return tuple(seen)
