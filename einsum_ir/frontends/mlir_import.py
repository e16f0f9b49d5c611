"""torch-mlir import: PyTorch -> linalg-on-tensors -> cascade (the export is `mlir_export`).

    c = ei.from_torch(attention_fn, q, k, v, names=["Q", "K", "V"],
                      ranks={"Q": "B H P E", "K": "B H M E", "V": "B H M F"})

`from_torch` exports with `torch_mlir.fx.export_and_import(..., output_type="linalg-on-tensors")`
and *raises* the function body:
- `linalg.generic`, `matmul`, `batch_matmul` become Einsums: each indexing map gives the
  accesses, the iterator types the reduced indices, the body's arith/math ops the expression,
  and a reduction's combiner (`addf`, `maximumf`, ...) its reduce op;
- `fill` (of a reduction's neutral value), `transpose`, `collapse_shape`, `expand_shape` and
  pure broadcasts (`yield %in`) become views, not Einsums: ranks are tracked through them,
  so a `repeat_kv` broadcast becomes GQA ranks and K/V are read once.

Ranks are found by unifying the loop dimensions every op shares with its operands; a rank
that a reshape splits (H = G x R) is replaced by its parts everywhere, so an input may be
declared with more dims than the tensor passed to `from_torch` (the caller reshapes it; the
cascade's `inputs` say how). Example inputs should have every dim larger than 1, since size-1
dims are taken for broadcast dims.

torch-mlir is an optional extra (`pip install torch-mlir`), imported on first use.
"""
from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass

from einsum_ir.functions import FUNCTIONS
from einsum_ir.ir import (
    REDUCE_IDENTITY,
    Access, Binary, Call, Cascade, Einsum, Expr, Index, InputDecl, Name, Num, Output, Unary,
)

COMBINERS = {"arith.addf": "sum", "arith.maximumf": "max", "arith.maxnumf": "max",
             "arith.minimumf": "min", "arith.minnumf": "min", "arith.mulf": "prod"}
BINARY = {"arith.addf": "+", "arith.subf": "-", "arith.mulf": "*", "arith.divf": "/",
          "arith.addi": "+", "arith.subi": "-", "arith.muli": "*"}
# body ops that are functions: the registry's own ops, and the NaN-ignoring min/max variants
FUNCS = {f.mlir: f.name for f in FUNCTIONS.values() if f.mlir and f.mlir != "arith.select"}
FUNCS |= {"arith.maxnumf": "max", "arith.minnumf": "min"}
CASTS = ("arith.extf", "arith.truncf", "arith.sitofp", "arith.uitofp", "arith.index_cast",
         "arith.extsi", "arith.extui")
# arith.cmpf / arith.cmpi predicate codes (the attributes print as integers)
CMPF = {1: "==", 2: ">", 3: ">=", 4: "<", 5: "<=", 6: "!=", 8: "==", 9: ">", 10: ">=", 11: "<",
        12: "<=", 13: "!="}
CMPI = {0: "==", 1: "!=", 2: "<", 3: "<=", 4: ">", 5: ">=", 6: "<", 7: "<=", 8: ">", 9: ">="}


class RaiseError(ValueError):
    """linalg that does not raise into a cascade; the message names the op and why."""


def _torch_mlir():
    try:
        import torch_mlir.fx
        import torch_mlir.ir
    except ImportError as err:
        raise ImportError("the torch-mlir frontend needs torch-mlir: pip install torch-mlir "
                          "(the einsum-ir extra 'mlir')") from err
    return torch_mlir


def export_linalg(module_or_fn, *example_inputs):
    """The linalg-on-tensors MLIR module torch-mlir exports for `module_or_fn`."""
    import torch

    tm = _torch_mlir()
    module = module_or_fn if isinstance(module_or_fn, torch.nn.Module) else _as_module(module_or_fn)
    return tm.fx.export_and_import(module, *example_inputs, output_type="linalg-on-tensors")


