"""Partial states over key ranges and their exact merge, derived from the cascade.

A forward keeps, per query row, the final values of its carried reductions over the keys (for
softmax the running max GM, the denominator SD and the numerator O_num); everything after the
key loop (the epilogue, O = O_num / SD, and any later stage) reads only those. So attention over
disjoint key sets combines exactly from their carried values, by the rules the online rewrite
already derives:

- a max (or min) merges by max (min);
- a sum whose summand depends on running maxima takes, from each part, its value times the
  plan's rescale factor with the part's maxima as the old ones and the merged maxima as the new
  (`2**(G_GM - G_GM_new)`: FlashInfer's merge_state is this for softmax);
- any other sum adds.

The carried reductions are the key loop's, in the stage that streams the keys (the only stage,
or the one over the key rank M: agent attention's first). A cascade the key loop does not lower
(linear attention, which the chunked scan runs) is taken as written: its reductions over the
key index m are the carried values, each a plain sum, max or min of values that depend on no
other reduction over the keys (`KV = sum_m FK*V`, `Z = sum_m FK`). Keys spread over several
ranks (a 2-D neighborhood's mx, my) are numbered row-major over those ranks: a key range is a
range of that number.

`derive(c)` returns that as plain data (`Merge`): the *partial* cascade (the forward with every
carried reduction restricted to `key_lo <= key < key_hi`, returning the carried values with
their identities as fills, and a count of the points each row saw), the merge rules, and the
*finish* cascade (what follows the carried values, run on merged values). Where the finish
takes a union of final values by their presence (var_sink), the state also counts each carried
value's points, and the finish reads a value as absent where its count is 0. codegen/partial.py
runs them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy

from einsum_ir.errors import LoweringError, located
from einsum_ir.graph import cascade_graph
from einsum_ir.ir import (
    Access, Binary, Cascade, Einsum, Expr, Index, InputDecl, Name, Num, Output, Param, rank_of, rebuild,
)
from einsum_ir.lowering.defer import prune
from einsum_ir.lowering.exprs import tensors_read
from einsum_ir.lowering.grad import FreshNames, trimmed
from einsum_ir.lowering.groups import no_key_ranges
from einsum_ir.lowering.strategy import key_loop_plan
from einsum_ir.lowering.unions import has_unions

IDENTITY = {"max": float("-inf"), "min": float("inf"), "sum": 0.0}
KEY_RANK = "M"  # DESIGN section 2's naming: the keys' rank, where a cascade has several loops


@dataclass(frozen=True)
class Rule:
    """How one carried value merges: `reduce` ("max", "min", "sum") and, for a sum, the factor
    each part's value takes (sympy, in `G_X` = the part's max X and `G_X_new` = the merged one)."""

    name: str
    indices: tuple[str, ...]
    reduce: str
    factor: sympy.Expr


@dataclass(frozen=True)
class Merge:
    cascade: Cascade
    partial: Cascade  # the carried values (and `count`) over keys key_lo <= key < key_hi
    rules: tuple[Rule, ...]  # maxima and minima first
    finish: Cascade  # outputs from merged carried values (and the forward's inputs)
    count: str  # per row: how many points the part saw (a row that saw none takes the fills)
    key_lo: str
    key_hi: str
    keys: tuple[str, ...]  # the key index variables; a key's number is row-major over their ranks
    stage: int | None  # the key loop's stage that streams them; None: the cascade as written


def derive(c: Cascade) -> Merge:
    """The partial cascade, merge rules and finish cascade of `c` (LoweringError, with the
    reason, when some reduction over the keys has no exact merge)."""
    try:
        plan = key_loop_plan(c)
    except LoweringError as declined:
        try:
            return _as_written(c)
        except LoweringError as err:
            raise LoweringError(f"{declined}; as written: {err}") from None
    streaming = [s for s in plan.stages if len(plan.stages) == 1 or KEY_RANK.lower() in s.stream]
    if len(streaming) != 1:
        raise LoweringError(f"the forward runs {len(plan.stages)} stages and {len(streaming)} of them stream the key "
                            f"rank {KEY_RANK}; partial states are one key loop's")
    (stage,) = streaming
    why = no_key_ranges(plan.cascade, stage.grouped)
    if why is not None:
        raise LoweringError(why)
    carried = list(stage.of_kind("carried"))
    if not carried:
        raise LoweringError("the key loop carries no reduction: there is no state to merge")
    for e in carried:
        _check_reduction(e, stage.stream)
    rules = [Rule(e.name, _names(e.target), e.reduce, stage.rescale.get(e.name, sympy.Integer(1))) for e in carried]
    return _assemble(c, plan.cascade, carried, stage.predicate, stage.stream, _rows(carried), rules, stage.index)


def _as_written(c: Cascade) -> Merge:
    """The merge of a cascade the key loop does not run, from its reductions over the key index
    as written (see the module docstring)."""
    k = KEY_RANK.lower()
    carried = [e for e in c.einsums if k in e.reduced]
    if KEY_RANK not in c.dims or not carried:
        raise LoweringError(f"nothing reduces the key rank {KEY_RANK}")
    ancestors = cascade_graph(c).ancestors
    names = {e.name for e in carried}
    for e in carried:
        inner = sorted(ancestors[e.name] & names)
        if inner:
            raise LoweringError(located(e, f"{e.name} reduces the keys and depends on {inner[0]}, a reduction over "
                                           f"every key: a key range's {e.name} would need keys outside it, so "
                                           f"partial states do not combine"))
        _check_reduction(e, (k,))
    if len({e.where for e in carried}) > 1:
        raise LoweringError(f"{', '.join(e.name for e in carried)} reduce the keys under different predicates; "
                            f"a partial state counts one set of keys")
    rules = [Rule(e.name, _names(e.target), e.reduce, sympy.Integer(1)) for e in carried]
    outs = {v for o in c.outputs for v in c.einsum(o.name).lhs_vars}
    return _assemble(c, c, carried, carried[0].where, (k,), _rows(carried, outs), rules, None)


def _check_reduction(e: Einsum, keys: tuple[str, ...]) -> None:
    if e.reduce not in IDENTITY:
        raise LoweringError(located(e, f"{e.name} is a {e.reduce} reduction; partial states merge sums, max and min"))
    if e.reduce != "sum" and set(e.reduced) - set(keys):
        raise LoweringError(located(e, f"{e.name} also reduces {', '.join(sorted(set(e.reduced) - set(keys)))}: its "
                                       f"per-row state is not kept"))


def _assemble(c: Cascade, lowered: Cascade, carried: list[Einsum], predicate: Expr | None, keys: tuple[str, ...],
              rows: tuple[str, ...], rules: list[Rule], stage: int | None) -> Merge:
    """The partial cascade (what the carried values need, over the key range, and the count)
    and the finish (the rest, reading the carried values as inputs)."""
    names = FreshNames(list(lowered.tensors) + list(lowered.dims) + [p.name for p in lowered.params])
    key_lo, key_hi, count = (names(n) for n in ("key_lo", "key_hi", "n_seen"))
    number: Expr = Index(keys[0])
    for k in keys[1:]:
        number = Binary("+", Binary("*", number, Name(rank_of(k))), Index(k))
    in_range = Binary("and", Binary(">=", number, Name(key_lo)), Binary("<", number, Name(key_hi)))
    held = {e.name for e in carried}
    body = [replace(e, where=Binary("and", e.where, in_range) if e.where is not None else in_range)
            if e.name in held else e for e in lowered.einsums]
    seen = Binary("and", predicate, in_range) if predicate is not None else in_range
    body.append(Einsum(Access(count, tuple(Index(v) for v in rows)), Num(1.0), "sum", seen))
    # a finish that takes a union reads whether each carried value saw a point: a count each
    later = has_unions(e.expr for e in lowered.einsums if e.name not in held)
    presence = {e.name: names(f"n_{e.name}") for e in carried} if later else {}
    for e in carried if presence else ():
        where = Binary("and", seen, e.where) if e.where is not None else seen
        body.append(Einsum(Access(presence[e.name], e.target.indices), Num(1.0), "sum", where))
        rules.append(Rule(presence[e.name], _names(e.target), "sum", sympy.Integer(1)))
    params = lowered.params + (Param(key_lo, type="int"), Param(key_hi, type="int"))
    outputs = tuple(Output(e.name, IDENTITY[e.reduce]) for e in carried) + (Output(count),) + \
        tuple(Output(n) for n in presence.values())
    partial = trimmed(prune(lowered.replace(einsums=tuple(body), params=params, outputs=outputs, doc="")))
    rules.sort(key=lambda r: r.reduce == "sum")
    finish = _finish(lowered, carried, keys, presence)
    return Merge(c, partial, tuple(rules), finish, count, key_lo, key_hi, keys, stage)



def _rows(carried: list[Einsum], among: set[str] | None = None) -> tuple[str, ...]:
    """The count's indices: those every carried value keeps (the key loop's rows), `among`
    these (for linear attention's states KV[b,h,e,f] and Z[b,h,e], the outputs' b, h)."""
    return tuple(v for v in _names(carried[0].target)
                 if (among is None or v in among) and all(v in _names(e.target) for e in carried))


def _names(a: Access) -> tuple[str, ...]:
    return tuple(i.name for i in a.indices)


def _finish(lowered: Cascade, carried: list[Einsum], keys: tuple[str, ...], presence: dict[str, str]) -> Cascade:
    """The cascade after the carried values: every Einsum the outputs need but the carried
    values are not, reading those as inputs. With `presence` (carried value -> its count of
    points), each is read as `X_p = X where n_X > 0`: absent where no part saw a point of it,
    as in the forward (var_sink's sink share, in rows without a sink)."""
    held = {e.name for e in carried}
    for o in lowered.outputs:
        if o.name not in held and held.isdisjoint(cascade_graph(lowered).ancestors[o.name]):
            raise LoweringError(f"output {o.name} is computed inside the key loop; it has no merged form")
    rest = prune(lowered.replace(einsums=tuple(e for e in lowered.einsums if e.name not in held)))
    for e in rest.einsums:
        if set(e.space) & set(keys):
            raise LoweringError(located(e, f"{e.name} is over the keys ({', '.join(sorted(set(e.space) & set(keys)))}) "
                                           f"and not reduced into a carried value; a key range's state does not hold "
                                           f"it"))
    decls = list(lowered.inputs) + [InputDecl(e.name, _names(e.target)) for e in carried]
    if presence:
        names = FreshNames(list(lowered.tensors) + list(presence.values()))
        guarded = {x: names(f"{x}_p") for x in presence}
        reads = [Einsum(Access(guarded[e.name], e.target.indices), e.target, where=Binary(
            ">", Access(presence[e.name], e.target.indices), Num(0))) for e in carried]
        def guard(x):
            return None if x is None else rebuild(x, lambda n: Access(guarded[n.tensor], n.indices)
                                                  if isinstance(n, Access) and n.tensor in guarded else None)
        rest = rest.replace(einsums=tuple(reads) + tuple(replace(e, expr=guard(e.expr), where=guard(e.where))
                                                         for e in rest.einsums))
        decls += [InputDecl(presence[e.name], _names(e.target)) for e in carried]
    read = {t for e in rest.einsums for t in tensors_read(e.expr) + tensors_read(e.where)} | set(lowered.output_names)
    finish = rest.replace(inputs=tuple(d for d in decls if d.name in read), doc="")
    return trimmed(finish) if finish.einsums else finish
