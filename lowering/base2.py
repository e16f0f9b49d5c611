"""Scores in base 2: `exp(S - G)` becomes `exp2(S' - G')` with log2(e) folded into S.

GPUs compute `exp(x)` as `ex2(x * log2(e))`. When a score S only enters `exp` shifted by its
running maximum G = max S, the multiply can move into S itself: with c = log2(e) > 0,

    S' = c * S,   G' = max S' = c * G,   exp(S - G) = exp2(S' - G'),

and c joins whatever scalar factor S already has (`Q*K*scale` becomes `Q*K*scale*c`, one
multiply either way). Scaling by c > 0 keeps every maximum and every absent point. The rewrite
is exact: each other read of S or G becomes `S' * ln(2)` (an LSE output reads `G' * ln(2)`), and
a term of the exponent other than S and G is multiplied by c.

c is pushed through sums into the tensors S is a sum of (alibi's `S = S0 - slope*(p - m)` puts
it into `S0 = Q*K*scale`) when S is their only reader, so it lands on a scalar factor. A
maximum over a map of several scores (PSA's union `max(S1, S2)`, each a select of a score and
-inf) scales with them: max, min and selects with infinities commute with c > 0, so the factor
goes to each score, and each score's exponential `exp(Si - G)` becomes base 2.
"""
from __future__ import annotations

import math

from einsum_ir.graph import CascadeGraph, cascade_graph
from einsum_ir.ir import Access, Binary, Call, Cascade, Einsum, Expr, Num, accesses, product_terms, rebuild
from einsum_ir.lowering.exprs import product, summation

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


def _shift_form(arg: Expr, s: Access, g: Access) -> list[tuple[float, list]] | None:
    """The exponent's signed terms when it holds +S and -G (each once), else None."""
    terms = product_terms(arg, distribute=True)
    plain = [(sign, f[0][1]) for sign, f in terms if len(f) == 1 and not f[0][0]]
    if (1.0, s) in plain and (-1.0, g) in plain:
        return terms
    return None


def _scaled(expr: Expr, c: float, cascade: Cascade, graph: CascadeGraph, absorbed: dict[str, Expr]) -> Expr:
    """`expr * c`, pushed into summands that are sole-reader map tensors (recorded in `absorbed`)."""
    terms = product_terms(expr, distribute=False)
    out = []
    for sign, factors in terms:
        accs = [f for r, f in factors if not r and isinstance(f, Access)]
        target = next((a for a in accs if _absorbs(a.tensor, cascade, graph)), None)
        if len(factors) == 1 and target is not None:
            w = cascade.einsum(target.tensor)
            absorbed[target.tensor] = _scaled(w.expr, c, cascade, graph, absorbed)
            out.append(product(factors, sign))
        else:
            out.append(product(factors + [(False, Num(c))], sign))
    return summation(out)


def _absorbs(name: str, cascade: Cascade, graph: CascadeGraph) -> bool:
    """A tensor whose definition can take a constant factor for its one reader."""
    writers = cascade.writers(name)
    return (len(writers) == 1 and len(graph.readers.get(name, ())) == 1 and name not in cascade.output_names
            and writers[0].reduce == "sum" and writers[0].recurrence_var is None)


def fold_log2e(c: Cascade, graph: CascadeGraph) -> tuple[Cascade, CascadeGraph]:
    """The cascade with every shift-form `exp(S - max S)` in base 2 (see the module doc), one
    score at a time (differential attention's two, each stage's of agent attention), and its
    graph; both unchanged when there is none."""
    while True:
        rewritten = _fold_one(c, graph)
        if rewritten is None:
            return c, graph
        c, graph = rewritten, cascade_graph(rewritten)


def _fold_one(c: Cascade, graph: CascadeGraph) -> Cascade | None:
    for g_einsum in c.einsums:
        if g_einsum.reduce != "max" or not g_einsum.reduced or not isinstance(g_einsum.expr, Access):
            continue
        chain = _scores(c, g_einsum.expr.tensor)
        if chain is None or g_einsum.name in c.output_names or c.writers(g_einsum.name) != [g_einsum]:
            continue
        rewritten = _rewrite(c, graph, chain, g_einsum)
        if rewritten is not None:
            return rewritten
    return None