def from_torch(module_or_fn, *example_inputs, names: list[str] | None = None,
               ranks: dict[str, str] | None = None) -> Cascade:
    """Export `module_or_fn` with torch-mlir and raise its linalg into a cascade.

    `names` names the inputs (default X0, X1, ...); `ranks` names each input's ranks, e.g.
    {"Q": "B H P E"} (unnamed ranks get D0, D1, ...). The output is named O.
    """
    return raise_module(export_linalg(module_or_fn, *example_inputs), names=names, ranks=ranks)


def parse_mlir(text: str):
    """Parse MLIR text with torch-mlir's parser (and verify it)."""
    tm = _torch_mlir()
    module = tm.ir.Module.parse(text, tm.ir.Context())
    if not module.operation.verify():
        raise RaiseError("the module does not verify")
    return module


def raise_module(module, names: list[str] | None = None,
                 ranks: dict[str, str] | None = None) -> Cascade:
    """Raise the single function of a linalg-on-tensors module into a cascade."""
    funcs = [op for op in module.body.operations if op.operation.name == "func.func"]
    if len(funcs) != 1:
        raise RaiseError(f"expected one func.func, found {len(funcs)}")
    return _Raiser(funcs[0], names, ranks or {}).run()


def _as_module(fn):
    """A function as an nn.Module, which torch.export needs."""
    import torch

    class Fn(torch.nn.Module):
        def forward(self, *args):
            return fn(*args)

    return Fn()


# ---------------------------------------------------------------------------- ranks


@dataclass(eq=False)
class _Rank:
    """A rank variable: unified with others, or expanded into a sequence of finer ranks."""

    size: int
    name: str | None = None
    parent: "_Rank | None" = None
    parts: tuple["_Rank", ...] | None = None

    def root(self) -> "_Rank":
        r = self
        while r.parent is not None:
            r = r.parent
        return r

    def leaves(self) -> tuple["_Rank", ...]:
        r = self.root()
        if r.parts is None:
            return (r,)
        return tuple(leaf for p in r.parts for leaf in p.leaves())


def _leaves(group) -> tuple[_Rank, ...]:
    return tuple(leaf for r in group for leaf in r.leaves())


def _union(a: _Rank, b: _Rank) -> None:
    ra, rb = a.root(), b.root()
    if ra is rb:
        return
    if ra.size != rb.size:
        raise RaiseError(f"a dim of size {ra.size} meets one of size {rb.size}")
    if ra.parts is not None and rb.parts is not None:
        _unify(ra.parts, rb.parts)
    keep, drop = (ra, rb) if ra.parts is not None or rb.parts is None else (rb, ra)
    keep.name = keep.name or drop.name
    drop.parent = keep


def _unify(g1, g2) -> None:
    """Unify two groups of ranks (one dim each after collapses), aligning them by size."""
    a, b = list(_leaves(g1)), list(_leaves(g2))
    if len(a) == len(b):
        for x, y in zip(a, b):
            _union(x, y)
        return
    while a and b:
        x, y = a.pop(0), b.pop(0)
        if x.size == y.size:
            _union(x, y)
            continue
        # One rank covers several of the other side's: split it into them (H -> G x R).
        big, small, rest = (x, [y], b) if x.size > y.size else (y, [x], a)
        while math.prod(r.size for r in small) < big.size and rest:
            small.append(rest.pop(0))
        if math.prod(r.size for r in small) != big.size:
            raise RaiseError(f"dims of sizes {[r.size for r in small]} do not make one of {big.size}")
        root = big.root()
        root.parts = tuple(small)
    if a or b:
        raise RaiseError("grouped dims do not line up")


@dataclass
class _Val:
    """An SSA tensor: a cascade tensor seen through a view (one rank group per dim).

    A group may be empty (a size-1 broadcast dim) or hold ranks the tensor does not store
    (a broadcast), so transposes, reshapes and broadcasts need no Einsum.
    """

    tensor: str | None  # None for a constant fill
    view: list[tuple[_Rank, ...]]
    shape: tuple[int, ...]
    fill: float | None = None


@dataclass
class _Tensor:
    name: str
    storage: list[_Rank]  # its dims in memory order


