"""torch-mlir export: a cascade as one func.func of linalg.generic ops, as text.

    text = to_mlir(c, shapes={"B": 2, ...})     # linalg.generic text torch-mlir's parser reads

Function bodies come from the function registry (`einsum_ir.functions`): an entry's `mlir` op,
or its `decompose` into functions that have one.
"""
from __future__ import annotations

import math

from einsum_ir.functions import FUNCTIONS
from einsum_ir.ir import (
    REDUCE_IDENTITY, Access, Binary, Call, Cascade, Einsum, Expr, Index, Name, Num, Unary,
)

ARITH = {"+": "arith.addf", "-": "arith.subf", "*": "arith.mulf", "/": "arith.divf"}
CMPF_NAMES = {">": "ogt", ">=": "oge", "<": "olt", "<=": "ole", "==": "oeq", "!=": "une"}
COMBINE = {"sum": "arith.addf", "max": "arith.maximumf", "min": "arith.minimumf", "prod": "arith.mulf"}


def to_mlir(cascade: Cascade, shapes: dict[str, int], params: dict[str, float] | None = None) -> str:
    """The cascade as one func.func of linalg.generic ops (f32, static shapes), as text.

    Each Einsum becomes a linalg.generic: its accesses the indexing maps, its reduced
    indices the reduction iterators (initialized by a linalg.fill of the reduce op's neutral
    value), its expression the arith/math body. Runtime params take their values from
    `params`. Predicates, splits and recurrences are not emitted yet (ValueError says which).
    """
    from einsum_ir.graph import topological_einsums

    c = cascade
    for what, present in [("split ranks", c.splits), ("recurrences (init)", c.inits)]:
        if present:
            raise ValueError(f"to_mlir does not emit {what} yet")
    from einsum_ir.params import evaluate_params

    params = params or {}
    for p in c.params:
        if p.type is not None and p.name not in params:
            raise ValueError(f"runtime param {p.name} needs a value in params")
    runtime = {p.name: params[p.name] for p in c.params if p.type is not None}
    scalars = {**{d: float(n) for d, n in shapes.items()}, **evaluate_params(c, shapes, runtime)}

    def ttype(name: str) -> str:
        dims = "x".join(str(shapes[r]) for r in c.tensors[name].ranks)
        return f"tensor<{dims}xf32>" if dims else "tensor<f32>"

    lines = []
    args = ", ".join(f"%{d.name}: {ttype(d.name)}" for d in c.inputs)
    results = ", ".join(ttype(o.name) for o in c.outputs)
    lines.append(f"func.func @main({args}) -> ({results}) {{")
    for e in topological_einsums(c):
        if e.where is not None:
            raise ValueError(f"to_mlir does not emit predicates yet ({e.name} has a where)")
        lines += _generic_text(e, ttype, scalars)
    lines.append(f"  return {', '.join('%' + o.name for o in c.outputs)} : {results}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _generic_text(e: Einsum, ttype, scalars: dict) -> list[str]:
    space, out_type = e.space, ttype(e.name)
    operands: list[Access] = []
    for node in _accesses(e.expr):
        if node not in operands:
            operands.append(node)

    def amap(access: Access) -> str:
        names = []
        for idx in access.indices:
            if not isinstance(idx, Index):
                raise ValueError(f"to_mlir emits plain index accesses only, not {access}")
            names.append(f"d{space.index(idx.name)}")
        dims = ", ".join(f"d{k}" for k in range(len(space)))
        return f"affine_map<({dims}) -> ({', '.join(names)})>"

    name = e.name
    lines = [f"  %{name}_empty = tensor.empty() : {out_type}"]
    init = f"%{name}_empty"
    if e.reduced:
        lines.append(f"  %{name}_neutral = arith.constant {_float(REDUCE_IDENTITY[e.reduce])} : f32")
        lines.append(f"  %{name}_init = linalg.fill ins(%{name}_neutral : f32) outs(%{name}_empty : "
                     f"{out_type}) -> {out_type}")
        init = f"%{name}_init"
    maps = [amap(a) for a in operands] + [amap(e.target)]
    iters = ", ".join('"reduction"' if v in e.reduced else '"parallel"' for v in space)
    ins = ", ".join(f"%{a.tensor}" for a in operands)
    in_types = ", ".join(ttype(a.tensor) for a in operands)
    head = f"  %{name} = linalg.generic {{indexing_maps = [{', '.join(maps)}], iterator_types = [{iters}]}}"
    head += f" ins({ins} : {in_types})" if operands else ""
    lines.append(head + f" outs({init} : {out_type}) {{")
    block_args = [f"%in{k}: f32" for k in range(len(operands))] + ["%out: f32"]
    lines.append(f"  ^bb0({', '.join(block_args)}):")
    body = _BodyWriter(space, {a: f"%in{k}" for k, a in enumerate(operands)}, scalars)
    value = body.float(e.expr)
    if e.reduced:
        value = body.op(f"{COMBINE[e.reduce]} {value}, %out : f32")
    lines += body.lines
    lines.append(f"    linalg.yield {value} : f32")
    lines.append(f"  }} -> {out_type}")
    return lines


def _accesses(expr: Expr) -> list[Access]:
    from einsum_ir.ir import walk

    return [n for n in walk(expr) if isinstance(n, Access)]


def _float(x: float) -> str:
    """An f32 literal MLIR parses (infinities as hex bit patterns)."""
    if math.isinf(x):
        return "0xFF800000" if x < 0 else "0x7F800000"
    return f"{float(x):.9e}"


class _BodyWriter:
    """Emits a linalg.generic body for an expression; values are f32 or i1 SSA names."""

    def __init__(self, space: list[str], operands: dict, scalars: dict):
        self.space, self.operands, self.scalars = space, operands, scalars
        self.lines: list[str] = []
        self.count = 0

    def op(self, text: str) -> str:
        self.count += 1
        name = f"%v{self.count}"
        self.lines.append(f"    {name} = {text}")
        return name

    def const(self, x: float) -> str:
        return self.op(f"arith.constant {_float(x)} : f32")

    def float(self, expr: Expr) -> str:
        value, kind = self.emit(expr)
        return self.op(f"arith.uitofp {value} : i1 to f32") if kind == "i1" else value

    def bool(self, expr: Expr) -> str:
        value, kind = self.emit(expr)
        if kind == "i1":
            return value
        return self.op(f"arith.cmpf une, {value}, {self.const(0.0)} : f32")

    def emit(self, expr: Expr) -> tuple[str, str]:
        if isinstance(expr, Access):
            return self.operands[expr], "f32"
        if isinstance(expr, Num):
            return self.const(expr.value), "f32"
        if isinstance(expr, Name):
            return self.const(self.scalars[expr.name]), "f32"
        if isinstance(expr, Index):
            i = self.op(f"linalg.index {self.space.index(expr.name)} : index")
            i = self.op(f"arith.index_cast {i} : index to i64")
            return self.op(f"arith.sitofp {i} : i64 to f32"), "f32"
        if isinstance(expr, Unary) and expr.op == "-":
            return self.op(f"arith.negf {self.float(expr.operand)} : f32"), "f32"
        if isinstance(expr, Binary) and expr.op in CMPF_NAMES:
            a, b = self.float(expr.lhs), self.float(expr.rhs)
            return self.op(f"arith.cmpf {CMPF_NAMES[expr.op]}, {a}, {b} : f32"), "i1"
        if isinstance(expr, Binary) and expr.op in ARITH:
            a, b = self.float(expr.lhs), self.float(expr.rhs)
            return self.op(f"{ARITH[expr.op]} {a}, {b} : f32"), "f32"
        if isinstance(expr, Call) and expr.fn == "where":
            cond = self.bool(expr.args[0])
            a, b = self.float(expr.args[1]), self.float(expr.args[2])
            return self.op(f"arith.select {cond}, {a}, {b} : f32"), "f32"
        if isinstance(expr, Call) and expr.fn in FUNCTIONS:
            f = FUNCTIONS[expr.fn]
            if f.mlir is not None:
                args = ", ".join(self.float(a) for a in expr.args)
                return self.op(f"{f.mlir} {args} : f32"), "f32"
            if f.decompose is not None:
                return self.emit(f.decompose(*expr.args))
        raise ValueError(f"to_mlir has no linalg form for {expr}")
