"""The reference interpreter: the semantics every lowering is checked against (DESIGN section 2).

Values are *labeled tensors*: a torch tensor whose dimensions are named by index variables,
plus an optional boolean mask of the points that are present. Maps broadcast by label and
intersect masks; reductions skip absent points; outputs materialize absent points as their
fill value. Sum reductions over products run through `torch.einsum`, so a contraction never
materializes its full iteration space. Recurrences loop over their rank's steps only (one
vectorized evaluation per step, never per point).

A value may carry an exponent: `data * e^exp`, where `exp` (same labels, broadcastable) keeps
what the dtype cannot. A function with an exponential tail (the registry's `scaled`: f(x) ~ e^x
as x -> -inf, softplus and sigmoid) is evaluated below TAIL as f's scaled form e^-x f(x) with
exponent x, so a weight of e^-1e4 is not 0. Products add exponents and quotients subtract them;
a sum reduction scales its terms by e^(exp - max exp) over the reduced indices and keeps the max
as its exponent, so `sum_m f(x) V / sum_m f(x)` of a row whose weights all underflow is its true
value (softmax of x, in the limit), not 0/0. Anything else (+, comparisons, other functions,
max/min reductions, recurrences, outputs) sees the plain value `data * e^exp`, as before.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass

import networkx as nx
import torch

from einsum_ir.errors import BindError
from einsum_ir.builtins import PREDICATES
from einsum_ir.functions import FUNCTIONS, UNIONS, torch_function, torch_operator, torch_union
from einsum_ir.graph import dependency_graph, recurrence_position, topological_einsums
from einsum_ir.ir import (
    DEFAULT_TILE, REDUCE_IDENTITY,
    COMPARISON_OPS, Access, Binary, Call, Cascade, Einsum, Expr, Index, Name, Num, Unary, product_terms,
    rank_of,
)
from einsum_ir.params import bind_shapes, evaluate_params

# Below TAIL a function with a scaled form is kept as (e^-x f(x), exponent x): there f(x) is
# e^x to 4e-18 (relative), so nothing above it changes, and fp32 (fp64) would underflow at
# -104 (-745).
TAIL = -40.0

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                "fp64": torch.float64, "bool": torch.bool, "int8": torch.int8,
                "int16": torch.int16, "int32": torch.int32, "int64": torch.int64}


@dataclass
class Labeled:
    """A tensor whose dims are named; `mask` (same labels, broadcastable) marks present points."""

    data: torch.Tensor
    labels: tuple[str, ...]
    mask: torch.Tensor | None = None
    exp: torch.Tensor | None = None  # the value is data * e^exp (same labels, broadcastable)


def _plain(v: Labeled) -> Labeled:
    """`v` without an exponent: data * e^exp, rounded to the dtype (0 where it underflows)."""
    return v if v.exp is None else Labeled(v.data * torch.exp(v.exp), v.labels, v.mask)


def _exponents(values: list[Labeled], signs: list[int]) -> tuple[tuple[str, ...], torch.Tensor] | None:
    """The signed sum of the values' exponents, over the union of their labels; None if none has one."""
    carrying = [(v, s) for v, s in zip(values, signs) if v.exp is not None]
    if not carrying:
        return None
    labels = _union(*(v.labels for v, _ in carrying))
    total = None
    for v, sign in carrying:
        e = _align(v.exp, v.labels, labels) * sign
        total = e if total is None else total + e
    return labels, total


def _align(t: torch.Tensor, labels: tuple[str, ...], target: tuple[str, ...]) -> torch.Tensor:
    """Permute/unsqueeze `t` (dims `labels`) to broadcast against dims `target`."""
    if labels == target:
        return t
    order = [labels.index(l) for l in target if l in labels]
    t = t.permute(order) if order != list(range(len(order))) else t
    shape, it = [], iter(t.shape)
    for l in target:
        shape.append(next(it) if l in labels else 1)
    return t.reshape(shape)


