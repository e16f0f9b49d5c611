"""Partial states: attention over a key range as plain tensors, merged exactly (lowering/merge.py).

    st = kern.partial(keys=(lo, hi), **args)     # a PartialState over keys lo <= k < hi
    st = ei.merge(cascade, [st1, st2, ...])      # a PartialState over their union
    st.finalize()                                # what kern(**args) returns

A state holds the final value of every carried reduction of the lowered forward, per query row
(for softmax GM, the running max of the base-2 scores S * log2(e); SD; O_num), and how many
points each row saw. Its natural-log LSE, where the cascade has a softmax, is GM * ln 2 +
log(SD). A range that holds no key gives the identities (-inf maxima, zero sums): merging with
it changes nothing. The partial kernel is compiled by the same backend as the kernel; merge and
finalize are a few tensor ops per row.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import sympy
import torch

from einsum_ir.errors import BindError
from einsum_ir.interpreter import interpret
from einsum_ir.ir import Cascade
from einsum_ir.params import result_dtype
from einsum_ir.lowering.merge import Merge, Rule, derive


@dataclass(frozen=True)
class PartialState:
    merge: Merge
    values: Mapping[str, torch.Tensor]  # carried value (and the count) -> tensor over its indices
    args: Mapping  # the call's inputs and runtime params (the epilogue may read them)

    def finalize(self):
        """The cascade's outputs from this state: one tensor or a tuple, like the kernel."""
        m = self.merge
        values = dict(self.values)
        if m.finish.einsums:
            given = {d.name: (values[d.name] if d.name in values else self.args[d.name]) for d in m.finish.inputs}
            runtime = {p.name: self.args[p.name] for p in m.finish.params if p.type is not None}
            result = interpret(m.finish, **given, **runtime)
            values.update(zip(m.finish.output_names, result if isinstance(result, tuple) else (result,)))
        outs = []
        for o in m.cascade.outputs:
            v = values[o.name]
            ranks = (m.finish if o.name in m.finish.tensors else m.partial).tensors[o.name].ranks
            outs.append(torch.where(self.present(ranks), v, torch.full((), o.fill, dtype=v.dtype)).to(self._dtype()))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def present(self, ranks: tuple[str, ...]) -> torch.Tensor:
        """Where a value over `ranks` is present: a point of some row it covers was seen (a
        bool tensor broadcasting over `ranks`)."""
        rows = self.merge.partial.tensors[self.merge.count].ranks
        count = self.values[self.merge.count]
        if set(rows) - set(ranks):
            count = count.sum([k for k, r in enumerate(rows) if r not in ranks])
        return _aligned(count, tuple(r for r in rows if r in ranks), ranks) > 0

    def _dtype(self) -> torch.dtype:
        return result_dtype({n: v for n, v in self.args.items() if isinstance(v, torch.Tensor)})


class Partials:
    """A cascade's partial kernel on one backend, built on first use."""

    def __init__(self, cascade: Cascade, compiler: Callable[[Cascade], Callable]):
        self.cascade, self.compiler = cascade, compiler

    @cached_property
    def merge(self) -> Merge:
        return derive(self.cascade)

    @cached_property
    def kernel(self) -> Callable:
        return self.compiler(self.merge.partial)

    def __call__(self, keys: tuple[int, int], args: Mapping) -> PartialState:
        m = self.merge
        lo, hi = (int(k) for k in keys)
        unknown = [k for k in args if k not in _declared(self.cascade)]
        if unknown:
            raise BindError(f"unexpected argument(s) {', '.join(unknown)}")
        wanted = _declared(m.partial)  # the partial kernel reads no more than the forward: pass it what it declares
        result = self.kernel(**{k: v for k, v in args.items() if k in wanted}, **{m.key_lo: lo, m.key_hi: max(lo, hi)})
        result = result if isinstance(result, tuple) else (result,)
        return PartialState(m, dict(zip(m.partial.output_names, result)), dict(args))


def _declared(c: Cascade) -> set[str]:
    return set(c.input_names) | set(c.dims) | {p.name for p in c.params}


