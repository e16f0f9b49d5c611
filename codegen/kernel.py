"""The kernel object: shape binding, tile choice, module loading and launch of a plan's stages."""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import tempfile

import torch

from einsum_ir.errors import BindError, LoweringError
from einsum_ir.ir import Binary, Call, Cascade, Name, Num, Unary, rank_of
from lowering.plan import Plan, build_plan

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
_MATH = {"exp": math.exp, "log": math.log, "log1p": math.log1p, "sqrt": math.sqrt,
         "rsqrt": lambda x: 1 / math.sqrt(x), "tanh": math.tanh, "abs": abs, "max": max, "min": min,
         "pow": math.pow, "sigmoid": lambda x: 1 / (1 + math.exp(-x))}


def scalar(expr, env: dict) -> float:
    """Evaluate a derived param's expression over dims and earlier params."""
    if isinstance(expr, Num):
        return expr.value
    if isinstance(expr, Name):
        return env[expr.name]
    if isinstance(expr, Unary):
        return -scalar(expr.operand, env)
    if isinstance(expr, Binary):
        a, b = scalar(expr.lhs, env), scalar(expr.rhs, env)
        return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else math.inf,
                "//": a // b if b else 0, "%": a % b if b else 0}[expr.op]
    if isinstance(expr, Call):
        return _MATH[expr.fn](*[scalar(a, env) for a in expr.args])
    raise BindError(f"cannot evaluate param expression {expr}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _box(total: int, ranks, extents: dict, prefix: str, square: set) -> dict:
    """Split a power-of-two tile over several ranks (last rank fastest). Ranks outside any
    predicate (GQA's R) are packed whole first; predicate ranks (2-D neighborhoods) share
    the rest as a square-ish box."""
    if len(ranks) == 1:
        return {}
    bits = total.bit_length() - 1
    cap = {v: max(0, next_pow2(extents[rank_of(v)]).bit_length() - 1) for v in ranks}
    out, left = {}, bits
    free = [v for v in ranks if v not in square]
    boxed = [v for v in ranks if v in square] or [ranks[-1]]
    for v in free:
        if v in boxed:
            continue
        b = min(cap[v], max(0, left - 4))  # keep at least 16 rows for the other ranks
        out[v] = b
        left -= b
    for i, v in enumerate(boxed):
        if i == len(boxed) - 1:
            b = left
        else:
            b = min(cap[v], -(-left // (len(boxed) - i)))
        out[v] = b
        left -= b
    return {f"{prefix}_{v}": 1 << out[v] for v in ranks}


def choose_tiles(stage, extents: dict, device: str = "cpu") -> dict:
    """Tile sizes and launch options for one stage (the plan's choice; autotuning comes later)."""
    feats = {f: max(16, next_pow2(extents[rank_of(f)])) for f in stage.features}
    widest = max(feats.values(), default=16)
    if device == "cpu":
        bq, bs, warps, stages = 16, 16, 4, 1
    else:
        bq = 128 if widest <= 128 else 64
        bs = 64 if widest <= 128 else 32
        warps, stages = (8 if bq == 128 else 4), 2
    tiles = {"BLOCK_Q": bq, "BLOCK_S": bs, **{f"BLOCK_{f.upper()}": b for f, b in feats.items()},
             "num_warps": warps, "num_stages": stages}
    from einsum_ir.ir import index_vars

    in_pred = set(index_vars(stage.predicate)) if stage.predicate is not None else set()
    tiles.update(_box(bq, stage.query, extents, "BLOCK_Q", in_pred))
    tiles.update(_box(bs, stage.stream, extents, "BLOCK_S", in_pred))
    return tiles


def query_tiles(stage, extents: dict, tiles: dict) -> int:
    if len(stage.query) == 1:
        return -(-extents[rank_of(stage.query[0])] // tiles["BLOCK_Q"])
    return math.prod(-(-extents[rank_of(v)] // tiles[f"BLOCK_Q_{v}"]) for v in stage.query)


_MODULES: dict[str, object] = {}


def load_module(source: str, interpret: bool = False):
    """Import generated source from a file (Triton's JIT reads the function source back).

    With `interpret`, the module is imported under TRITON_INTERPRET=1 so its kernels run on CPU
    tensors in Triton's interpreter; otherwise it is compiled for the GPU."""
    key = hashlib.sha1(source.encode()).hexdigest()[:16]
    mkey = key + ("_interp" if interpret else "")
    if mkey in _MODULES:
        return _MODULES[mkey]
    folder = os.path.join(tempfile.gettempdir(), "einsum_ir_triton")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"k_{key}.py")
    if not os.path.exists(path):
        tmp = path + f".{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(source)
        os.replace(tmp, path)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        spec = importlib.util.spec_from_file_location(f"einsum_ir_k_{mkey}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    _MODULES[mkey] = mod
    return mod


class TritonKernel:
    """`kern(**tensors_and_params)` -> one tensor or a tuple in output order."""

    backend = "triton"

    def __init__(self, cascade: Cascade):
        from codegen.triton_emit import emit_plan

        self.cascade = cascade
        self.plan: Plan = build_plan(cascade)
        self._source, self.emitters = emit_plan(self.plan, str(cascade))

    # -- introspection
    def source(self, shapes: dict | None = None, device: str = "h100") -> str:
        """The generated Triton source; with shapes, the tile sizes chosen for them in a comment."""
        text = self._source
        if shapes:
            ext = self._extents_from_shapes(shapes)
            notes = [f"# tiles for {shapes} on {device}:"]
            for s in self.plan.stages:
                notes.append(f"#   stage {s.index}: {choose_tiles(s, ext, 'gpu' if device != 'cpu' else 'cpu')}")
            text = "\n".join(notes) + "\n" + text
        return text

    def resource_usage(self, shapes: dict, dtype: str = "bf16", target: str = "sm_90") -> dict:
        from codegen.aot import resource_usage

        return resource_usage(self, shapes, dtype=dtype, target=target)

    def _extents_from_shapes(self, shapes: dict) -> dict:
        ext = {r: int(v) for r, v in shapes.items()}
        missing = [d for d in self.cascade.dims if d not in ext]
        if missing:
            raise BindError(f"shapes must bind every dim; missing {', '.join(missing)}")
        return ext

    # -- launch
    def bind(self, args: dict):
        c = self.cascade
        tensors, extents, where = {}, {}, {}
        for d in c.inputs:
            if d.name not in args:
                raise BindError(f"missing input tensor {d.name}; the cascade takes {', '.join(c.input_names)}")
            t = args.pop(d.name)
            if not isinstance(t, torch.Tensor) or t.dim() != len(d.indices):
                raise BindError(f"input {d.name}[{', '.join(d.indices)}] needs a {len(d.indices)}-dim tensor")
            for k, idx in enumerate(d.indices):
                r = rank_of(idx)
                if r in extents and extents[r] != t.shape[k]:
                    raise BindError(f"rank {r} is {extents[r]} in {where[r]} but {t.shape[k]} in {d.name}")
                extents[r], where[r] = t.shape[k], d.name
            if t.dtype == torch.bool:
                t = t.to(torch.int8)
            tensors[d.name] = t
        for d in c.dims:
            if d in args:
                extents[d] = int(args.pop(d))
        unbound = [d for d in c.dims if d not in extents]
        if unbound:
            raise BindError(f"rank(s) {', '.join(unbound)} not bound by any input; pass e.g. {unbound[0]}=128")
        env: dict = dict(extents)
        params = {}
        for p in c.params:
            if p.type is not None:
                if p.name not in args:
                    raise BindError(f"missing param {p.name} ({p.type})")
                v = args.pop(p.name)
                v = v.item() if isinstance(v, torch.Tensor) else v
                params[p.name] = int(v) if p.type == "int" else float(v)
            else:
                params[p.name] = float(scalar(p.expr, env))
            env[p.name] = params[p.name]
        for s in c.splits:
            args.pop(s.inner, None)
        if args:
            raise BindError(f"unexpected argument(s) {', '.join(args)}")
        return tensors, extents, params

    def __call__(self, **args):
        tensors, extents, params = self.bind(dict(args))
        c = self.plan.cascade
        first = next(iter(tensors.values()))
        device = first.device
        if device.type == "cpu":
            _check_interpreter()
        else:
            _check_compiler()
        module = load_module(self._source, interpret=device.type == "cpu")
        floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
        out_dtype = floats[0] if floats else torch.float32
        buffers = dict(tensors)
        atomic = {t for s in self.plan.stages for t in s.grid_reduce}
        for name in c.output_names + self.plan.intermediates:
            shape = [extents[r] for r in c.tensors[name].ranks]
            if name in atomic:
                buffers[name] = torch.zeros(shape, dtype=torch.float32, device=device)
            elif name in c.output_names:
                buffers[name] = torch.empty(shape, dtype=out_dtype, device=device)
            else:
                buffers[name] = torch.empty(shape, dtype=torch.float32, device=device)
        kind = "cpu" if device.type == "cpu" else "gpu"
        for s, em in zip(self.plan.stages, self.emitters):
            tiles = choose_tiles(s, extents, kind)
            ng = math.prod(extents[rank_of(v)] for v in s.grid)
            nqt = query_tiles(s, extents, tiles)
            grid = (nqt, max(ng, 1))
            if s.skip.block_list:
                kt = math.prod(-(-extents[rank_of(v)] // tiles["BLOCK_S"]) for v in s.stream)
                buffers["BL"] = torch.empty(max(ng, 1) * nqt * kt, dtype=torch.int32, device=device)
                buffers["BC"] = torch.empty(max(ng, 1) * nqt, dtype=torch.int32, device=device)
                self.last_block_counts = buffers["BC"]  # live key tiles per (grid, query tile)
                extents = dict(extents, KT=kt, NQT=nqt)
            kargs, kw = [], {}
            for n, k in em.arg_names():
                if k in ("ptr", "blist_ptr"):
                    kargs.append(buffers[n[:-4]])
                elif k == "stride":
                    t, pos = n[len("stride_"):].rsplit("_", 1)
                    kargs.append(buffers[t].stride(int(pos)))
                elif k in ("dim", "blist_dim"):
                    kargs.append(extents[n])
                elif k in ("param", "param_int"):
                    kargs.append(params[n])
                else:
                    kw[n] = extents[n] if n in extents else tiles[n]
            opts = {} if kind == "cpu" else {"num_warps": tiles["num_warps"], "num_stages": tiles["num_stages"]}
            fns = [getattr(module, em.name)]
            if s.skip.block_list:  # the block list first: the live key tiles per query tile
                fns.insert(0, getattr(module, em.list_emitter.name))
            for fn in fns:
                if kind == "cpu":
                    with _interpret_env():
                        fn[grid](*kargs, **kw, **opts)
                else:
                    fn[grid](*kargs, **kw, **opts)
        outs = []
        for name in c.output_names:
            t = buffers[name]
            outs.append(t.to(out_dtype) if t.dtype != out_dtype else t)
        return outs[0] if len(outs) == 1 else tuple(outs)


def _check_interpreter() -> None:
    """CPU tensors run in Triton's interpreter, which works only if triton was first imported
    with TRITON_INTERPRET=1 (its library functions are built differently)."""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        import triton  # noqa: F401
        return
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if isinstance(tl.standard.cdiv, JITFunction):
        raise RuntimeError("CPU tensors run the generated Triton in its interpreter: set "
                           "TRITON_INTERPRET=1 before importing triton (or pass CUDA tensors)")


def _check_compiler() -> None:
    """CUDA tensors need Triton's compiler, unusable if triton was imported interpreted."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if not isinstance(tl.standard.cdiv, JITFunction):
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1, so generated kernels "
                           "cannot compile for the GPU; unset it to run on CUDA tensors")


class _interpret_env:
    """TRITON_INTERPRET=1 while a CPU launch runs (the interpreter reads it lazily)."""

    def __enter__(self):
        self.old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = self.old


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


class ReferenceKernel:
    """The interpreter behind the kernel interface."""

    backend = "reference"

    def __init__(self, cascade: Cascade):
        self.cascade = cascade

    def __call__(self, **args):
        from einsum_ir.interpreter import interpret

        return interpret(self.cascade, **args)

    def source(self, shapes=None, device="h100") -> str:
        raise LoweringError("the reference backend runs the interpreter; it has no generated source")

    def resource_usage(self, shapes, dtype="bf16", target="sm_90"):
        raise LoweringError("the reference backend runs the interpreter; it has no compiled kernel")
