"""Partial states over key ranges and their exact merge, derived from the cascade.

A one-stage forward keeps, per query row, the final values of its carried reductions (for
softmax the running max GM, the denominator SD and the numerator O_num); everything after the
key loop (the epilogue, O = O_num / SD) reads only those. So attention over disjoint key sets
combines exactly from their carried values, by the rules the online rewrite already derives:

- a max (or min) merges by max (min);
- a sum whose summand depends on running maxima takes, from each part, its value times the
  plan's rescale factor with the part's maxima as the old ones and the merged maxima as the new
  (`2**(G_GM - G_GM_new)`: FlashInfer's merge_state is this for softmax);
- any other sum adds.

`derive(c)` returns that as plain data (`Merge`): the *partial* cascade (the lowered forward
with every carried reduction restricted to `key_lo <= m < key_hi`, returning the carried values
with their identities as fills, and a count of the points each row saw), the merge rules, and
the *finish* cascade (the epilogue, run on merged values). codegen/partial.py runs them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy

from einsum_ir.errors import LoweringError
from einsum_ir.ir import (
    Access, Binary, Cascade, Einsum, Index, InputDecl, Name, Num, Output, Param,
)
from einsum_ir.lowering.defer import prune
from einsum_ir.lowering.exprs import tensors_read
from einsum_ir.lowering.grad import FreshNames, trimmed
from einsum_ir.lowering.strategy import key_loop_plan

IDENTITY = {"max": float("-inf"), "min": float("inf"), "sum": 0.0}


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
    partial: Cascade  # the carried values (and `count`) over keys key_lo <= k < key_hi
    rules: tuple[Rule, ...]  # maxima and minima first
    finish: Cascade  # the epilogue: outputs from merged carried values (and the forward's inputs)
    count: str  # per row: how many points the part saw (a row that saw none takes the fills)
    key_lo: str
    key_hi: str


def derive(c: Cascade) -> Merge:
    """The partial cascade, merge rules and finish cascade of `c` (LoweringError when the
    forward is not one key loop over one key rank)."""
    plan = key_loop_plan(c)
    if len(plan.stages) != 1:
        raise LoweringError(f"the forward runs {len(plan.stages)} stages; partial states are derived for "
                            f"one-stage forwards")
    (stage,) = plan.stages
    if len(stage.stream) != 1:
        raise LoweringError(f"the keys span {len(stage.stream)} ranks ({', '.join(stage.stream)}); a key range "
                            f"is one rank's")
    (k,) = stage.stream
    lowered = plan.cascade
    carried = [e for e in lowered.einsums if stage.kind(e.name) == "carried"]
    if not carried:
        raise LoweringError("the key loop carries no reduction: there is no state to merge")
    for e in carried:
        if e.reduce not in IDENTITY:
            raise LoweringError(f"{e.name} is a {e.reduce} reduction; partial states merge sums, max and min")
        if set(e.reduced) - {k}:
            raise LoweringError(f"{e.name} also reduces {', '.join(sorted(set(e.reduced) - {k}))}: its per-row "
                                f"state is not kept")
    names = FreshNames(list(lowered.tensors) + list(lowered.dims) + [p.name for p in lowered.params])
    key_lo, key_hi, count = (names(n) for n in ("key_lo", "key_hi", "n_seen"))
    in_range = Binary("and", Binary(">=", Index(k), Name(key_lo)), Binary("<", Index(k), Name(key_hi)))
    rows = carried[0].target.indices
    seen = Binary("and", stage.predicate, in_range) if stage.predicate is not None else in_range
    body = []
    for e in lowered.einsums:
        if stage.kind(e.name) == "carried":
            e = replace(e, where=Binary("and", e.where, in_range) if e.where is not None else in_range)
        if stage.kind(e.name) != "epilogue":
            body.append(e)
    body.append(Einsum(Access(count, rows), Num(1.0), "sum", seen))
    params = lowered.params + (Param(key_lo, type="int"), Param(key_hi, type="int"))
    outputs = tuple(Output(e.name, IDENTITY[e.reduce]) for e in carried) + (Output(count),)
    partial = trimmed(prune(lowered.replace(einsums=tuple(body), params=params, outputs=outputs, doc="")))
    rules = [Rule(e.name, tuple(i.name for i in e.target.indices), e.reduce, stage.rescale.get(e.name, sympy.Integer(1)))
             for e in carried]
    rules.sort(key=lambda r: r.reduce == "sum")
    finish = _finish(lowered, stage, carried)
    return Merge(c, partial, tuple(rules), finish, count, key_lo, key_hi)


def _finish(lowered: Cascade, stage, carried: list[Einsum]) -> Cascade:
    names = {e.name for e in carried}
    epilogue = [e for e in lowered.einsums if stage.kind(e.name) == "epilogue"]
    decls = list(lowered.inputs) + [InputDecl(e.name, tuple(i.name for i in e.target.indices))
                                           for e in carried]
    outs = lowered.outputs
    for o in outs:
        if o.name not in names and o.name not in {e.name for e in epilogue}:
            raise LoweringError(f"output {o.name} is computed inside the key loop; it has no merged form")
    read = {t for e in epilogue for t in tensors_read(e.expr) + tensors_read(e.where)} | {o.name for o in outs}
    finish = lowered.replace(einsums=tuple(epilogue), inputs=tuple(d for d in decls if d.name in read), doc="")
    return trimmed(finish) if epilogue else finish