@dataclass
class _Pending:
    """An Einsum whose index names wait until every rank is unified and named."""

    target: str
    loops: list  # the rank group of each loop dim
    accesses: list  # the _Val of each operand
    expr: object  # (accesses, index of loop dim) -> Expr
    reduce: str = "sum"


class _Raiser:
    def __init__(self, func, names, ranks):
        self.func = func
        self.names = names
        self.rank_names = ranks
        self.vals: dict = {}  # MLIR Value -> _Val or a scalar constant
        self.tensors: dict[str, _Tensor] = {}
        self.einsums: list[_Pending] = []
        self.count = 0

    # -- driver

    def run(self) -> Cascade:
        block = self.func.regions[0].blocks[0]
        args = list(block.arguments)
        names = self.names or [f"X{k}" for k in range(len(args))]
        if len(names) != len(args):
            raise RaiseError(f"{len(names)} names for {len(args)} inputs")
        for name, arg in zip(names, args):
            shape = _shape(arg.type)
            storage = [_Rank(s) for s in shape]
            for r, n in zip(storage, self.rank_names.get(name, "").split()):
                r.name = n
            self.tensors[name] = _Tensor(name, storage)
            self.vals[arg] = _Val(name, [(r,) for r in storage], shape)
        for op in block.operations:
            kind = op.operation.name
            if kind == "func.return":
                return self._finish([self._val(v) for v in op.operands], names)
            handler = {
                "arith.constant": self._constant, "tensor.empty": self._empty,
                "linalg.fill": self._fill, "linalg.transpose": self._transpose,
                "tensor.collapse_shape": self._collapse, "tensor.expand_shape": self._expand,
                "linalg.generic": self._generic, "linalg.matmul": self._matmul,
                "linalg.batch_matmul": self._matmul,
            }.get(kind)
            if handler is None:
                raise RaiseError(f"{kind} has no cascade meaning here")
            handler(op)
        raise RaiseError("the function has no return")

    def _val(self, v):
        try:
            return self.vals[v]
        except KeyError:
            raise RaiseError(f"value {v.get_name()} is not defined by a raised op") from None

    # -- view and constant ops

    def _constant(self, op) -> None:
        self.vals[op.results[0]] = _scalar_attr(op.attributes["value"])

    def _empty(self, op) -> None:
        shape = _shape(op.results[0].type)
        self.vals[op.results[0]] = _Val(None, [(_Rank(s),) for s in shape], shape)

    def _fill(self, op) -> None:
        value = self._val(op.operands[0])
        shape = _shape(op.results[0].type)
        self.vals[op.results[0]] = _Val(None, [(_Rank(s),) for s in shape], shape, fill=value)

    def _transpose(self, op) -> None:
        src = self._val(op.operands[0])
        perm = list(_int_array(op.attributes["permutation"]))
        self.vals[op.results[0]] = _Val(src.tensor, [src.view[p] for p in perm],
                                              tuple(src.shape[p] for p in perm), src.fill)

    def _collapse(self, op) -> None:
        src = self._val(op.operands[0])
        view = [tuple(r for d in dims for r in src.view[d]) for dims in _reassociation(op)]
        self.vals[op.results[0]] = _Val(src.tensor, view, _shape(op.results[0].type), src.fill)

    def _expand(self, op) -> None:
        src = self._val(op.operands[0])
        shape = _shape(op.results[0].type)
        view: list = [()] * len(shape)
        for group, dims in zip(src.view, _reassociation(op)):
            real = [d for d in dims if shape[d] != 1]
            if len(real) == 1:
                view[real[0]] = group
            elif real:
                fresh = [_Rank(shape[d]) for d in real]
                _unify(group, fresh)
                for d, r in zip(real, fresh):
                    view[d] = (r,)
        self.vals[op.results[0]] = _Val(src.tensor, view, shape, src.fill)

    # -- computing ops

    def _matmul(self, op) -> None:
        a, b = (self._val(v) for v in op.operands[:2])
        out = self._val(op.operands[2])
        batch = op.operation.name == "linalg.batch_matmul"
        # loops (batch), i, j, k: A[(b,) i, k] * B[(b,) k, j] -> C[(b,) i, j]
        n = 4 if batch else 3
        maps = ([[0, 1, 3], [0, 3, 2], [0, 1, 2]] if batch else [[0, 2], [2, 1], [0, 1]])
        loops: list = [None] * n
        for val, dims in zip((a, b), maps[:2]):
            self._bind(loops, val, dims)
        if out.fill != 0.0:
            raise RaiseError(f"{op.operation.name} accumulates into a tensor that is not zeros")
        self._bind_free(loops, _shape(op.results[0].type), maps[2])
        self._emit(op.results[0], loops, maps[2], [a, b],
                   lambda acc, index: Binary("*", acc[0], acc[1]), "sum")

    def _generic(self, op) -> None:
        maps = [_map_results(m) for m in op.attributes["indexing_maps"]]
        iters = [str(t).split("<")[-1].rstrip(">") for t in op.attributes["iterator_types"]]
        n_out = len(op.results)
        ins = [self._val(v) for v in op.operands[:len(op.operands) - n_out]]
        outs = [self._val(v) for v in op.operands[len(op.operands) - n_out:]]
        loops: list = [None] * len(iters)
        for val, m in zip(ins, maps):
            if not isinstance(val, _Val):
                raise RaiseError("a scalar operand of linalg.generic")
            self._bind(loops, val, m)
        body = op.regions[0].blocks[0]
        args = list(body.arguments)
        yields = next(o for o in body.operations if o.operation.name == "linalg.yield").operands
        reduced = [k for k, t in enumerate(iters) if t == "reduction"]
        for k, (result, out_val, out_map) in enumerate(zip(op.results, outs, maps[len(ins):])):
            if n_out > 1 and not list(result.uses):
                continue  # e.g. the argmax beside a max: never read
            self._bind_free(loops, _shape(result.type), out_map)
            tree = _Body(body, args[:len(ins)], args[len(ins) + k], self.vals)
            expr_fn, reduce = tree.yielded(yields[k], bool(reduced))
            if reduced and out_val.fill != REDUCE_IDENTITY[reduce]:
                raise RaiseError(f"a {reduce} reduction starts from {out_val.fill}, not "
                                 f"{REDUCE_IDENTITY[reduce]}")
            copy = tree.in_pos.get(yields[k])
            if copy is not None and not reduced:  # a copy or broadcast: a view, no Einsum
                self._alias(result, ins[copy], out_map, loops)
                continue
            self._emit(result, loops, out_map, ins, expr_fn, reduce)

    def _bind(self, loops: list, val: _Val, dims) -> None:
        for group, d in zip(val.view, dims):
            if d is None:  # a constant 0 index: a size-1 broadcast dim
                if _leaves(group):
                    raise RaiseError("a constant index into a dim that is not size 1")
                continue
            if loops[d] is None:
                loops[d] = group
            else:
                _unify(loops[d], group)

    def _bind_free(self, loops: list, shape, out_map) -> None:
        for size, d in zip(shape, out_map):
            if d is not None and loops[d] is None:
                loops[d] = (_Rank(size),)
        for k, g in enumerate(loops):
            if g is None:
                raise RaiseError(f"loop d{k} is bound by no operand")

    def _alias(self, result, src: _Val, out_map, loops) -> None:
        """`yield %in`: the output is the input seen with broadcast dims added."""
        view = [() if d is None else loops[d] for d in out_map]
        self.vals[result] = _Val(src.tensor, view, _shape(result.type), src.fill)

    def _emit(self, result, loops, out_map, ins, expr_fn, reduce) -> None:
        self.count += 1
        name = f"T{self.count}"
        view = [() if d is None else loops[d] for d in out_map]
        self.tensors[name] = _Tensor(name, [r for g in view for r in g])
        self.vals[result] = _Val(name, view, _shape(result.type))
        self.einsums.append(_Pending(name, loops, list(ins), expr_fn, reduce))

    # -- the cascade

    def _finish(self, results: list, names: list[str]) -> Cascade:
        if len(results) != 1 or not isinstance(results[0], _Val) or results[0].tensor is None:
            raise RaiseError("the function must return one computed tensor")
        out = results[0]
        out_ranks = [r for g in out.view for r in _leaves(g)]
        stored = _leaves(self.tensors[out.tensor].storage)
        if out.tensor in names or tuple(out_ranks) != stored:
            # The result is a view (transpose, broadcast) or an input: materialize it.
            self.tensors["O"] = _Tensor("O", out_ranks)
            self.einsums.append(_Pending("O", list(out.view), [out], lambda acc, index: acc[0]))
        else:
            self._rename(out.tensor, "O")
        self._name_ranks()
        einsums = [self._einsum(p) for p in self.einsums]
        used = sorted({r.root().name for t in self.tensors.values() for r in _leaves(t.storage)},
                      key=self._rank_order)
        inputs = tuple(InputDecl(n, tuple(r.root().name.lower() for r in _leaves(self.tensors[n].storage)))
                       for n in names)
        return Cascade(dims=tuple(used), einsums=tuple(einsums), outputs=(Output("O"),), inputs=inputs)

    def _rename(self, old: str, new: str) -> None:
        self.tensors[new] = self.tensors.pop(old)
        self.tensors[new].name = new
        for p in self.einsums:
            if p.target == old:
                p.target = new
        for v in self.vals.values():
            if isinstance(v, _Val) and v.tensor == old:
                v.tensor = new

    def _name_ranks(self) -> None:
        """Name unnamed ranks D0, D1, ...; remember first-appearance order for `dims`."""
        taken = {r.root().name for t in self.tensors.values() for r in _leaves(t.storage)}
        self.order: list[_Rank] = []
        counter = 0
        stored = [_leaves(t.storage) for t in self.tensors.values()]
        looped = [_leaves(g) for p in self.einsums for g in p.loops]  # e.g. E, only ever reduced
        for group in stored + looped:
            for r in group:
                root = r.root()
                if root.name is None:
                    while f"D{counter}" in taken:
                        counter += 1
                    root.name = f"D{counter}"
                    taken.add(root.name)
                if root not in self.order:
                    self.order.append(root)

    def _rank_order(self, name: str) -> int:
        return next(k for k, r in enumerate(self.order) if r.name == name)

    def _access(self, val: _Val) -> Expr:
        if val.tensor is None:
            return Num(val.fill)
        return Access(val.tensor, tuple(Index(r.root().name.lower())
                                        for r in _leaves(self.tensors[val.tensor].storage)))

    def _einsum(self, p: _Pending) -> Einsum:
        target = Access(p.target, tuple(Index(r.root().name.lower())
                                        for r in _leaves(self.tensors[p.target].storage)))
        accesses = [self._access(v) for v in p.accesses]

        def index(d: int) -> Expr:
            group = _leaves(p.loops[d])
            if len(group) != 1:
                raise RaiseError("linalg.index over a collapsed dim")
            return Index(group[0].root().name.lower())

        return Einsum(target, p.expr(accesses, index), reduce=p.reduce)