def _union(*labelings: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(l for labels in labelings for l in labels))


def _and(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def _present(v: Labeled) -> torch.Tensor:
    """The data with absent points set to 0: what they hold is never part of a result, and a
    NaN there (exp(-inf - -inf) on a row that saw nothing) would poison autograd's gradients."""
    if v.mask is None or not v.data.is_floating_point():
        return v.data
    return torch.where(v.mask, v.data, torch.zeros((), dtype=v.data.dtype, device=v.data.device))


def _broadcast(values: list[Labeled]) -> tuple[tuple[str, ...], list[torch.Tensor], torch.Tensor | None]:
    labels = _union(*(v.labels for v in values))
    datas = [_align(_present(v), v.labels, labels) for v in values]
    mask = None
    for v in values:
        if v.mask is not None:
            mask = _and(mask, _align(v.mask, v.labels, labels))
    return labels, datas, mask


@dataclass
class _Stored:
    data: torch.Tensor
    mask: torch.Tensor | None
    exp: torch.Tensor | None = None  # aligned to the tensor's dims, broadcastable


class _Run:
    """One evaluation of a cascade: bound extents, scalars, and the tensors computed so far."""

    def __init__(self, c: Cascade, args: dict):
        self.c = c
        self.tensors: dict[str, _Stored] = {}
        self.fixed: dict[str, int] = {}  # index vars pinned to one step of a recurrence
        self.touched: dict[str, torch.Tensor] = {}  # per iterative tensor: some update was present
        self._bind(dict(args))

    # -- binding ------------------------------------------------------------------------

    def _bind(self, args: dict) -> None:
        c = self.c
        given = [d.name for d in c.inputs]
        missing = [n for n in given if n not in args]
        if missing:
            raise BindError(f"missing input tensor(s) {', '.join(missing)}; the cascade takes "
                            f"{', '.join(given)}")
        inputs, self.extent = bind_shapes(c, args)  # tensors of one floating dtype, extents agree
        floats = [t.dtype for t in inputs.values() if t.is_floating_point()]
        self.result_dtype = floats[0] if floats else torch.float32
        self.dtype = torch.float64 if torch.float64 in floats else torch.float32
        self.device = inputs[given[0]].device if given else torch.device("cpu")
        for d in c.inputs:
            t = inputs[d.name]
            want = TORCH_DTYPES[d.dtype] if d.dtype else None
            if want is not None and (want.is_floating_point != t.is_floating_point() or
                                     (want == torch.bool) != (t.dtype == torch.bool)):
                raise BindError(f"input {d.name} is declared {d.dtype} but the tensor is {t.dtype}")
            if t.device != self.device:
                raise BindError(f"input {d.name} is on {t.device}, others on {self.device}")
            data = t.to(self.dtype) if t.is_floating_point() else t
            self.tensors[d.name] = _Stored(data, None)
        for s in c.splits:
            tile = args.pop(s.inner, DEFAULT_TILE)
            if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
                raise BindError(f"tile {s.inner}={tile!r}: a tile is a positive integer")
            self.extent[s.inner] = tile
            if s.rank in self.extent:
                self.extent[s.outer] = -(-self.extent[s.rank] // tile)
        unbound = [r for r in c.ranks if r not in self.extent]
        if unbound:
            raise BindError(f"rank(s) {', '.join(unbound)} not bound by any input; pass them "
                            f"as keywords, e.g. {unbound[0]}=128")
        self.scalars: dict[str, float | int] = dict(self.extent)
        runtime = {p.name: args.pop(p.name) for p in c.params if p.name in args}
        self.scalars.update(evaluate_params(c, self.extent, runtime))
        if args:
            accepted = given + [p.name for p in c.params if p.type] + [s.inner for s in c.splits]
            raise BindError(f"unexpected argument(s) {', '.join(args)}; the cascade takes "
                            f"{', '.join(accepted)}")

    # -- expressions --------------------------------------------------------------------

    def _const(self, value: float | int) -> Labeled:
        dtype = torch.int64 if isinstance(value, int) else self.dtype
        return Labeled(torch.tensor(value, dtype=dtype, device=self.device), ())

    def eval(self, expr: Expr) -> Labeled:
        if isinstance(expr, Num):
            return self._const(expr.value)
        if isinstance(expr, Name):
            return self._const(self.scalars[expr.name])
        if isinstance(expr, Index):
            if expr.name in self.fixed:
                return self._const(self.fixed[expr.name])
            n = self.extent[rank_of(expr.name)]
            return Labeled(torch.arange(n, device=self.device), (expr.name,))
        if isinstance(expr, Access):
            return self._access(expr)
        if isinstance(expr, Unary):
            v = self.eval(expr.operand)
            if expr.op == "not":
                return Labeled(~self._truth(v), v.labels)
            return Labeled(-v.data, v.labels, v.mask, v.exp)
        if isinstance(expr, Binary):
            return self._binary(expr)
        assert isinstance(expr, Call)
        return self._call(expr)

    def _truth(self, v: Labeled) -> torch.Tensor:
        """A predicate value; absent points (e.g. reads out of bounds) count as false."""
        data = v.data if v.data.dtype == torch.bool else v.data != 0
        return data if v.mask is None else data & v.mask

    def _binary(self, e: Binary) -> Labeled:
        a, b = self.eval(e.lhs), self.eval(e.rhs)
        scaled = _exponents([a, b], [1, -1 if e.op == "/" else 1]) if e.op in ("*", "/") else None
        if scaled is not None:  # e^x * e^y = e^(x + y): the exponents add (subtract for /)
            a, b = (Labeled(v.data, v.labels, v.mask) for v in (a, b))
        else:
            a, b = _plain(a), _plain(b)
        if e.op in ("and", "or"):
            labels, (x, y), _ = _broadcast([Labeled(self._truth(a), a.labels), Labeled(self._truth(b), b.labels)])
            return Labeled(x & y if e.op == "and" else x | y, labels)
        labels, (x, y), mask = _broadcast([a, b])
        if e.op == "/" and not x.is_floating_point():
            x = x.to(self.dtype)  # index values divided exactly, in the compute dtype
        out = torch_operator(e.op)(x, y)
        if e.op in COMPARISON_OPS:
            return Labeled(out if mask is None else out & mask, labels)
        if scaled is not None:
            labels = _union(labels, scaled[0])
            return Labeled(_align(out, _union(a.labels, b.labels), labels), labels,
                           None if mask is None else _align(mask, _union(a.labels, b.labels), labels),
                           _align(scaled[1], scaled[0], labels))
        return Labeled(out, labels, mask)

    def _call(self, e: Call) -> Labeled:
        if e.fn in PREDICATES:  # a predicate builtin means its expansion
            v = self.eval(PREDICATES[e.fn].expand(e.args))
            return Labeled(self._truth(v), v.labels)
        args = [_plain(self.eval(a)) for a in e.args]
        scaled = FUNCTIONS[e.fn].scaled if e.fn in FUNCTIONS else None
        if scaled is not None and args[0].data.is_floating_point():
            return self._tail(e.fn, scaled, args[0])
        if e.fn in UNIONS:  # absent operands are the identity: present where any operand is
            labels = _union(*(a.labels for a in args))
            data, mask = torch_union(e.fn)([
                (_align(a.data if a.data.is_floating_point() else a.data.to(self.dtype), a.labels, labels),
                 None if a.mask is None else _align(a.mask, a.labels, labels)) for a in args])
            return Labeled(data, labels, mask)
        if e.fn == "where":
            cond = Labeled(self._truth(args[0]), args[0].labels)
            labels, (cd, ad, bd), mask = _broadcast([cond, args[1], args[2]])
            return Labeled(torch.where(cd, ad, bd), labels, mask)
        labels, datas, mask = _broadcast(args)
        datas = [d.to(self.dtype) if not d.is_floating_point() and e.fn not in ("max", "min") else d
                 for d in datas]
        return Labeled(torch_function(e.fn)(*datas), labels, mask)

    def _tail(self, fn: str, scaled: str, x: Labeled) -> Labeled:
        """f(x) for a function with a scaled form: below TAIL its scaled form e^-x f(x), with
        exponent x (see the module doc); f(x) itself elsewhere."""
        low = x.data < TAIL
        plain = torch_function(fn)(torch.where(low, torch.zeros((), dtype=x.data.dtype, device=x.data.device), x.data))
        if not bool(low.any()):
            return Labeled(torch_function(fn)(x.data), x.labels, x.mask)
        exponent = torch.where(low, x.data, torch.zeros((), dtype=x.data.dtype, device=x.data.device))
        tail = torch_function(scaled)(exponent, -exponent)
        return Labeled(torch.where(low, tail, plain), x.labels, x.mask, exponent)

    def _access(self, a: Access) -> Labeled:
        stored = self.tensors[a.tensor]
        plain = [i.name for i in a.indices if isinstance(i, Index) and i.name not in self.fixed]
        if len(plain) == len(a.indices) and len(set(plain)) == len(plain):
            return Labeled(stored.data, tuple(plain), stored.mask, stored.exp)
        positions = [self.eval(i) for i in a.indices]
        labels = _union(*(p.labels for p in positions))
        if stored.data.numel() == 0:  # every read of an empty tensor is outside it: absent
            return self._absent(labels)
        index_tensors, inside = [], None
        for pos, p in enumerate(positions):
            idx = _align(p.data.long(), p.labels, labels)
            size = stored.data.shape[pos]
            ok = (idx >= 0) & (idx < size)
            if p.mask is not None:  # an indirect index read outside its table: absent too
                ok = ok & _align(p.mask, p.labels, labels)
            inside = ok if inside is None else inside & ok
            index_tensors.append(idx.clamp(0, size - 1))
        data = stored.data[tuple(index_tensors)]
        exp = None if stored.exp is None else stored.exp.expand_as(stored.data)[tuple(index_tensors)]
        mask = inside
        if stored.mask is not None:
            mask = mask & stored.mask.expand_as(stored.data)[tuple(index_tensors)]
        if not labels:  # every index fixed: a scalar read
            data, mask = data.reshape(()), mask.reshape(())
            exp = None if exp is None else exp.reshape(())
        if bool(mask.all()):
            mask = None
        return Labeled(data, labels, mask, exp)

    # -- Einsums ------------------------------------------------------------------------

    def einsum(self, e: Einsum) -> Labeled:
        """Evaluate one Einsum over its free (non-fixed) iteration space."""
        lhs = tuple(v for v in e.lhs_vars if v not in self.fixed)
        reduced = tuple(v for v in e.reduced if v not in self.fixed)
        pred = None
        if e.where is not None:
            p = self.eval(e.where)
            pred = Labeled(self._truth(p), p.labels)
        if reduced and e.reduce == "sum":
            return self._contract(e.expr, pred, lhs, reduced)
        value = self.eval(e.expr)
        if reduced:  # a max, min or prod of plain values
            value = _plain(value)
        parts = [value] + ([pred] if pred is not None else [])
        labels, datas, mask = _broadcast(parts)
        if pred is not None:
            mask = _and(mask, datas[1])
        space = lhs + reduced
        data = _align(datas[0], labels, space)
        mask = None if mask is None else _align(mask, labels, space)
        if not reduced:
            return Labeled(data, space, mask, None if value.exp is None else _align(value.exp, value.labels, space))
        shape = [self.extent[rank_of(v)] for v in space]
        neutral = REDUCE_IDENTITY[e.reduce]
        if math.prod(shape[len(lhs):]) == 0:  # a reduction over an empty rank: no point, absent
            return self._absent(lhs)
        if mask is not None:
            data = torch.where(mask, data, torch.tensor(neutral, dtype=data.dtype, device=self.device))
        flat = data.expand(shape).reshape(shape[:len(lhs)] + [math.prod(shape[len(lhs):])])  # reduced as one
        out = {"max": torch.amax, "min": torch.amin, "prod": torch.prod}[e.reduce](flat, -1)
        out_mask = None if mask is None else mask.any(dim=tuple(range(len(lhs), len(space))))
        return Labeled(out, lhs, out_mask)

    def _absent(self, labels: tuple[str, ...]) -> Labeled:
        """Every point of `labels`' space absent."""
        shape = [self.extent[rank_of(v)] for v in labels]
        return Labeled(torch.zeros(shape, dtype=self.dtype, device=self.device), labels,
                       torch.zeros(shape, dtype=torch.bool, device=self.device))

    def _contract(self, expr: Expr, pred: Labeled | None, lhs: tuple[str, ...],
                  reduced: tuple[str, ...]) -> Labeled:
        """Sum over `reduced` of a sum of products, one torch.einsum per term."""
        if any(self.extent[rank_of(v)] == 0 for v in reduced):  # E=0: a sum over no point is absent
            return self._absent(lhs)
        terms = [(sign, [self._factor(f) for f in factors]) for sign, factors in product_terms(expr)]
        # A point is absent if any operand of the whole map is absent, across all terms.
        mask_parts = [Labeled(f.mask, f.labels) for _, fs in terms for f in fs if f.mask is not None]
        if pred is not None:
            mask_parts.append(pred)
        mask = None
        if mask_parts:
            mlabels, datas, _ = _broadcast(mask_parts)
            mask = Labeled(torch.stack(torch.broadcast_tensors(*datas)).all(dim=0), mlabels)
        space = lhs + reduced
        outs = []
        for sign, factors in terms:
            operands = [Labeled(f.data if f.mask is None else
                                torch.where(f.mask, f.data, torch.zeros((), dtype=f.data.dtype, device=self.device)),
                                f.labels) for f in factors]
            if mask is not None:
                operands = _fold_mask(operands, mask)
            exp = self._term_exponent(factors, mask, lhs, reduced)
            if exp is not None:  # the terms scaled by e^(exp - max exp), which the result keeps
                operands.append(exp[1])
                exp = exp[0]
            outs.append((sign, _einsum(operands, lhs, reduced, self.extent, self.dtype), exp))
        exp = None
        if any(e is not None for _, _, e in outs):  # one exponent for every term: their max
            exp = torch.stack(torch.broadcast_tensors(*[torch.zeros((), dtype=self.dtype, device=self.device)
                                                        if e is None else e for _, _, e in outs])).amax(0)
        total = None
        for sign, out, e in outs:
            if exp is not None:
                out = out * torch.exp((0.0 if e is None else e) - exp)
            total = out * sign if total is None else total + out * sign
        out_mask = None
        if mask is not None:  # present where any reduced point is; the mask's size-1 dims need no expanding
            out_mask = _align(mask.data, mask.labels, space).any(dim=tuple(range(len(lhs), len(space))))
        return Labeled(total, lhs, out_mask, exp)

    def _term_exponent(self, factors: list[Labeled], mask: Labeled | None, lhs: tuple[str, ...],
                       reduced: tuple[str, ...]) -> tuple[torch.Tensor, Labeled] | None:
        """For a product term whose factors carry exponents: (the max of its exponent over the
        reduced indices and present points, aligned to the left side; the factor e^(exp - max)
        that scales its points), or None."""
        found = _exponents(factors, [1] * len(factors))
        if found is None:
            return None
        labels, exp = found
        if mask is not None:
            labels = _union(labels, mask.labels)
            exp = torch.where(_align(mask.data, mask.labels, labels), _align(exp, found[0], labels),
                              torch.tensor(-math.inf, dtype=exp.dtype, device=exp.device))
        axes = tuple(k for k, l in enumerate(labels) if l in reduced)
        top = exp.amax(dim=axes, keepdim=True) if axes else exp
        top = torch.where(torch.isfinite(top), top, torch.zeros((), dtype=top.dtype, device=top.device))
        keep = tuple(l for l in labels if l not in reduced)
        scale = Labeled(torch.exp(exp - top), labels)
        top = top.reshape([n for k, n in enumerate(top.shape) if k not in axes])
        return _align(top, keep, lhs), scale

    def _factor(self, factor: tuple[bool, Expr]) -> Labeled:
        reciprocal, expr = factor
        v = self.eval(expr)
        data = v.data if v.data.is_floating_point() else v.data.to(self.dtype)
        exp = None if v.exp is None else (-v.exp if reciprocal else v.exp)
        return Labeled(1.0 / data if reciprocal else data, v.labels, v.mask, exp)

    # -- statements ---------------------------------------------------------------------

    def write(self, target: Access, value: Labeled, carry: bool) -> None:
        """Store `value` at the target; with `carry`, absent points keep the previous step."""
        name = target.tensor
        value = _plain(value)
        stored = self.tensors.get(name) or self._allocate(name)
        slot, free = [], []
        for idx in target.indices:
            if isinstance(idx, Index) and idx.name not in self.fixed:
                slot.append(slice(None))
                free.append(idx.name)
            else:  # a recurrence step (x or x+1, x pinned) or an init's constant step
                slot.append(int(self.eval(idx).data.item()))
        shape = [self.extent[rank_of(v)] for v in free]
        data = _align(value.data, value.labels, tuple(free)).expand(shape)
        present = (torch.ones(shape, dtype=torch.bool, device=self.device) if value.mask is None
                   else _align(value.mask, value.labels, tuple(free)).expand(shape))
        if carry:
            pos = self._step_position(name)
            previous = tuple(s - 1 if k == pos else s for k, s in enumerate(slot))
            data = torch.where(present, data, stored.data[previous])
            touched = self.touched.setdefault(name, torch.zeros_like(stored.mask))
            touched[tuple(slot)] = touched[previous] | present
            present = present | stored.mask[previous]
        stored.data[tuple(slot)] = data
        stored.mask[tuple(slot)] = present

    def _allocate(self, name: str) -> _Stored:
        """A buffer for a tensor written step by step; an iterative one holds steps 0..X."""
        pos = self._step_position(name)
        shape = [self.extent[r] + (1 if k == pos else 0) for k, r in enumerate(self.c.tensors[name].ranks)]
        stored = _Stored(torch.zeros(shape, dtype=self.dtype, device=self.device),
                         torch.zeros(shape, dtype=torch.bool, device=self.device))
        self.tensors[name] = stored
        return stored

    def _step_position(self, name: str) -> int | None:
        return next((p for e in self.c.writers(name) if (p := recurrence_position(e)) is not None), None)

    def run(self) -> tuple[torch.Tensor, ...]:
        c = self.c
        order = topological_einsums(c)
        iterative = {e.name for e in c.einsums if e.recurrence_var}
        loop_vars = {e.recurrence_var for e in c.einsums if e.recurrence_var}
        if len(loop_vars) > 1:
            raise BindError(f"the interpreter runs one recurrence rank per cascade, found {sorted(loop_vars)}")
        g = dependency_graph(c)
        tainted = set(iterative)
        for name in iterative:
            tainted |= nx.descendants(g, name)
        var = next(iter(loop_vars), None)
        body = [e for e in order if e.name in tainted and var in e.lhs_vars]
        before = [e for e in order if e.name not in tainted]
        after = [e for e in order if e.name in tainted and var not in e.lhs_vars]
        for e in before:
            self.tensors[e.name] = self._materialize(self.einsum(e), e)
        if body:
            for init in c.inits:
                self.write(init.target, self.eval(init.expr), carry=False)
            for name in iterative:  # no step present yet; with no step at all (M=0), none ever is
                self.touched[name] = torch.zeros_like(self.tensors[name].mask)
            for step in range(self.extent[rank_of(var)]):
                self.fixed = {var: step}
                for e in body:
                    self.write(e.target, self.einsum(e), carry=e.recurrence_var is not None)
            self.fixed = {}
            # Like a reduction over no present point, a recurrence whose every update was
            # absent has an absent value: past the loop, presence is "some step contributed".
            for name, touched in self.touched.items():
                self.tensors[name].mask = touched
        for e in after:
            self.tensors[e.name] = self._materialize(self.einsum(e), e)
        return tuple(self._output(o.name, o.fill) for o in c.outputs)

    def _materialize(self, value: Labeled, e: Einsum) -> _Stored:
        lhs = tuple(i.name for i in e.target.indices)
        shape = [self.extent[rank_of(v)] for v in lhs]
        data = _align(value.data, value.labels, lhs).expand(shape).to(self.dtype)
        mask = None if value.mask is None else _align(value.mask, value.labels, lhs).expand(shape)
        exp = None if value.exp is None else _align(value.exp, value.labels, lhs).to(self.dtype)
        return _Stored(data, mask, exp)

    def _output(self, name: str, fill: float) -> torch.Tensor:
        stored = self.tensors[name]
        data = stored.data if stored.exp is None else stored.data * torch.exp(stored.exp)
        if stored.mask is not None:
            data = torch.where(stored.mask, data, torch.tensor(fill, dtype=data.dtype, device=data.device))
        return data.contiguous().to(self.result_dtype)


def _fold_mask(operands: list[Labeled], mask: Labeled) -> list[Labeled]:
    """Multiply the mask into the first operand that spans its labels (keeps einsum paths small)."""
    for k, op in enumerate(operands):
        if set(mask.labels) <= set(op.labels):
            labels = op.labels
            m = _align(mask.data, mask.labels, labels)
            folded = torch.where(m, op.data, torch.zeros((), dtype=op.data.dtype, device=op.data.device))
            return operands[:k] + [Labeled(folded, labels)] + operands[k + 1:]
    return operands + [Labeled(mask.data.to(operands[0].data.dtype), mask.labels)]


def _einsum(operands: list[Labeled], out: tuple[str, ...], reduced: tuple[str, ...],
            extent: dict[str, int], dtype: torch.dtype) -> torch.Tensor:
    """torch.einsum over labeled operands; the result broadcasts against `out`."""
    letters: dict[str, str] = {}
    for label in [l for op in operands for l in op.labels] + list(out):
        letters.setdefault(label, string.ascii_letters[len(letters)])
    # Size-1 (broadcast) dims are squeezed: einsum does not broadcast a label across operands.
    tensors, specs = [], []
    for op in operands:
        keep = [k for k, l in enumerate(op.labels) if op.data.shape[k] != 1 or extent[rank_of(l)] == 1]
        tensors.append(op.data.reshape([op.data.shape[k] for k in keep]).to(dtype))
        specs.append("".join(letters[op.labels[k]] for k in keep))
    present = {ch for spec in specs for ch in spec}
    kept_out = tuple(l for l in out if letters[l] in present)
    result = torch.einsum(",".join(specs) + "->" + "".join(letters[l] for l in kept_out), *tensors)
    # A reduced index that no operand depends on sums identical terms: scale by its extent.
    for label in reduced:
        if label not in letters or letters[label] not in present:
            result = result * extent[rank_of(label)]
    return _align(result, kept_out, out)


def interpret(cascade: Cascade, **args) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Run `cascade` on torch tensors: inputs and runtime params by name, tile sizes optional.

    Returns one tensor when the cascade has one output, else a tuple in `output` order.
    """
    outs = _Run(cascade, args).run()
    return outs[0] if len(outs) == 1 else outs