def merge(cascade: Cascade, states: Sequence[PartialState]) -> PartialState:
    """The state over the union of the states' (disjoint) key ranges."""
    if not states:
        raise ValueError("merge needs at least one partial state")
    m = states[0].merge
    if any(s.merge.cascade != cascade for s in states):
        raise ValueError("every state must come from this cascade's kernels")
    stacked = {n: torch.stack([s.values[n] for s in states]) for n in [r.name for r in m.rules] + [m.count]}
    return PartialState(m, merge_stacked(m, stacked), states[0].args)


def merge_stacked(m: Merge, stacked: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The merged carried values (and count) of parts stacked along a leading dim: the states
    of `merge`, or a split-KV kernel's outputs (one part per split; codegen/combine.py)."""
    merged: dict[str, torch.Tensor] = {}
    for r in m.rules:
        parts = stacked[r.name].to(torch.promote_types(stacked[r.name].dtype, torch.float32))
        if r.reduce == "max":
            merged[r.name] = parts.amax(0)
        elif r.reduce == "min":
            merged[r.name] = parts.amin(0)
        else:
            merged[r.name] = (parts * _factor(r, m, stacked, merged)).sum(0)
    merged[m.count] = stacked[m.count].sum(0)
    return merged


_PART = "#part"  # the leading dim of stacked parts, as an index name no cascade spells


def _factor(r: Rule, m: Merge, stacked: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor]):
    """Each part's rescale factor, over (part, the sum's indices): the rule's sympy factor with
    the parts' maxima as the old values and the merged maxima as the new (a merged max of -inf,
    a row no part saw, counts as 0 so that the factor stays finite)."""
    if r.factor == 1:
        return 1.0
    env = {}
    for sym in r.factor.free_symbols:
        name = sym.name[2:]
        new = name.endswith("_new")
        x = name[:-4] if new else name
        rule = next(q for q in m.rules if q.name == x)
        if new:
            v = torch.where(torch.isneginf(merged[x]), torch.zeros((), dtype=merged[x].dtype), merged[x])
            env[sym] = _aligned(v, rule.indices, r.indices)
        else:
            env[sym] = _aligned(stacked[x].to(merged[x].dtype), (_PART,) + rule.indices, (_PART,) + r.indices)
    return _evaluate(r.factor, env)


def _aligned(t: torch.Tensor, have: tuple[str, ...], want: tuple[str, ...]) -> torch.Tensor:
    """`t` over indices `have` as a tensor broadcasting over `want` (a subsequence of it)."""
    order = [i for i in want if i in have]
    t = t.permute([have.index(i) for i in order])
    return t.reshape([t.shape[order.index(i)] if i in have else 1 for i in want])


def _evaluate(e: sympy.Expr, env: Mapping[sympy.Symbol, torch.Tensor]):
    """A rescale factor (powers of 2 or e of sums of maxima, and their max/min with constants)
    evaluated on tensors."""
    if e in env:
        return env[e]
    if e.is_Number:
        return float(e)
    if e.is_Add:
        return sum(_evaluate(a, env) for a in e.args)
    if e.is_Mul:
        out = 1.0
        for a in e.args:
            out = out * _evaluate(a, env)
        return out
    if e.is_Pow:
        base, exp = e.args
        x = _evaluate(exp, env)
        if base == 2:
            return torch.exp2(x) if isinstance(x, torch.Tensor) else 2.0 ** x
        return torch.pow(float(base), x) if base.is_Number else torch.pow(_evaluate(base, env), x)
    if isinstance(e, sympy.exp):
        return torch.exp(_evaluate(e.args[0], env))
    if isinstance(e, (sympy.Max, sympy.Min)):  # a row scale's max(-G, 0) (lowering.underflow)
        pick = torch.maximum if isinstance(e, sympy.Max) else torch.minimum
        out = torch.as_tensor(_evaluate(e.args[0], env))
        for a in e.args[1:]:
            out = pick(out, torch.as_tensor(_evaluate(a, env)))
        return out
    raise ValueError(f"cannot evaluate the rescale factor {e}")