class _Body:
    """A linalg.generic region as an expression over its block arguments."""

    def __init__(self, block, in_args, out_arg, outer: dict):
        self.defs = {}
        for op in block.operations:
            for r in op.results:
                self.defs[r] = op
        self.in_pos = {a: k for k, a in enumerate(in_args)}
        self.out = out_arg
        self.outer = outer

    def yielded(self, value, reduction: bool):
        """(expr builder, reduce op) for the yielded value."""
        if not reduction:
            if self._reads_out(value):
                raise RaiseError("a parallel linalg.generic reads its output")
            return self._builder(value), "sum"
        op = self.defs.get(value)
        kind = op.operation.name if op is not None else None
        if kind not in COMBINERS:
            raise RaiseError(f"reduction combiner {kind} is not add/max/min/mul")
        a, b = op.operands
        x = b if a == self.out else a if b == self.out else None
        if x is None or self._reads_out(x):
            raise RaiseError("a reduction whose body is not combine(f(inputs), out)")
        return self._builder(x), COMBINERS[kind]

    def _reads_out(self, v) -> bool:
        if v == self.out:
            return True
        op = self.defs.get(v)
        return op is not None and any(self._reads_out(o) for o in op.operands)

    def _builder(self, value):
        return lambda accesses, index: self._expr(value, accesses, index)

    def _expr(self, v, acc, index) -> Expr:
        k = v
        if k in self.in_pos:
            return acc[self.in_pos[k]]
        if k in self.outer and not isinstance(self.outer[k], _Val):
            return Num(self.outer[k])
        op = self.defs.get(k)
        if op is None:
            raise RaiseError(f"value {v.get_name()} is not known in the body")
        kind = op.operation.name
        known = (kind in CASTS or kind in FUNCS or kind in BINARY or
                 kind in ("arith.constant", "arith.negf", "arith.cmpf", "arith.cmpi", "arith.select",
                          "linalg.index"))
        if not known:
            raise RaiseError(f"body op {kind} has no expression form")
        args = [self._expr(o, acc, index) for o in op.operands]
        if kind == "arith.constant":
            return Num(_scalar_attr(op.attributes["value"]))
        if kind in CASTS:
            return args[0]
        if kind in FUNCS:
            return Call(FUNCS[kind], tuple(args))
        if kind in BINARY:
            return Binary(BINARY[kind], args[0], args[1])
        if kind == "arith.negf":
            return Unary("-", args[0])
        if kind in ("arith.cmpf", "arith.cmpi"):
            code = int(str(op.attributes["predicate"]).split(":")[0])
            table = CMPF if kind == "arith.cmpf" else CMPI
            if code not in table:
                raise RaiseError(f"{kind} predicate {code} (ordered/unordered checks)")
            return Binary(table[code], args[0], args[1])
        if kind == "arith.select":
            cond = args[0]
            if isinstance(cond, Binary) and cond.op == "!=" and cond.rhs == Num(0.0):
                cond = cond.lhs  # `x != 0` is how a stored 0/1 predicate is read back
            return Call("where", (cond, *args[1:]))
        return index(int(str(op.attributes["dim"]).split(":")[0].strip()))  # linalg.index


