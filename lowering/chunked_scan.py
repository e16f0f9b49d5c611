"""Strategy "chunked scan": linear, decayed and gated attention in O(N) (DESIGN sections 5 and 6).

A sum over the keys of a product whose query and key sides are coupled by nothing but a decay
reassociates: `sum_m (q_p . k_m) g(p)/g(m) v_m` is `q_p . (sum_m g(p)/g(m) k_m^T v_m)`. The
strategy derives this from the cascade:

1. The token ranks are P (queries) and M (keys), DESIGN section 2's naming; the grid ranks are
   those every per-token output keeps (B, H); every other rank is a feature held whole (E, F).
   Sums the sweeps cannot carry as written are split first, exactly: a sum over both token
   ranks (a decay's gradient) into a sum per query and one over the queries; a state summed
   over grid points into one per program and an *epilogue* across programs; a per-position
   value summed over a grid rank is kept per grid point when its readers sum it linearly.
2. Every Einsum that keeps both P and M (a score `S`, a decayed score `D`) must be a sum of a
   product read only as a factor of another product: it is inlined into its reader. A
   function of it, a division by it or a max over it couples the two sides, and the strategy
   declines, naming that Einsum.
3. What reduces M over a product of the two sides then splits into *terms*: query factors
   (P, no M), key factors (M, no P), and at most one coupling factor `c(p, m)`, which must be a
   decay, `c(p, m) c(m, j) = c(p, j)` (checked symbolically: `pow(l, p - m)`,
   `exp(G[p] - G[m])`; a constant beside it, `pow(l, p - m - 1)`, becomes a factor). Its
   predicate is `m <= p` (causal) or none, and may select positions of the summed rank by their
   own index (a partial state's key range), which the summed side's factors read as a select. What reduces P against the keys (the backward's dK,
   dV) is a *reverse* term, its own rank M, summed over the queries p >= m.
   - With no predicate and no decay the term is rewritten in the cascade: a state
     `Z_state = sum_m key factors` and `Z = sum query factors * Z_state` (one global state).
   - Causal terms stay terms of a *lockstep* sweep: chunk t of queries and chunk t of keys
     together, an intra-chunk quadratic part and an inter-chunk state recurrence (DESIGN
     section 5, with every decay ratio taken chunk-relative: `c(p, s)`, `c(s', m)`, `c(s', s)`);
     reverse terms in a lockstep sweep of their own that runs from the last chunk back.
4. What remains are maps over one token rank (feature maps, normalizations, the epilogue) and
   reductions over one token rank (states). The Einsums are scheduled into **sweeps**, each a
   loop over the chunks of one token rank: a reduction is ready one sweep after every reduction
   it reads, a term's value in its own sweep (and, stored, in later ones), and maps are
   recomputed in each sweep that needs them. Non-causal linear attention is two sweeps (the
   keys' state, then the queries); Flowformer's conserved flows are more.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import sympy

from einsum_ir.errors import LoweringError, located
from einsum_ir.graph import cascade_graph
from einsum_ir.ir import (
    Access, Binary, Call, Cascade, Einsum, Expr, Index, Num, Unary, chain, conjuncts, index_vars, product_terms, rank_of,
    rebuild, substitute, walk,
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
    """One term of a causal contraction, `sign * sum own * other_e * other_f * decay` over the
    positions of the other token rank on the causal side (`m <= p`), and over the features the
    two sides share (`contracted`). `own` is the token rank of the result: "p" for a sum over
    the keys m <= p (the forward's scan), "m" for a sum over the queries p >= m (a reverse scan,
    as the backward's dK and dV are)."""

    einsum: str  # the Einsum it adds into (its value per position of `own`)
    sign: float
    query: Expr  # the result's side: indices grid, own, contracted features
    key_e: Expr  # the summed side, dotted with `query`: indices grid, other, contracted features
    key_f: Expr | None  # the summed side: indices grid, other, the result's kept features (None: none)
    decay: Expr | None  # c(p, m) = g(p)/g(m), or None
    contracted: tuple[str, ...]
    kept: tuple[str, ...]
    own: str = QUERY
    mask: Expr | None = None

    @property
    def summed_e(self) -> Expr:
        return _masked(self.key_e, self.mask)

    @property
    def summed_f(self) -> Expr | None:
        return _masked(self.key_f, self.mask)

    @property
    def other(self) -> str:
        return KEY if self.own == QUERY else QUERY

    def describe(self) -> str:
        sign = "-" if self.sign < 0 else ""
        parts = [f"({print_expr(self.query)})", f"({print_expr(self.key_e)})"]
        if self.key_f is not None:
            parts.append(f"({print_expr(self.key_f)})")
        decay = f" decay {print_expr(self.decay)}" if self.decay is not None else ""
        over = "m <= p" if self.own == QUERY else "p >= m"
        if self.mask is not None:
            over += f" and {print_expr(self.mask)}"
        return (f"{self.einsum} += {sign}sum[{over}] {' * '.join(parts)}; state over "
                f"{','.join(self.contracted + self.kept) or '-'}{decay}")


@dataclass(frozen=True)
class Sweep:
    """One loop over the chunks of a token rank, one program per grid point. `lockstep`: the
    query chunk and the key chunk move together (causal terms). Per chunk the sweep evaluates
    `maps` (in order), adds the chunk's share into `reductions` and computes `terms`; `stores`
    are the per-token tensors it writes, `states` the reductions it writes at the end."""

    index: int
    token: str  # "p" or "m"; a lockstep sweep's is its terms' own rank, with the other at the same positions
    lockstep: bool
    prologue: tuple[Einsum, ...]  # Einsums over no token rank, before the loop (read states)
    maps: tuple[Einsum, ...]
    reductions: tuple[Einsum, ...]
    terms: tuple[Term, ...]
    stores: tuple[str, ...]
    states: tuple[str, ...]
    loads: tuple[str, ...]  # tensors read from memory: inputs and earlier sweeps' states

    @property
    def reverse(self) -> bool:
        """A lockstep sweep of sums over the queries p >= m: it runs from the last chunk back."""
        return self.lockstep and self.token == KEY

    def summary(self) -> str:
        kind = ("lockstep p=m (reverse causal scan, last chunk first)" if self.reverse else
                "lockstep p=m (causal scan)") if self.lockstep else f"over {self.token}"
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
    epilogue: Cascade | None = None  # outputs over no token rank, summed from states across programs
    # the same sweeps with each lockstep sweep split into groups that read nothing of one
    # another: one state per kernel, fewer registers, more programs (the Triton emitter's)
    split_sweeps: tuple[Sweep, ...] = ()
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
        tail = [] if self.epilogue is None else [
            f"epilogue: {', '.join(self.epilogue.output_names)} from {', '.join(self.epilogue.input_names)} "
            f"(over no token rank)"]
        return "\n".join(head + [s.summary() for s in self.sweeps] + tail)


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
    c, rewrites = _sum_across_programs_later(c, grid)
    _check_across(c, grid)
    c, split = _split_sums(c, grid)
    rewrites += split
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
            e = _single(c, e, coupled, grid)
            einsums += _pairwise(c, e, grid)
            continue
        own = QUERY if QUERY in e.lhs_vars else KEY
        found, causal = _terms(c, e, coupled, grid, own)
        if found[0].mask is not None:
            _absent_is_zero(c, e, found[0].mask)
        if any(len(t.contracted) > 1 for t in found):
            scanned, after = _hoist(c, e, coupled, found, causal)
            rewrites.append(f"{e.name}: the sum over the {'keys' if own == QUERY else 'queries'} keeps "
                            f"{scanned[0].target.indices[-1].name} ({scanned[0].name}), contracted after")
            for inner in scanned:
                found, causal = _terms(c, inner, coupled, grid, own)
                einsums += [inner] if causal else _reassociate(c, inner, found)
                terms.update({inner.name: found} if causal else {})
            einsums += after
            continue
        if causal:
            terms[e.name] = found
            einsums.append(e)
        else:
            einsums += _reassociate(c, e, found)
            rewrites.append(f"reassociation of {e.name}: " + ("(Q.K^T).V -> Q.(K^T.V)" if own == QUERY else
                                                               "(K.Q^T).dO -> K.(Q^T.dO)"))
    if not coupled:
        _streamed_elsewhere(c)
    lowered = c.replace(einsums=tuple(einsums))
    swept = [e for e in einsums if e.name not in coupled]
    bad = [e for e in swept if set(e.reduced) & set(TOKENS) and e.reduce not in ("sum", "max", "min")]
    if bad:
        raise LoweringError(f"{bad[0].name} reduces a token rank with {bad[0].reduce}; a scan carries sums, "
                            f"maxima and minima")
    if not terms and not any(set(TOKENS) & set(e.reduced) for e in swept):
        raise LoweringError("nothing is summed over a token rank")
    epilogue = _epilogue(lowered, coupled)
    used = [v for e in swept if e.name not in epilogue for v in e.space] + \
        [v for ts in terms.values() for t in ts for v in t.contracted + t.kept]
    rank_order = {d.lower(): i for i, d in enumerate(c.dims)}
    features = tuple(sorted((v for v in dict.fromkeys(used) if v not in TOKENS and v not in grid),
                            key=lambda v: rank_order.get(v, len(rank_order))))
    sweeps, split = _schedule(lowered, terms, coupled | set(epilogue))
    intermediates = tuple(dict.fromkeys(t for s in sweeps for t in s.stores + s.states
                                        if t not in lowered.output_names))
    return ScanPlan(NAME, lowered, sweeps, grid, features, intermediates, tuple(rewrites),
                    epilogue=_epilogue_cascade(lowered, epilogue), split_sweeps=split)


def _pairwise(c: Cascade, e: Einsum, grid: tuple[str, ...]) -> list[Einsum]:
    """A product summed over two features whose operands span three axes (the backward's
    `sum_{e,f} dKV[e,f] FK[m,e] V[m,f]`) as two sums, one feature at a time, so every value is
    a tile over two axes: `X[m,f] = sum_e dKV[e,f] FK[m,e]`, then `sum_f X[m,f] V[m,f]`."""
    terms = product_terms(e.expr)
    axes = {v for v in e.space if v not in grid}
    features = [v for v in e.reduced if v not in TOKENS and v not in grid]
    if e.reduce != "sum" or len(terms) != 1 or len(features) < 2 or len(axes) < 3 or e.where is not None:
        return [e]
    sign, factors = terms[0]
    order = {d.lower(): i for i, d in enumerate(c.dims)}
    for r in features:
        reading = [(rec, f) for rec, f in factors if r in index_vars(f)]
        kept = sorted({v for _, f in reading for v in index_vars(f)} - {r}, key=lambda v: order.get(rank_of(v).lower(), 0))
        if len([v for v in kept if v not in grid]) > 2 or any(rec for rec, _ in reading):
            continue
        name = FreshNames(list(c.tensors) + list(c.dims) + [p.name for p in c.params])(f"{e.name}_{r}")
        inner = Einsum(Access(name, tuple(Index(v) for v in kept)), product(reading), "sum", loc=e.loc)
        rest = [x for x in factors if x not in reading] + [(False, inner.target)]
        outer = replace(e, expr=product(rest, sign))
        return [inner] + _pairwise(c.replace(einsums=c.einsums + (inner,)), outer, grid)
    return [e]


def _split_sums(c: Cascade, grid: tuple[str, ...]) -> tuple[Cascade, list[str]]:
    """Sums a sweep cannot carry as written, split in two (exact: a sum of partial sums):
    - a sum over both token ranks (the backward's gradient of a per-head decay) sums over the
      keys per query first, a scan's term, and then over the queries, a state;
    - a state that also sums over grid points (over the batch B) is summed per program in the
      sweep, and across programs in the epilogue."""
    fresh = FreshNames(list(c.tensors) + list(c.dims) + [p.name for p in c.params])
    order = {d.lower(): i for i, d in enumerate(c.dims)}
    out: list[Einsum] = []
    notes: list[str] = []

    def part(e: Einsum, keep: set[str], base: str) -> Einsum:
        name = fresh(base)
        idx = tuple(Index(v) for v in sorted(keep, key=lambda v: order.get(rank_of(v).lower(), len(order))))
        out.append(Einsum(Access(name, idx), e.expr, e.reduce, e.where, loc=e.loc))
        return replace(e, expr=Access(name, idx), where=None)

    for e in c.einsums:
        if set(TOKENS) <= set(e.reduced):
            e = part(e, set(e.space) - {KEY}, f"{e.name}_{QUERY}")
            notes.append(f"{e.name}: summed over the keys per query, then over the queries")
        missing = set(grid) & set(e.reduced)
        if set(TOKENS) & set(e.reduced) and missing and not set(TOKENS) & set(e.lhs_vars):
            e = part(e, set(e.lhs_vars) | missing, f"{e.name}_part")
            notes.append(f"{e.name}: summed per {','.join(sorted(missing))} in the sweep, across them after")
        out.append(e)
    return c.replace(einsums=tuple(out)), notes


def _epilogue(c: Cascade, skip: set[str]) -> dict[str, Einsum]:
    """Einsums over no token rank that only outputs over no token rank need (every reader is one
    of them): computed once after the sweeps, across programs, from the states they read."""
    graph = cascade_graph(c)
    out: dict[str, Einsum] = {}
    for e in reversed(graph.order):
        if e.name in skip or _token_of(e) is not None:
            continue
        readers = list(graph.graph.successors(e.name))
        if (e.name in c.output_names or readers) and all(r in out for r in readers):
            out[e.name] = e
    return out


def _epilogue_cascade(c: Cascade, epilogue: dict[str, Einsum]) -> Cascade | None:
    """The epilogue as a cascade of its own: its inputs are the states (and inputs) it reads."""
    from einsum_ir.ir import InputDecl, Output
    from einsum_ir.lowering.grad import trimmed

    if not epilogue:
        return None
    einsums = tuple(e for e in c.einsums if e.name in epilogue)
    read = dict.fromkeys(a.tensor for e in einsums for a in walk(e.expr) if isinstance(a, Access)
                         and a.tensor not in epilogue)
    inputs = tuple(InputDecl(n, tuple(r.lower() for r in c.tensors[n].ranks), c.tensors[n].dtype
                             if c.tensors[n].role == "input" else None) for n in read)
    outputs = tuple(Output(n) for n in c.output_names if n in epilogue)
    return trimmed(c.replace(einsums=einsums, inputs=inputs, outputs=outputs, inits=(), doc=""))


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
    """One program per value of these: the indices every output over a token rank has (every
    output, where none is: a partial state's KV[b,h,e,f] and n_seen[b,h] give B, H), that both
    a query-side and a key-side input carry, and that no score over both token ranks contracts
    (B, H; not E, and not V's F, which the state holds). A per-position value summed across them
    would be summed across programs: declined (a state summed across them is summed after the
    sweeps, in the epilogue)."""
    sides = [set(d.indices) for d in c.inputs]
    both = {v for s in sides if QUERY in s for v in s} & {v for s in sides if KEY in s for v in s}
    outs = [c.einsum(o).lhs_vars for o in c.output_names if set(c.einsum(o).lhs_vars) & set(TOKENS)]
    outs = outs or [c.einsum(o).lhs_vars for o in c.output_names]  # states only: a partial state's
    contracted = {v for e in c.einsums if set(TOKENS) <= set(e.lhs_vars) for v in e.reduced}
    return tuple(v for v in outs[0] if v not in TOKENS and v in both and v not in contracted and all(v in o for o in outs))


def _check_across(c: Cascade, grid: tuple[str, ...]) -> None:
    for e in c.einsums:
        across = set(e.reduced) & set(grid)
        if across and set(e.lhs_vars) & set(TOKENS):
            raise LoweringError(f"{e.name} sums over {', '.join(sorted(across))} per position: across the scan's "
                                f"programs (one per {','.join(grid)}), which a sweep does not do; only sums "
                                f"that read it linearly can take that sum over")


def _sum_across_programs_later(c: Cascade, grid: tuple[str, ...]) -> tuple[Cascade, list[str]]:
    """A per-position value summed over grid ranks (the gradient of RetNet's per-head
    normalizer, `dDS[h,p] = sum_{b,m} ...`) is kept per grid point instead, when every reader
    sums a product it is one factor of: the readers then sum over those ranks too, which is the
    same sum taken later (exact, by linearity), and reaches the epilogue."""
    readers = {e.name: [r for r in c.einsums if e.name in (a.tensor for a in walk(r.expr) if isinstance(a, Access))]
               for e in c.einsums}
    order = {d.lower(): i for i, d in enumerate(c.dims)}
    out, notes, renamed = [], [], {}
    for e in c.einsums:
        across = [v for v in e.reduced if v in grid]
        if not across or not set(e.lhs_vars) & set(TOKENS) or e.reduce != "sum" or e.name in c.output_names:
            out.append(e)
            continue
        if not all(_linear_in(r, e.name) and not set(across) & set(r.space) for r in readers[e.name]):
            out.append(e)
            continue
        keep = sorted(set(e.lhs_vars) | set(across), key=lambda v: order.get(rank_of(v).lower(), len(order)))
        renamed[e.name] = (tuple(keep), {v: e.lhs_vars.index(v) for v in e.lhs_vars})
        out.append(replace(e, target=Access(e.name, tuple(Index(v) for v in keep))))
        notes.append(f"{e.name}: kept per {','.join(across)}, summed over them by its readers")
    if not renamed:
        return c, notes

    def widen(a: Access):
        if a.tensor not in renamed:
            return None
        keep, at = renamed[a.tensor]
        return Access(a.tensor, tuple(a.indices[at[v]] if v in at else Index(v) for v in keep))

    out = [replace(e, expr=rebuild(e.expr, lambda n: widen(n) if isinstance(n, Access) else None)) for e in out]
    return c.replace(einsums=tuple(out)), notes


def _linear_in(r: Einsum, name: str) -> bool:
    """`r` sums products each reading `name` exactly once, as a plain factor (a term without it
    would be summed once per value of the ranks it gains)."""
    if r.reduce != "sum" or not r.reduced:
        return False
    for _, factors in product_terms(r.expr, distribute=True):
        reads = [(rec, f) for rec, f in factors if any(isinstance(a, Access) and a.tensor == name for a in walk(f))]
        if len(reads) != 1 or reads[0][0] or not isinstance(reads[0][1], Access):
            return False
    return True


def _single(c: Cascade, e: Einsum, coupled: set[str], grid: tuple[str, ...]) -> Einsum:
    """An Einsum over one token rank: plain index variables in its reads, and no read of a
    tensor over both tokens (that tensor only exists inside a term). A sum over a token rank
    may select positions by their own index (a partial state's `m >= key_lo and m < key_hi`):
    it becomes a sum of the selected values, `where(mask, x, 0)`."""
    for a in (n for n in walk(e.expr) if isinstance(n, Access)):
        if a.tensor in coupled:
            raise LoweringError(f"{e.name} reads {a.tensor}, which is over both P and M, outside a product "
                                f"summed over the keys: the scan has no P x M matrix to read")
    _plain_reads(e.expr, e.name)
    if e.where is None:
        return e
    summed = [v for v in e.reduced if v in TOKENS]
    if e.reduce != "sum" or not summed:
        raise LoweringError(located(e, f"{e.name} has a predicate but sums no token rank; the scan masks sums "
                                       f"over the positions (m <= p, or a range of them)"))
    _, mask = _predicate(e.where, e.name, summed[0], grid)
    _absent_is_zero(c, e, mask)
    return replace(e, expr=_masked_sum(e.expr, mask, summed[0]), where=None)


def _masked_sum(expr: Expr, mask: Expr, summed: str) -> Expr:
    """The summand `expr` with every factor over the summed index selected by `mask` (a divisor
    by 1, the rest by 0), so the sum stays a contraction of its factors (and with none over it,
    the mask as a factor of its own: `n_seen = 1.0` becomes `1.0 * where(mask, 1, 0)`)."""
    pieces = []
    for sign, factors in product_terms(expr):
        masked = [(recip, Call("where", (mask, f, Num(1 if recip else 0))) if summed in index_vars(f) else f)
                  for recip, f in factors]
        if not any(summed in index_vars(f) and not recip for recip, f in factors):
            masked.append((False, Call("where", (mask, Num(1), Num(0)))))
        pieces.append(product(masked, sign))
    return summation(pieces)


def _plain_reads(expr: Expr, name: str) -> None:
    """Every tensor read at plain index variables: a chunk is a slice of each token rank."""
    for a in (n for n in walk(expr) if isinstance(n, Access)):
        if not all(isinstance(i, Index) for i in a.indices):
            raise LoweringError(f"{name} reads {a.tensor} at an index expression; the scan reads tensors at "
                                f"plain index variables")


def _terms(c: Cascade, e: Einsum, coupled: set[str], grid: tuple[str, ...], own: str) -> tuple[list[Term], bool]:
    """The terms of an Einsum that sums a product of both sides over the other token rank than
    `own`, and whether they are causal. Declines, naming the Einsum, when something couples the
    two sides."""
    other = KEY if own == QUERY else QUERY
    if e.reduce != "sum":
        raise LoweringError(f"{e.name} takes a {e.reduce} over the {'keys' if other == KEY else 'queries'} of a "
                            f"product of both sides; only a sum reassociates")
    expanded = _expand(c, e.expr, e.where, coupled, e.name, set(e.space))
    kept = tuple(v for v in e.lhs_vars if v not in grid and v != own)
    causal_flags, masks = set(), set()
    out = []
    for sign, factors, where in expanded:
        causal, mask = _predicate(where, e.name, other, grid)
        causal_flags.add(causal)
        masks.add(mask)
        q, k, decay = [], [], []
        for recip, f in factors:
            vs = set(index_vars(f))
            _plain_reads(f, e.name)
            if {QUERY, KEY} <= vs:
                if recip:
                    raise LoweringError(f"{e.name} divides by {print_expr(f)}, which couples P and M")
                decay.append(f)
            elif other in vs:
                k.append((recip, f))
            else:
                q.append((recip, f))
        d = product([(False, f) for f in decay]) if decay else None
        if d is not None:
            d, diagonal = _decay(d, e.name)
            if diagonal is not None:  # c(p, m) = c(m, m) g(p)/g(m): c(m, m) is a factor over one side
                (k if other in index_vars(diagonal) else q).append((False, diagonal))
        contracted = tuple(v for v in dict.fromkeys(v for _, f in k for v in index_vars(f))
                           if v not in grid and v != other and v not in kept)
        key_f = [(r, f) for r, f in k if set(index_vars(f)) & set(kept)]
        key_e = [(r, f) for r, f in k if (r, f) not in key_f]
        if any(set(index_vars(f)) & set(kept) and set(index_vars(f)) & set(contracted) for _, f in key_f):
            raise LoweringError(f"{e.name}: a factor of the summed side reads both a contracted feature and a kept "
                                f"one; split it into a product of two")
        stray = {v for _, f in q for v in index_vars(f)} - set(grid) - {own} - set(contracted)
        if stray:
            raise LoweringError(f"{e.name}: the {'query' if own == QUERY else 'key'} side reads "
                                f"{', '.join(sorted(stray))}, which the summed side does not; the scan's state is "
                                f"over the summed side's features")
        if kept and not key_f:
            raise LoweringError(f"{e.name} keeps {', '.join(kept)}, which its summed side does not read: the same "
                                f"sum for each; write it without {', '.join(kept)}")
        if len(contracted) > 2 or len(kept) > 1 or len(contracted) == 2 and kept:
            raise LoweringError(f"{e.name} contracts {len(contracted)} and keeps {len(kept)} feature ranks; the "
                                f"scan's state is one matrix (one rank each)")
        out.append(Term(e.name, sign, product(q) if q else Num(1), product(key_e) if key_e else Num(1),
                        product(key_f) if key_f else None, d, contracted, kept, own, mask))
    if len(causal_flags) != 1:
        raise LoweringError(f"{e.name} mixes causal and unmasked terms")
    if len(masks) != 1:
        raise LoweringError(f"{e.name} sums its terms over different positions; split it into one Einsum per mask")
    causal = causal_flags.pop()
    if not causal and any(t.decay is not None for t in out):
        raise LoweringError(f"{e.name} decays without m <= p: g(p)/g(m) grows without bound for m > p")
    return out, causal


def _hoist(c: Cascade, e: Einsum, coupled: set[str], terms: list[Term], causal: bool) -> tuple[list[Einsum], list[Einsum]]:
    """A sum whose terms contract two features and keep none (`sum_m (q.k)(dO.v) c`, the
    gradient of a decay) as a scan that keeps one of them and a contraction after it:
    `T[.., f] = sum_m q.k v_f c` and `e = sum_f dO_f T[.., f]`. The factors of the result's side
    that read the kept feature must be the same in every such term; the other terms are summed
    by a scan of their own (`R`) and added after, `e = sum_f dO_f T + R`. Returns the scans and
    the Einsums after them."""
    pairs = [t for t in terms if len(t.contracted) == 2]
    rank, own = pairs[0].contracted[-1], pairs[0].own
    other = KEY if own == QUERY else QUERY
    outside, inside, rest = None, [], []
    for t, (sign, factors, _) in zip(terms, _expand(c, e.expr, e.where, coupled, e.name, set(e.space))):
        if len(t.contracted) < 2:
            rest.append(product(factors, sign))
            continue
        if rank not in t.contracted:
            raise LoweringError(f"{e.name}: its terms contract different pairs of features; split it into one "
                                f"Einsum per term")
        mine = [(r, f) for r, f in factors if rank in index_vars(f) and other not in index_vars(f)]
        if outside is not None and print_expr(product(mine)) != print_expr(product(outside)):
            raise LoweringError(f"{e.name}: its terms read {rank} through different factors of the "
                                f"{'query' if own == QUERY else 'key'} side; split it into one Einsum per term")
        outside = mine
        inside.append(product([x for x in factors if x not in mine], sign))
    fresh = FreshNames(list(c.tensors) + list(c.dims) + [p.name for p in c.params])
    where = _and(Binary("<=", Index(KEY), Index(QUERY)) if causal else None, terms[0].mask)
    kept = Einsum(Access(fresh(f"{e.name}_{rank}"), tuple(Index(v) for v in dict.fromkeys(e.lhs_vars + [own, rank]))),
                  summation(inside), "sum", where, loc=e.loc)
    hoisted = product(outside + [(False, kept.target)])
    if not rest:
        return [kept], [replace(e, expr=hoisted, where=None)]
    target = Access(fresh(f"{e.name}_rest"), e.target.indices)
    others = Einsum(target, summation(rest), "sum", where, loc=e.loc)
    part = Einsum(Access(fresh(f"{e.name}_{rank}sum"), e.target.indices), hoisted, "sum", loc=e.loc)
    return [kept, others], [part, replace(e, expr=Binary("+", part.target, target), where=None)]


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


def _predicate(where: Expr | None, name: str, summed: str, grid: tuple[str, ...]) -> tuple[bool, Expr | None]:
    """Whether `where` holds `m <= p` (or `p >= m`), and the rest of it, which must select
    positions of the summed rank by themselves (`m >= key_lo and m < Len[b]`: over the summed
    index, the grid and parameters; None when there is none). Any other mask is declined."""
    causal_forms = {Binary("<=", Index(KEY), Index(QUERY)), Binary(">=", Index(QUERY), Index(KEY))}
    causal, side = False, []
    for clause in conjuncts(where):
        plain = isinstance(clause, Binary) and isinstance(clause.lhs, Index) and isinstance(clause.rhs, Index)
        if plain and Binary(clause.op, Index(clause.lhs.name), Index(clause.rhs.name)) in causal_forms:
            causal = True
        elif set(index_vars(clause)) <= {summed, *grid}:
            _plain_reads(clause, name)
            side.append(clause)
        else:
            raise LoweringError(f"{name} is masked by {print_expr(where)}; the chunked scan sums a prefix (m <= p), "
                                f"positions selected by their own index (m >= key_lo and m < Len[b]), or every "
                                f"position (a window or a block mask is streamed under a query tile)")
    return causal, chain("and", side) if side else None


def _masked(x: Expr | None, mask: Expr | None) -> Expr | None:
    """`x` where `mask` holds, else 0: a select, so that a value at a masked position (an inf,
    or what an unwritten cache slot holds) goes nowhere."""
    return x if x is None or mask is None else Call("where", (mask, x, Num(0)))


def _absent_is_zero(c: Cascade, e: Einsum, mask: Expr) -> None:
    """A masked sum is held as 0 where its mask selects no position; the cascade's value is
    absent there, and so is everything that reads it. The two agree only for an output whose
    fill is 0 (a partial state's sums are)."""
    fill = next((o.fill for o in c.outputs if o.name == e.name), None)
    if fill != 0:
        raise LoweringError(located(e, f"{e.name} is masked by {print_expr(mask)}: where that selects no position, "
                                       f"{e.name} is absent, but the scan's sum is 0; the scan takes such a mask only "
                                       f"on an output filled with 0: make the masked sums outputs and compute what "
                                       f"reads them after the kernel"))


def _decay(d: Expr, name: str) -> tuple[Expr, Expr | None]:
    """The coupling `d` as a decay `c(p, m)` with `c(p, m) c(m, j) = c(p, j)`, so that each
    chunk's ratios can be taken against the chunk's first position, and the constant it carries
    beside one (`a g(p)/g(m)` is `c(m, m)` times the decay `d / c(m, m)`; None when there is none:
    a derivative such as `pow(l, p - m - 1)` has one). Tensor reads are functions of their indices."""
    def sym(expr: Expr, p: str, m: str) -> sympy.Expr:
        swapped = substitute(expr, {QUERY: Index(p), KEY: Index(m)})
        return to_sympy(swapped, lambda a: sympy.Function("T_" + a.tensor)(
            *[to_sympy(i, lambda _: sympy.Integer(0)) for i in a.indices]))

    ratio = sympy.simplify(sympy.powsimp(sympy.expand_power_exp(sym(d, "x", "y") * sym(d, "y", "z") /
                                                                 sym(d, "x", "z")), force=True))
    if ratio == 1:
        return d, None
    positions = {str(to_sympy(Index(v), None)) for v in "xyz"}
    if {str(v) for v in ratio.free_symbols} & positions:
        raise LoweringError(f"{name}: the factor {print_expr(d)} couples the query and key positions but is not "
                            f"a decay g(p)/g(m) (c(p,m)*c(m,j) != c(p,j)); only decays reassociate")
    diagonal = _folded(substitute(d, {QUERY: Index(KEY)}))
    return Binary("/", d, diagonal), diagonal


def _folded(e: Expr) -> Expr:
    """`e` with `x - x` and arithmetic on constants folded (`pow(l, m - m - 1)` is `pow(l, -1)`),
    so the generated code and the plan's summary read as the math does."""
    return rebuild(e, lambda n: None if not isinstance(n, Binary) else _fold_binary(
        Binary(n.op, _folded(n.lhs), _folded(n.rhs), n.loc)))


def _fold_binary(b: Binary) -> Expr:
    if b.op == "-" and b.lhs == b.rhs:
        return Num(0)
    if isinstance(b.lhs, Num) and isinstance(b.rhs, Num) and b.op in ("+", "-", "*"):
        a, c = float(b.lhs.value), float(b.rhs.value)
        return Num(a + c if b.op == "+" else a - c if b.op == "-" else a * c)
    if b.op in ("+", "-") and isinstance(b.rhs, Num) and float(b.rhs.value) == 0:
        return b.lhs
    return b


def _reassociate(c: Cascade, e: Einsum, terms: list[Term]) -> list[Einsum]:
    """A non-causal contraction as a state over the summed side and a product with the other:
    `Z = sum_m q*k_e*k_f` -> `Z_state[grid, e, f] = sum_m k_e*k_f`, `Z = sum_e q * Z_state` (and
    the same with the queries summed, for the backward's sums over p)."""
    fresh = FreshNames(list(c.tensors) + list(c.dims) + [p.name for p in c.params])
    out: list[Einsum] = []
    pieces = []
    grid = [v for v in e.lhs_vars if v != terms[0].own and v not in terms[0].kept]
    for i, t in enumerate(terms):
        state = fresh(f"{e.name}_state" + (str(i + 1) if len(terms) > 1 else ""))
        idx = tuple(Index(v) for v in grid + list(t.contracted) + list(t.kept))
        key = t.summed_e if t.key_f is None else Binary("*", t.summed_e, t.summed_f)
        out.append(Einsum(Access(state, idx), key, loc=e.loc))
        read = Binary("*", t.query, Access(state, idx))
        pieces.append(read if t.sign > 0 else Unary("-", read))
    out.append(replace(e, expr=summation(pieces), where=None))
    return out


# ---------------------------------------------------------------------------- sweeps


def _token_of(e: Einsum) -> str | None:
    vs = set(e.space)
    return QUERY if QUERY in vs else KEY if KEY in vs else None


def _schedule(c: Cascade, terms: dict[str, list[Term]], skip: set[str]) -> tuple[tuple[Sweep, ...], tuple[Sweep, ...]]:
    """Sweeps in order. A sweep is plain (over one token rank) or lockstep (causal terms; one for
    sums over the keys, one for sums over the queries). A reduction over a token is ready one
    sweep after the sweeps it reads; a term's value is ready in its own sweep, and in later ones
    from memory (it is stored); maps are recomputed wherever they are needed, except where
    they are read at the other token rank (a gradient over P summing one over M): stored too.
    Returns the sweeps, and the same with lockstep sweeps split into independent groups."""
    graph = cascade_graph(c)
    by_name = {e.name: e for e in c.einsums if e.name not in skip}
    reductions = {e.name for e in by_name.values() if set(e.reduced) & set(TOKENS)} - set(terms)
    lock_of = {name: ("lock", ts[0].own) for name, ts in terms.items()}
    crossed = {a.tensor for e in by_name.values() if len(set(TOKENS) & set(e.space)) == 1
               for a in walk(e.expr) if isinstance(a, Access)
               and a.tensor in by_name and a.tensor not in reductions and a.tensor not in lock_of
               and _token_of(by_name[a.tensor]) not in (None, _token_of(e))}
    level: dict = {}
    active: set = set()
    placed: dict[str, tuple] = {}

    def kind_of(name: str):
        if name in lock_of:
            return lock_of[name]
        return KEY if KEY in by_name[name].reduced else QUERY

    def deps(name: str) -> list[str]:
        return [d for d in _sources(by_name[name], terms, graph) if d in by_name]

    def avail(name: str, kind) -> int:
        """The first sweep level at which a sweep of `kind` reads `name` per chunk."""
        if name in reductions:
            return at(name) + 1
        if name in lock_of:
            return 0 if lock_of[name] == kind else at(lock_of[name]) + 1
        if name in crossed:
            lv, home = place(name)
            return lv if home == kind else lv + 1
        return max((avail(d, kind) for d in deps(name)), default=0)

    def place(name: str) -> tuple:
        """The sweep that computes and stores a per-token map (an output, or a map read at the
        other token rank): beside the lockstep terms it reads when it can be, else the first
        plain sweep over its token with everything it reads."""
        if name not in placed:
            tok = _token_of(by_name[name])
            lock = ("lock", tok)
            read = graph.ancestors.get(name, frozenset())
            inner = max((avail(d, lock) for d in deps(name)), default=0)
            if any(lock_of.get(t) == lock for t in read) and inner <= at(lock):
                placed[name] = (at(lock), lock)
            else:
                placed[name] = (max((avail(d, tok) for d in deps(name)), default=0), tok)
        return placed[name]

    def at(key) -> int:
        """The level of a reduction's sweep, or of a lockstep sweep (`("lock", own)`)."""
        if key in level:
            return level[key]
        if key in active:
            raise LoweringError("the scans over the keys and over the queries read each other's results: no "
                                "order of sweeps computes them")
        active.add(key)
        members = [n for n, k in lock_of.items() if k == key] if isinstance(key, tuple) else [key]
        kind = key if isinstance(key, tuple) else kind_of(key)
        level[key] = max((avail(d, kind) for n in members for d in deps(n)), default=0)
        return level[key]

    roots: dict[tuple, list[str]] = {}
    for e in by_name.values():
        tok = _token_of(e)
        if e.name in reductions or e.name in lock_of:
            key = (at(e.name if e.name in reductions else lock_of[e.name]), kind_of(e.name))
        elif (e.name in c.output_names or e.name in crossed) and tok is not None:
            key = place(e.name)
        elif e.name in c.output_names:
            raise LoweringError(f"{e.name} is an output over no token rank that reads a per-token value; the scan "
                                f"writes per-token outputs and states")
        else:
            continue  # a map: evaluated in every sweep that needs it
        roots.setdefault(key, []).append(e.name)
    rank = {KEY: 0, QUERY: 1, ("lock", QUERY): 2, ("lock", KEY): 3}
    order = sorted(roots, key=lambda k: (k[0], rank[k[1]]))

    def build(groups: list[tuple[object, list[str]]]) -> tuple[Sweep, ...]:
        sweeps = [_sweep(c, graph, i, kind, names, terms, reductions, by_name, lock_of, crossed)
                  for i, (kind, names) in enumerate(groups)]
        loaded = {n for s in sweeps for n in s.loads}
        stored = lambda s: [x.einsum for x in s.terms] + [e.name for e in s.maps if e.name in crossed]  # noqa: E731
        return tuple(replace(s, stores=s.stores + tuple(t for t in dict.fromkeys(stored(s))
                                                        if t in loaded and t not in s.stores))
                     for s in sweeps)

    merged = build([(kind, roots[(lv, kind)]) for lv, kind in order])
    split = build([(kind, group) for lv, kind in order
                   for group in (_independent(roots[(lv, kind)], graph) if isinstance(kind, tuple)
                                 else [roots[(lv, kind)]])])
    return merged, split


def _independent(names: list[str], graph) -> list[list[str]]:
    """`names` in groups that read nothing of one another (the backward's dK and dV): each can
    run as a sweep of its own."""
    group = {n: {n} for n in names}
    for a in names:
        for b in names:
            if b in graph.ancestors.get(a, frozenset()) and group[a] is not group[b]:
                joined = group[a] | group[b]
                for n in joined:
                    group[n] = joined
    out: list[list[str]] = []
    for n in names:
        if not any(n in g for g in out):
            out.append([x for x in names if x in group[n]])
    return out


def _sources(e: Einsum, terms: dict[str, list[Term]], graph) -> list[str]:
    """The tensors an Einsum's value needs per chunk: a term's are its factors' reads (the
    Einsums over both tokens it reads are inlined into them)."""
    if e.name not in terms:
        return list(graph.graph.predecessors(e.name))
    parts = [x for t in terms[e.name] for x in (t.query, t.key_e, t.key_f, t.decay) if x is not None]
    return list(dict.fromkeys(a.tensor for x in parts for a in walk(x) if isinstance(a, Access)))


def _sweep(c, graph, index: int, kind, roots: list[str], terms, reductions, by_name, lock_of, crossed) -> Sweep:
    """The Einsums one sweep evaluates: its roots and, per chunk, the maps they need."""
    lockstep = isinstance(kind, tuple)
    token = kind[1] if lockstep else kind
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
        if name not in roots and (name in reductions or lock_of.get(name, kind) != kind or name in crossed):
            loads[name] = None  # an earlier sweep's state, or a term or map another sweep stores
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
    states = tuple(e.name for e in reds)
    stores = tuple(n for n in roots if n in c.output_names and n not in states)
    return Sweep(index, token, lockstep, prologue, maps, reds,
                 tuple(t for e in maps if e.name in terms for t in terms[e.name]), stores, states, tuple(loads))