def _scores(c: Cascade, name: str) -> dict[str, bool] | None:
    """The tensors a maximum's operand is made of that scale with it, each with whether it
    takes the factor itself (True: a sum, the score `Q*K*scale` or alibi's `S0 - slope*(p-m)`)
    or scales with its parts (False: a map positively homogeneous in tensors that scale, max
    and min of them and selects between them and infinities: PSA's `max(S1, S2)`,
    `S1 = where(L == 1, S1_s0, -inf)`). None when the operand cannot scale."""
    writers = c.writers(name)
    if len(writers) != 1 or writers[0].recurrence_var is not None or name in c.output_names:
        return None
    e = writers[0]
    leaves = None if e.reduced else _homogeneous_in(e.expr)
    if leaves:
        parts = [_scores(c, leaf) for leaf in leaves]
        if all(p is not None for p in parts):
            return {name: False} | {k: v for p in parts for k, v in p.items()}
    return {name: True} if e.reduce == "sum" else None


def _homogeneous_in(expr: Expr) -> list[str] | None:
    """The tensors `expr` is positively homogeneous of degree 1 in (scaling them by c > 0 scales
    it by c), or None."""
    if isinstance(expr, Access):
        return [expr.tensor]
    if isinstance(expr, Num) and math.isinf(float(expr.value)):
        return []
    if isinstance(expr, Call) and expr.fn in ("max", "min", "where"):
        parts = [_homogeneous_in(a) for a in (expr.args[1:] if expr.fn == "where" else expr.args)]
        return None if any(p is None for p in parts) else [t for p in parts for t in p]
    return None


def _rewrite(c: Cascade, graph: CascadeGraph, chain: dict[str, bool], g_einsum: Einsum) -> Cascade | None:
    g_name = g_einsum.name
    found = False

    def exps(expr: Expr) -> Expr:
        """Shift-form exps to exp2; every other read of a scaled tensor or G scaled back by ln 2."""
        nonlocal found

        def replace(node: Expr) -> Expr | None:
            nonlocal found
            if isinstance(node, Call) and node.fn == "exp":
                s_reads = [a for a in accesses(node.args[0]) if a.tensor in chain]
                g_reads = [a for a in accesses(node.args[0]) if a.tensor == g_name]
                if len(s_reads) == 1 and len(g_reads) == 1:
                    terms = _shift_form(node.args[0], s_reads[0], g_reads[0])
                    if terms is not None:
                        found = True
                        parts = []
                        for sign, factors in terms:
                            plain = len(factors) == 1 and not factors[0][0]
                            if plain and factors[0][1] in (s_reads[0], g_reads[0]):
                                parts.append(product(factors, sign))
                            else:
                                parts.append(product(factors + [(False, Num(LOG2E))], sign))
                        return Call("exp2", (summation(parts),))
            if isinstance(node, Access) and (node.tensor in chain or node.tensor == g_name):
                return Binary("*", node, Num(LN2))
            return None

        return rebuild(expr, replace)

    out: list[Einsum] = []
    absorbed: dict[str, Expr] = {}
    for e in c.einsums:
        if e is g_einsum or e.name in chain and not chain[e.name]:  # homogeneous: scaled by its parts
            out.append(e)
        elif e.name in chain:
            out.append(Einsum(e.target, _scaled(e.expr, LOG2E, c, graph, absorbed), e.reduce, e.where, e.loc))
        else:
            out.append(Einsum(e.target, exps(e.expr), e.reduce, e.where and exps(e.where), e.loc))
    if not found:
        return None
    out = [Einsum(e.target, absorbed[e.name], e.reduce, e.where, e.loc) if e.name in absorbed else e for e in out]
    return c.replace(einsums=tuple(out))