# ---------------------------------------------------------------------------- MLIR helpers


def _shape(t) -> tuple[int, ...]:
    text = str(t)
    inner = text[text.index("<") + 1:text.rindex(">")]
    parts = inner.split("x")
    return tuple(int(p) for p in parts[:-1])


def _scalar_attr(attr):
    text = str(attr)
    value, _, _ = text.partition(":")
    value = value.strip()
    if value.startswith("0x"):
        bits = int(value, 16)
        return struct.unpack(">f", bits.to_bytes(4, "big"))[0] if len(value) <= 10 else \
            struct.unpack(">d", bits.to_bytes(8, "big"))[0]
    if value in ("true", "false"):
        return value == "true"
    number = float(value)
    return int(number) if number.is_integer() and "." not in value and "e" not in value else number


def _int_array(attr) -> list[int]:
    """`array<i64: 0, 1, 3, 2>` -> [0, 1, 3, 2]."""
    return [int(x) for x in re.findall(r"-?\d+", str(attr).split(":", 1)[1])]


def _reassociation(op) -> list[list[int]]:
    text = str(op.attributes["reassociation"])
    groups = []
    for chunk in text.strip()[1:-1].split("]"):
        nums = [int(x) for x in chunk.replace("[", " ").replace(",", " ").split() if x.lstrip("-").isdigit()]
        if nums:
            groups.append(nums)
    return groups


def _map_results(attr) -> list[int | None]:
    """An indexing map's results: loop positions, None for a constant 0."""
    from torch_mlir import ir

    amap = ir.AffineMapAttr(attr).value
    out = []
    for e in amap.results:
        e = e.maybe_downcast()
        if isinstance(e, ir.AffineDimExpr):
            out.append(e.position)
        elif isinstance(e, ir.AffineConstantExpr) and e.value == 0:
            out.append(None)
        else:
            raise RaiseError(f"indexing map result {e} is not a loop dim or 0")
    return out
