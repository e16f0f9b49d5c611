"""Strategy "chunked scan": linear, decayed and gated attention in O(N) (DESIGN sections 5 and 6).

A sum over the keys of a product whose query and key sides are coupled by nothing but a decay
reassociates: `sum_m (q_p . k_m) g(p)/g(m) v_m` is `q_p . (sum_m g(p)/g(m) k_m^T v_m)`. The
strategy derives this from the cascade:

1. The token ranks are P (queries) and M (keys), DESIGN section 2's naming; the grid ranks are
   those every Einsum keeps (B, H); every other rank is a feature held whole (E, F).
2. Every Einsum that keeps both P and M (a score `S`, a decayed score `D`) must be a sum of a
   product read only as a factor of another product: it is inlined into its reader. A
   function of it, a division by it or a max over it couples the two sides, and the strategy
   declines, naming that Einsum.
3. What reduces M over a product of the two sides then splits into *terms*: query factors
   (P, no M), key factors (M, no P), and at most one coupling factor `c(p, m)`, which must be a
   decay, `c(p, m) c(m, j) = c(p, j)` (checked symbolically: `pow(l, p - m)`,
   `exp(G[p] - G[m])`). Its predicate is `m <= p` (causal) or none.
   - With no predicate and no decay the term is rewritten in the cascade: a state
     `Z_state = sum_m key factors` and `Z = sum query factors * Z_state` (one global state).
   - Causal terms stay terms of a *lockstep* sweep: chunk t of queries and chunk t of keys
     together, an intra-chunk quadratic part and an inter-chunk state recurrence (DESIGN
     section 5, with every decay ratio taken chunk-relative: `c(p, s)`, `c(s', m)`, `c(s', s)`).
4. What remains are maps over one token rank (feature maps, normalizations, the epilogue) and
   reductions over one token rank (states). The Einsums are scheduled into **sweeps**, each a
   loop over the chunks of one token rank: a reduction is ready one sweep after every reduction
   it reads, and maps are recomputed in each sweep that needs them. Non-causal linear attention
   is two sweeps (the keys' state, then the queries); Flowformer's conserved flows are more.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import sympy

from einsum_ir.cost_model.predicates import conjuncts
from einsum_ir.errors import LoweringError
from einsum_ir.graph import cascade_graph
from einsum_ir.ir import (
    Access, Binary, Cascade, Einsum, Expr, Index, Num, Unary, index_vars, product_terms, substitute, walk,
)
from einsum_ir.lowering.exprs import product, summation, to_sympy
from einsum_ir.lowering.grad import FreshNames
from einsum_ir.lowering.plan import Declined
from einsum_ir.printer import print_expr

NAME = "chunked scan"
QUERY, KEY = "p", "m"
TOKENS = (QUERY, KEY)


@dataclass(frozen=True)
class Term:
    """One term of a causal contraction: `sign * sum_{m <= p} query * key_e * key_f * decay`,
    summed over the features the query and key sides share (`contracted`)."""

    einsum: str  # the Einsum it adds into (its value per query position)
    sign: float
    query: Expr  # indices: grid, p, contracted features
    key_e: Expr  # indices: grid, m, contracted features (the side the query is dotted with)
    key_f: Expr | None  # indices: grid, m, the output's kept features (None: none kept)
    decay: Expr | None  # c(p, m) = g(p)/g(m), or None
    contracted: tuple[str, ...]
    kept: tuple[str, ...]

    def describe(self) -> str:
        sign = "-" if self.sign < 0 else ""
        parts = [f"({print_expr(self.query)})", f"({print_expr(self.key_e)})"]
        if self.key_f is not None:
            parts.append(f"({print_expr(self.key_f)})")
        decay = f" decay {print_expr(self.decay)}" if self.decay is not None else ""
        return (f"{self.einsum} += {sign}sum[m <= p] {' * '.join(parts)}; state over "
                f"{','.join(self.contracted + self.kept) or '-'}{decay}")


@dataclass(frozen=True)
class Sweep:
    """One loop over the chunks of a token rank, one program per grid point. `lockstep`: the
    query chunk and the key chunk move together (causal terms). Per chunk the sweep evaluates
    `maps` (in order), adds the chunk's share into `reductions` and computes `terms`; `stores`
    are the per-token tensors it writes, `states` the reductions it writes at the end."""

    index: int
    token: str  # "p" or "m"; lockstep sweeps run over p with m the same positions
    lockstep: bool
    prologue: tuple[Einsum, ...]  # Einsums over no token rank, before the loop (read states)
    maps: tuple[Einsum, ...]
    reductions: tuple[Einsum, ...]
    terms: tuple[Term, ...]
    stores: tuple[str, ...]
    states: tuple[str, ...]
    loads: tuple[str, ...]  # tensors read from memory: inputs and earlier sweeps' states

    def summary(self) -> str:
        kind = "lockstep p=m (causal scan)" if self.lockstep else f"over {self.token}"
        lines = [f"sweep {self.index}: {kind} | loads {','.join(self.loads)}"]
        lines += [f"  prologue  {e.name}" for e in self.prologue]
        lines += [f"  map       {e.name}" for e in self.maps if e.name not in {t.einsum for t in self.terms}]
        lines += [f"  reduce    {e.name} ({e.reduce} over {self.token}: a state)" for e in self.reductions]
        lines += [f"  term      {t.describe()}" for t in self.terms]
        lines.append(f"  writes {','.join(self.stores + self.states) or '-'}")
        return "\n".join(lines)


@dataclass(frozen=True)
class ScanPlan:
    """A chunked-scan plan: the cascade as lowered (non-causal contractions reassociated) and
    its sweeps. `grid` and `features` are index variables; the chunk size is chosen per shape
    (`chunk_size`)."""

    strategy: str
    cascade: Cascade
    sweeps: tuple[Sweep, ...]
    grid: tuple[str, ...]
    features: tuple[str, ...]
    intermediates: tuple[str, ...]  # states and per-token tensors passed between sweeps (fp32)
    rewrites: tuple[str, ...] = ()
    declined: tuple[Declined, ...] = field(default=())

    @property
    def causal(self) -> bool:
        return any(s.lockstep for s in self.sweeps)

    def summary(self) -> str:
        head = [f"strategy: {self.strategy}"]
        head += [f"  declined: {d.strategy}: {d.reason}" for d in self.declined]
        if self.rewrites:
            head.append(f"rewrites: {', '.join(self.rewrites)}")
        head.append(f"grid {','.join(self.grid) or '-'} | features {','.join(self.features) or '-'} | "
                    f"chunks of C positions (chosen per shape)")
        return "\n".join(head + [s.summary() for s in self.sweeps])


def chunk_size(extents: dict, device: str = "cpu") -> int:
    """Positions per chunk: the intra-chunk part costs C per token, the state update E*F per
    chunk, so C grows with the feature sizes; a GPU wants a tensor-core tile (64), a CPU fewer,
    larger matrix products. Never more than the sequence needs."""
    n = max(int(extents.get("P", 1)), int(extents.get("M", 1)), 1)
    want = 64 if device != "cpu" else 128
    c = 16
    while c < want and c < n:
        c *= 2
    return c


# ---------------------------------------------------------------------------- analysis


def lower(c: Cascade) -> ScanPlan:
    """The plan, or LoweringError with the reason this strategy does not apply."""
    if c.inits or any(e.recurrence_var for e in c.einsums):
        raise LoweringError("recurrences (iterative tensors) are streamed by the key loop, not scanned")
    if c.splits:
        raise LoweringError("split ranks are tiled by the key loop; the scan chooses its own chunks")
    if not {"P", "M"} <= set(c.dims):
        raise LoweringError("the scan sweeps the query rank P and the key rank M; this cascade lacks one")
    grid = _grid(c)
    rewrites: list[str] = []
    coupled = {e.name for e in c.einsums if set(TOKENS) <= set(e.lhs_vars)}
    for name in coupled:
        if name in c.output_names:
            raise LoweringError(f"{name} is an output over both P and M: the P x M matrix itself, which a scan "
                                f"never forms")
    terms: dict[str, list[Term]] = {}
    einsums: list[Einsum] = []
    for e in c.einsums:
        if e.name in coupled:  # kept in the cascade as written; the scan never forms them
            einsums.append(e)
            continue
        if not set(TOKENS) <= set(e.space):
            _check_single(e, coupled, c)
            einsums.append(e)
            continue
        if KEY not in e.reduced or QUERY not in e.lhs_vars:
            raise LoweringError(f"{e.name} reduces the query rank P against the keys; the scan streams the "
                                f"keys into a state (a reverse scan is not derived yet)")
        found, causal = _terms(c, e, coupled, grid)
        if causal:
            terms[e.name] = found
            einsums.append(e)
        else:
            einsums += _reassociate(c, e, found)
            rewrites.append(f"reassociation of {e.name}: (Q.K^T).V -> Q.(K^T.V)")
    if not coupled:
        _streamed_elsewhere(c)
    lowered = c.replace(einsums=tuple(einsums))
    swept = [e for e in einsums if e.name not in coupled]
    bad = [e for e in swept if set(e.reduced) & set(TOKENS) and e.reduce not in ("sum", "max", "min")]
    if bad:
        raise LoweringError(f"{bad[0].name} reduces a token rank with {bad[0].reduce}; a scan carries sums, "
                            f"maxima and minima")
    if not terms and not any(KEY in e.reduced for e in swept):
        raise LoweringError("nothing is summed over the keys")
    used = [v for e in swept for v in e.space] + [v for ts in terms.values() for t in ts for v in t.contracted + t.kept]
    rank_order = {d.lower(): i for i, d in enumerate(c.dims)}
    features = tuple(sorted((v for v in dict.fromkeys(used) if v not in TOKENS and v not in grid),
                            key=lambda v: rank_order.get(v, len(rank_order))))
    sweeps = _schedule(lowered, terms, coupled)
    intermediates = tuple(dict.fromkeys(t for s in sweeps for t in s.stores + s.states
                                        if t not in lowered.output_names))
    return ScanPlan(NAME, lowered, sweeps, grid, features, intermediates, tuple(rewrites))


def _streamed_elsewhere(c: Cascade) -> None:
    """Decline a cascade with no product over both token ranks that a key loop streams: the
    scan would only add sweeps (agent attention's agent tokens are a key loop's queries). It
    takes what no key loop can: linear attention written with its states, Flowformer."""
    from einsum_ir.lowering.strategy import key_loop_plan  # the strategy table imports this module

    try:
        key_loop_plan(c)
    except LoweringError:
        return
    raise LoweringError("no product over both P and M to reassociate; the key loop streams it")


def _grid(c: Cascade) -> tuple[str, ...]:
    """One program per value of these: the first output's indices that no Einsum reduces and
    that both a query-side and a key-side input carry (B, H; not V's F, which the state holds)."""
    reduced = {v for e in c.einsums for v in e.reduced}
    sides = [set(d.indices) for d in c.inputs]
    both = {v for s in sides if QUERY in s for v in s} & {v for s in sides if KEY in s for v in s}
    out = c.einsum(c.output_names[0]).lhs_vars
    return tuple(v for v in out if v not in TOKENS and v not in reduced and v in both)


def _check_single(e: Einsum, coupled: set[str], c: Cascade) -> None:
    """An Einsum over one token rank: plain index variables in its reads, and no read of a
    tensor over both tokens (that tensor only exists inside a term)."""
    for a in (n for n in walk(e.expr) if isinstance(n, Access)):
        if a.tensor in coupled:
            raise LoweringError(f"{e.name} reads {a.tensor}, which is over both P and M, outside a product "
                                f"summed over the keys: the scan has no P x M matrix to read")
    _plain_reads(e.expr, e.name)
    if e.where is not None:
        raise LoweringError(f"{e.name} has a predicate over one token rank; the scan's only mask is m <= p")


def _plain_reads(expr: Expr, name: str) -> None:
    """Every tensor read at plain index variables: a chunk is a slice of each token rank."""
    for a in (n for n in walk(expr) if isinstance(n, Access)):
        if not all(isinstance(i, Index) for i in a.indices):
            raise LoweringError(f"{name} reads {a.tensor} at an index expression; the scan reads tensors at "
                                f"plain index variables")


def _terms(c: Cascade, e: Einsum, coupled: set[str], grid: tuple[str, ...]) -> tuple[list[Term], bool]:
    """The terms of an Einsum that sums a product of both sides over the keys, and whether they
    are causal. Declines, naming the Einsum, when something couples the two sides."""
    if e.reduce != "sum":
        raise LoweringError(f"{e.name} takes a {e.reduce} over the keys of a product of both sides; only a sum "
                            f"reassociates")
    expanded = _expand(c, e.expr, e.where, coupled, e.name, set(e.space))
    kept = tuple(v for v in e.lhs_vars if v not in grid and v != QUERY)
    causal_flags = set()
    out = []
    for sign, factors, where in expanded:
        causal_flags.add(_causal(where, e.name))
        q, k, decay = [], [], []
        for recip, f in factors:
            vs = set(index_vars(f))
            _plain_reads(f, e.name)
            if {QUERY, KEY} <= vs:
                if recip:
                    raise LoweringError(f"{e.name} divides by {print_expr(f)}, which couples P and M")
                decay.append(f)
            elif KEY in vs:
                k.append((recip, f))
            else:
                q.append((recip, f))
        d = product([(False, f) for f in decay]) if decay else None
        if d is not None:
            _check_decay(d, e.name)
        contracted = tuple(v for v in dict.fromkeys(v for _, f in k for v in index_vars(f))
                           if v not in grid and v != KEY and v not in kept)
        key_f = [(r, f) for r, f in k if set(index_vars(f)) & set(kept)]
        key_e = [(r, f) for r, f in k if (r, f) not in key_f]
        if any(set(index_vars(f)) & set(kept) and set(index_vars(f)) & set(contracted) for _, f in key_f):
            raise LoweringError(f"{e.name}: a key factor reads both a contracted feature and a kept one; split it "
                                f"into a product of two")
        stray = {v for _, f in q for v in index_vars(f)} - set(grid) - {QUERY} - set(contracted)
        if stray:
            raise LoweringError(f"{e.name}: the query side reads {', '.join(sorted(stray))}, which the key side "
                                f"does not; the scan's state is over the key side's features")
        if len(contracted) > 1 or len(kept) > 1:
            raise LoweringError(f"{e.name} contracts {len(contracted)} and keeps {len(kept)} feature ranks; the "
                                f"scan's state is one matrix (one rank each)")
        out.append(Term(e.name, sign, product(q) if q else Num(1), product(key_e) if key_e else Num(1),
                        product(key_f) if key_f else None, d, contracted, kept))
    if len(causal_flags) != 1:
        raise LoweringError(f"{e.name} mixes causal and unmasked terms")
    causal = causal_flags.pop()
    if not causal and any(t.decay is not None for t in out):
        raise LoweringError(f"{e.name} decays without m <= p: g(p)/g(m) grows without bound for m > p")
    return out, causal


def _expand(c: Cascade, expr: Expr, where: Expr | None, coupled: set[str], owner: str,
            used: set[str]) -> list[tuple[float, list[tuple[bool, Expr]], Expr | None]]:
    """`expr` as signed products, with every factor that reads an Einsum over both tokens
    replaced by that Einsum's own products (its reduced indices renamed apart from `used`):
    linear in it, so exact. Predicates join with `and`."""
    out = []
    for sign, factors in product_terms(expr, distribute=True):
        partial = [(sign, [], where)]
        taken = set(used)  # per term: the terms of a sum may reuse one name
        for recip, f in factors:
            inside = [a.tensor for a in walk(f) if isinstance(a, Access) and a.tensor in coupled]
            if inside and not (isinstance(f, Access) and not recip):
                raise LoweringError(f"{owner}: {'1/' if recip else ''}{print_expr(f)} is a nonlinear function of "
                                    f"{inside[0]}, which couples the query and key sides; only products of a "
                                    f"query part, a key part and a decay reassociate")
            if isinstance(f, Access) and f.tensor in coupled:
                inner = c.einsum(f.tensor)
                if inner.reduce != "sum":
                    raise LoweringError(f"{owner}: {inner.name} takes a {inner.reduce} over both sides; only sums "
                                        f"of products reassociate")
                sub = _instance(inner, f, taken, owner)
                pieces = _expand(c, sub.expr, sub.where, coupled, inner.name, taken)
                partial = [(s0 * s1, f0 + f1, _and(w0, w1)) for s0, f0, w0 in partial for s1, f1, w1 in pieces]
            else:
                partial = [(s, fs + [(recip, f)], w) for s, fs, w in partial]
        out += partial
    return out


def _instance(e: Einsum, read: Access, used: set[str], reader: str) -> Einsum:
    """`e` as read by `read` (its left indices renamed to the read's). Its reduced indices keep
    their names, so their ranks stay known; one the reader already uses is refused."""
    _plain_reads(read, reader)
    mapping: dict[str, Expr] = {v: i for v, i in zip(e.lhs_vars, read.indices)}
    for v in e.reduced:
        if v in used:
            raise LoweringError(f"{reader} sums over {v} and reads {e.name}, which sums over {v} too; inlined "
                                f"into {reader}, the two would be one index: rename one of them")
        used.add(v)
    expr = substitute(e.expr, mapping)
    where = substitute(e.where, mapping) if e.where is not None else None
    return replace(e, expr=expr, where=where)


def _and(a: Expr | None, b: Expr | None) -> Expr | None:
    return b if a is None else a if b is None else Binary("and", a, b)


def _causal(where: Expr | None, name: str) -> bool:
    """True for `m <= p` (or `p >= m`), False for no predicate; decline any other mask."""
    clauses = set(conjuncts(where))
    causal = {Binary("<=", Index(KEY), Index(QUERY)), Binary(">=", Index(QUERY), Index(KEY))}
    if not clauses:
        return False
    strip = {Binary(cl.op, Index(cl.lhs.name), Index(cl.rhs.name)) for cl in clauses
             if isinstance(cl, Binary) and isinstance(cl.lhs, Index) and isinstance(cl.rhs, Index)}
    if len(strip) == len(clauses) and strip <= causal:
        return True
    raise LoweringError(f"{name} is masked by {print_expr(where)}; the chunked scan sums a prefix, m <= p, or "
                        f"every key (a window or a block mask is streamed under a query tile)")


def _check_decay(d: Expr, name: str) -> None:
    """`c(p, m) c(m, j) = c(p, j)`: the coupling is g(p)/g(m), so each chunk's ratios can be
    taken against the chunk's first position. Tensor reads are functions of their indices."""
    def sym(expr: Expr, p: str, m: str) -> sympy.Expr:
        swapped = substitute(expr, {QUERY: Index(p), KEY: Index(m)})
        return to_sympy(swapped, lambda a: sympy.Function("T_" + a.tensor)(
            *[to_sympy(i, lambda _: sympy.Integer(0)) for i in a.indices]))

    ratio = sym(d, "x", "y") * sym(d, "y", "z") / sym(d, "x", "z")
    if sympy.simplify(sympy.powsimp(sympy.expand_power_exp(ratio), force=True)) != 1:
        raise LoweringError(f"{name}: the factor {print_expr(d)} couples the query and key positions but is not "
                            f"a decay g(p)/g(m) (c(p,m)*c(m,j) != c(p,j)); only decays reassociate")


def _reassociate(c: Cascade, e: Einsum, terms: list[Term]) -> list[Einsum]:
    """A non-causal contraction as a state over the keys and a product with the queries:
    `Z = sum_m q*k_e*k_f` -> `Z_state[grid, e, f] = sum_m k_e*k_f`, `Z = sum_e q * Z_state`."""
    fresh = FreshNames(list(c.tensors) + list(c.dims) + [p.name for p in c.params])
    out: list[Einsum] = []
    pieces = []
    grid = [v for v in e.lhs_vars if v != QUERY and v not in terms[0].kept]
    for i, t in enumerate(terms):
        state = fresh(f"{e.name}_state" + (str(i + 1) if len(terms) > 1 else ""))
        idx = tuple(Index(v) for v in grid + list(t.contracted) + list(t.kept))
        key = t.key_e if t.key_f is None else Binary("*", t.key_e, t.key_f)
        out.append(Einsum(Access(state, idx), key, loc=e.loc))
        read = Binary("*", t.query, Access(state, idx))
        pieces.append(read if t.sign > 0 else Unary("-", read))
    out.append(replace(e, expr=summation(pieces), where=None))
    return out


# ---------------------------------------------------------------------------- sweeps


def _token_of(e: Einsum) -> str | None:
    vs = set(e.space)
    return QUERY if QUERY in vs else KEY if KEY in vs else None


def _schedule(c: Cascade, terms: dict[str, list[Term]], coupled: set[str]) -> tuple[Sweep, ...]:
    """Sweeps in order. A reduction over a token is ready in the sweep after the last sweep
    that writes a reduction it reads; maps are recomputed wherever they are needed; a term and
    everything reading its value run in the one lockstep sweep."""
    graph = cascade_graph(c)
    by_name = {e.name: e for e in c.einsums if e.name not in coupled}
    reductions = {e.name for e in c.einsums if set(e.reduced) & set(TOKENS)} - set(terms)
    level: dict[str, int] = {}

    def ready(name: str) -> int:
        """The first sweep in which `name`'s value is available per chunk."""
        if name in level:
            return level[name]
        if name not in by_name:
            level[name] = 0
            return 0
        deps = [a for a in _sources(by_name[name], terms, graph) if a in by_name]
        lv = max([ready(d) + (1 if d in reductions else 0) for d in deps], default=0)
        level[name] = lv
        return lv

    for e in by_name.values():
        ready(e.name)
    lock = max((level[t] for t in terms), default=None)
    if lock is not None:
        for t in terms:
            level[t] = lock
        for e in by_name.values():  # readers of a term's value run where the term runs
            if graph.ancestors.get(e.name, frozenset()) & set(terms) and e.name not in terms:
                if e.name in reductions:
                    raise LoweringError(f"{e.name} reduces a token rank over a causal scan's result; store it "
                                        f"and reduce in a second cascade")
                level[e.name] = max(level[e.name], lock)
    roots: dict[tuple[int, str], list[str]] = {}
    for e in by_name.values():
        tok = _token_of(e)
        if e.name in reductions:
            where = KEY if KEY in e.reduced else QUERY
        elif e.name in terms or (lock is not None and graph.ancestors[e.name] & set(terms)):
            where = "lock"
        elif e.name in c.output_names and tok is not None:
            where = tok
        elif e.name in c.output_names:
            raise LoweringError(f"{e.name} is an output over no token rank; the scan writes per-token outputs "
                                f"and keeps states inside")
        else:
            continue  # a map: evaluated in every sweep that needs it
        roots.setdefault((level[e.name], where), []).append(e.name)
    sweeps = []
    for (lv, kind) in sorted(roots, key=lambda k: (k[0], k[1] != "m")):
        names = roots[(lv, kind)]
        sweeps.append(_sweep(c, graph, len(sweeps), kind, names, terms, reductions, by_name))
    return tuple(sweeps)


def _sources(e: Einsum, terms: dict[str, list[Term]], graph) -> list[str]:
    """The tensors an Einsum's value needs per chunk: a term's are its factors' reads (the
    Einsums over both tokens it reads are inlined into them)."""
    if e.name not in terms:
        return list(graph.graph.predecessors(e.name))
    parts = [x for t in terms[e.name] for x in (t.query, t.key_e, t.key_f, t.decay) if x is not None]
    return list(dict.fromkeys(a.tensor for x in parts for a in walk(x) if isinstance(a, Access)))


def _sweep(c, graph, index: int, kind: str, roots: list[str], terms, reductions, by_name) -> Sweep:
    """The Einsums one sweep evaluates: its roots and, per chunk, the maps they need."""
    lockstep = kind == "lock"
    token = QUERY if lockstep else kind
    tokens = set(TOKENS) if lockstep else {token}
    needed: dict[str, None] = {}
    loads: dict[str, None] = {}

    def visit(name: str) -> None:
        if name in needed:
            return
        if name not in by_name:
            loads[name] = None
            return
        e = by_name[name]
        if name not in roots and name in reductions:
            loads[name] = None  # an earlier sweep's state
            return
        for src in _sources(e, terms, graph):
            visit(src)
        needed[name] = None

    for r in roots:
        visit(r)
    order = [e for e in graph.order if e.name in needed]
    prologue = tuple(e for e in order if _token_of(e) is None)
    for e in order:
        tok = _token_of(e)
        if tok is not None and tok not in tokens:
            raise LoweringError(f"{e.name} is over {tok} but sweep {index} runs over {token}; a map over the "
                                f"other token rank cannot join it")
    body = [e for e in order if _token_of(e) is not None]
    reds = tuple(e for e in body if e.name in reductions and e.name in roots)
    maps = tuple(e for e in body if e not in reds)
    stores = tuple(n for n in roots if n in c.output_names)
    states = tuple(e.name for e in reds)
    return Sweep(index, token, lockstep, prologue, maps, reds,
                 tuple(t for e in maps if e.name in terms for t in terms[e.name]), stores, states, tuple(loads))
