"""Split-KV at run time: the split kernel, then a combine that merges the splits' states.

    out = kern(**args)        # split-KV when the cost model picks more than one split
    kern.split_kv = 8         # or forced (ei.compile(c, split_kv=8)); 1: the ordinary kernel

`SplitKernels` compiles the split partial cascade (lowering/split_kv.py) on the kernel's own
backend, holding its outputs (the carried values and the count, stacked over the splits) in
fp32. The combine merges them per row by `Merge.rules`:

- on CPU tensors, torch ops over the stacked states: `codegen.partial.merge_stacked`, the same
  code that merges `kern.partial` states for `ei.merge` and the ring;
- on the Triton backend, a generated kernel (`combine_source`): one program per block of rows,
  a loop over the splits for the maxima, then one for the sums, each part's value times its
  rescale factor printed from the rule's sympy factor, with the cascade's names.

Then the merge's finish cascade (the epilogue: O = O_num / SD) runs on the merged values, and a
row that no split saw takes the output's fill (`PartialState.finalize`), as in the kernel.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import cached_property

import sympy
import torch

from einsum_ir.codegen.names import spelled
from einsum_ir.codegen.partial import PartialState, merge_stacked
from einsum_ir.errors import LoweringError
from einsum_ir.ir import Cascade
from einsum_ir.lowering.merge import Merge, Rule
from einsum_ir.lowering.split_kv import SplitKV, derive_split

KEY_ALIGN = 64  # keys per split are a multiple of the GPU key tile, so splits cut no tile


class SplitKernels:
    """A cascade's split-KV kernel on one backend, built on first use."""

    def __init__(self, cascade: Cascade, compiler: Callable, backend: str):
        self.cascade, self.compiler, self.backend = cascade, compiler, backend

    @cached_property
    def split(self) -> SplitKV:
        return derive_split(self.cascade)

    @cached_property
    def combine_text(self) -> str:
        return combine_source(self.split)

    @cached_property
    def kernel(self) -> Callable:
        c = self.split.cascade
        return self.compiler(c, frozenset(c.output_names))

    def __call__(self, args: Mapping, splits: int, keys: int):
        """The cascade's outputs from `splits` splits of `keys` keys."""
        sk = self.split
        per = -(-keys // max(1, splits))
        if self.backend == "triton":
            per = -(-per // KEY_ALIGN) * KEY_ALIGN
        n = max(1, -(-keys // per))
        wanted = set(sk.cascade.input_names) | set(sk.cascade.dims) | {p.name for p in sk.cascade.params}
        result = self.kernel(**{k: v for k, v in args.items() if k in wanted}, **{sk.splits: n, sk.keys_per_split: per})
        stacked = dict(zip(sk.cascade.output_names, result if isinstance(result, tuple) else (result,)))
        if self.backend == "triton":
            merged = self.triton_combine(stacked)
        else:
            merged = merge_stacked(sk.merge, stacked)
        return PartialState(sk.merge, merged, dict(args)).finalize()

    def triton_combine(self, stacked: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from einsum_ir.codegen.modules import interpret_env, load_module

        m = self.split.merge
        first = stacked[m.count]
        splits, rows = first.shape[0], math.prod(first.shape[1:])
        interpret = first.device.type == "cpu"
        module = load_module(self.combine_text, interpret=interpret)
        parts = {n: t.contiguous() for n, t in stacked.items()}
        out = {n: torch.empty(t.shape[1:], dtype=torch.float32, device=t.device) for n, t in parts.items()}
        extents = {}
        for r in m.rules:
            for i, v in enumerate(r.indices[len(_rows(m)):]):
                extents[spelled(v, rank=True)] = parts[r.name].shape[1 + len(_rows(m)) + i]
        block_r = 16
        kw = {"BLOCK_R": block_r, **{f"BLOCK_{v.upper()}": _pow2(n) for v, n in extents.items()},
              **{f"N_{v.upper()}": n for v, n in extents.items()}}
        grid = (max(1, -(-rows // block_r)),)
        names = [r.name for r in m.rules] + [m.count]
        fn = module.combine_kernel
        call = [parts[n] for n in names] + [out[n] for n in names] + [rows, splits]
        if interpret:
            with interpret_env():
                fn[grid](*call, **kw)
        else:
            fn[grid](*call, **kw)
        return out


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _rows(m: Merge) -> tuple[str, ...]:
    """The row indices every state is kept over: the count's."""
    return tuple(m.partial.einsum(m.count).lhs_vars)


def combine_source(sk: SplitKV) -> str:
    """The Triton combine kernel of a split-KV cascade, generated from its merge rules: per block
    of rows, the maxima over the splits, then every sum's parts times their rescale factors.
    LoweringError when a state is not its rows followed by at most one feature index."""
    m = sk.merge
    # the cascade's names as generated code spells them (codegen/names.py): none aliases ours
    rows = tuple(spelled(v, rank=True) for v in _rows(m))
    rules = [_spelled(r) for r in m.rules]
    count = spelled(m.count)
    feature: dict[str, str | None] = {}
    for r in rules:
        if r.indices[:len(rows)] != rows or len(r.indices) > len(rows) + 1:
            raise LoweringError(f"{r.name}[{','.join(r.indices)}] is not a row value over {','.join(rows)} with at "
                                f"most one feature index; the combine kernel merges such states only")
        feature[r.name] = r.indices[len(rows)] if len(r.indices) > len(rows) else None
    names = [r.name for r in rules] + [count]
    part = f"j_{spelled(sk.split, rank=True)}"  # the split of a loop's iteration
    feats = sorted({f for f in feature.values() if f})
    args = [f"{n}_parts" for n in names] + [f"{n}_ptr" for n in names] + ["ROWS", "NSPLIT"]
    args += [f"N_{f.upper()}: tl.constexpr" for f in feats] + ["BLOCK_R: tl.constexpr"]
    args += [f"BLOCK_{f.upper()}: tl.constexpr" for f in feats]
    text = "\n".join(f"#   {line}" for line in str(sk.cascade).splitlines())
    out = ["# Generated by einsum-ir (codegen/combine.py): the split-KV combine of the cascade", "#", text, "",
           "import triton", "import triton.language as tl", "", "",
           "@triton.jit", "def combine_kernel(" + ", ".join(args) + "):",
           f'    """Merge the NSPLIT partial states of each row ({",".join(rows)} flattened): '
           + "; ".join(_describe(r) for r in rules) + f'; {count} adds."""',
           "    row_i = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)",
           "    row_ok = row_i < ROWS"]
    for f in feats:
        out.append(f"    {f} = tl.arange(0, BLOCK_{f.upper()})")
        out.append(f"    {f}_ok = {f} < N_{f.upper()}")

    def pointer(n: str, part: str | None) -> tuple[str, str, str]:
        """(address, mask, shape) of a row block of value n (of one part, or merged)."""
        f = feature.get(n)
        base = f"{n}_parts + {part} * ROWS" if part else f"{n}_ptr"
        if f is None:
            return f"{base} + row_i", "row_ok", "[BLOCK_R]"
        width = f"N_{f.upper()}"
        start = f"{n}_parts + ({part} * ROWS + row_i[:, None]) * {width}" if part else f"{n}_ptr + row_i[:, None] * {width}"
        return f"{start} + {f}[None, :]", f"row_ok[:, None] & {f}_ok[None, :]", f"[BLOCK_R, BLOCK_{f.upper()}]"

    maxima = [r for r in rules if r.reduce in ("max", "min")]
    sums = [r for r in rules if r.reduce == "sum"]
    if maxima:
        out.append("    # maxima (and minima) over the splits")
        for r in maxima:
            ident = 'float("-inf")' if r.reduce == "max" else 'float("inf")'
            out.append(f"    {r.name} = tl.full({pointer(r.name, None)[2]}, {ident}, tl.float32)")
        out.append(f"    for {part} in range(0, NSPLIT):")
        for r in maxima:
            addr, mask, _ = pointer(r.name, part)
            ident = 'float("-inf")' if r.reduce == "max" else 'float("inf")'
            op = "maximum" if r.reduce == "max" else "minimum"
            out.append(f"        {r.name} = tl.{op}({r.name}, tl.load({addr}, mask={mask}, other={ident}))")
        for r in maxima:  # a row no split saw: the factors stay finite (its sums are 0)
            out.append(f"    {r.name}_new = tl.where({r.name} == float(\"-inf\"), 0.0, {r.name})")
    out.append("    # sums over the splits, each part rescaled to the merged maxima")
    for n in [r.name for r in sums] + [count]:
        out.append(f"    {n} = tl.zeros({pointer(n, None)[2]}, tl.float32)")
    out.append(f"    for {part} in range(0, NSPLIT):")
    for r in maxima:
        if any(sympy.Symbol(f"G_{r.name}") in s.factor.free_symbols for s in sums):
            addr, mask, _ = pointer(r.name, part)
            ident = 'float("-inf")' if r.reduce == "max" else 'float("inf")'
            out.append(f"        {r.name}_part = tl.load({addr}, mask={mask}, other={ident})")
    for r in sums:
        addr, mask, _ = pointer(r.name, part)
        factor = _factor_code(r, feature)
        out.append(f"        {r.name} += tl.load({addr}, mask={mask}, other=0.0)" + (f" * {factor}" if factor else ""))
    addr, mask, _ = pointer(count, part)
    out.append(f"        {count} += tl.load({addr}, mask={mask}, other=0.0)")
    for n in names:
        addr, mask, _ = pointer(n, None)
        out.append(f"    tl.store({addr}, {n}, mask={mask})")
    return "\n".join(out) + "\n"


def _describe(r: Rule) -> str:
    if r.reduce != "sum":
        return f"{r.name} by {r.reduce}"
    return f"{r.name} adds" if r.factor == 1 else f"{r.name} adds parts times {r.factor}"


def _spelled(r: Rule) -> Rule:
    """A rule in the spelled names (its factor's symbols too)."""
    names = {sym: sympy.Symbol(f"G_{spelled(sym.name[2:-4])}_new" if sym.name.endswith("_new")
                               else f"G_{spelled(sym.name[2:])}") for sym in r.factor.free_symbols}
    return Rule(spelled(r.name), tuple(spelled(v, rank=True) for v in r.indices), r.reduce, r.factor.xreplace(names))


def _factor_code(r: Rule, feature: Mapping[str, str | None]) -> str:
    """The rule's rescale factor as Triton code over the part's maxima (`X_part`) and the
    merged ones (`X_new`), broadcast to the sum's row block; "" for 1."""
    if r.factor == 1:
        return ""
    wide = feature.get(r.name) is not None

    def leaf(sym: sympy.Symbol) -> str:
        name = sym.name[2:]
        x = name[:-4] if name.endswith("_new") else name
        code = f"{x}_new" if name.endswith("_new") else f"{x}_part"
        return f"{code}[:, None]" if wide and feature.get(x) is None else code

    return _print(r.factor, leaf)


def _print(e: sympy.Expr, leaf: Callable[[sympy.Symbol], str]) -> str:
    if isinstance(e, sympy.Symbol):
        return leaf(e)
    if e.is_Number:
        return repr(float(e))
    if e.is_Add:
        code = ""
        for a in sorted(e.args, key=lambda t: t.could_extract_minus_sign()):
            neg = a.could_extract_minus_sign()
            term = _print(-a if neg else a, leaf)
            code = f"{code} - {term}" if neg else (f"{code} + {term}" if code else term)
        return f"({code})"
    if e.is_Mul:
        return "(" + " * ".join(_print(a, leaf) for a in e.args) + ")"
    if e.is_Pow:
        base, exp = e.args
        if base == 2:
            return f"tl.exp2({_print(exp, leaf)})"
        if base.is_Number:
            return f"tl.exp({_print(exp, leaf)} * {math.log(float(base))!r})"
        if exp == -1:
            return f"(1.0 / {_print(base, leaf)})"
    if isinstance(e, sympy.exp):
        return f"tl.exp({_print(e.args[0], leaf)})"
    if isinstance(e, (sympy.Max, sympy.Min)):
        op = "tl.maximum" if isinstance(e, sympy.Max) else "tl.minimum"
        code = _print(e.args[0], leaf)
        for a in e.args[1:]:
            code = f"{op}({code}, {_print(a, leaf)})"
        return code
    raise LoweringError(f"the rescale factor {e} has no Triton spelling in the combine kernel")
