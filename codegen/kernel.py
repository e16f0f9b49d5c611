"""The kernel object: shape binding, tile choice, module loading and launch of a plan's stages."""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import tempfile
from collections.abc import Callable
from types import ModuleType

import torch

from einsum_ir.codegen import cache, dispatch
from einsum_ir.codegen.dispatch import INTERPRETER_CONFIG, Config, DispatchKey
from einsum_ir.errors import BindError, LoweringError
from einsum_ir.ir import Cascade, index_vars, rank_of
from einsum_ir.params import bind_arguments
from einsum_ir.lowering.plan import Plan, Stage, build_plan

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


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
    boxed = dispatch.boxed_ranks(ranks, square)
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


def default_config(stages: list[Stage], extents: dict, device: str = "cpu") -> Config:
    """The launch config without tuning: the interpreter's small tiles on "cpu", else 128x64
    tiles, 8 warps and 2 stages (64x32, 4 warps past head dim 128)."""
    if device == "cpu":
        return INTERPRETER_CONFIG
    widest = max((max(16, next_pow2(extents[rank_of(f)])) for s in stages for f in s.features),
                 default=16)
    if widest <= 128:
        return Config(128, 64, 8, 2)
    return Config(64, 32, 4, 2)


def stage_tiles(stage: Stage, extents: dict, config: Config) -> dict:
    """Every constexpr and launch option of one stage: the config's tiles, feature blocks
    (whole head dims, padded to a power of two) and per-rank boxes for multi-rank tile axes.
    Pass bucket extents: then the result, and so the binary, is the same for the whole bucket."""
    feats = {f: max(16, next_pow2(extents[rank_of(f)])) for f in stage.features}
    tiles = {**config.as_dict(), **{f"BLOCK_{f.upper()}": b for f, b in feats.items()}}
    in_pred = set(index_vars(stage.predicate)) if stage.predicate is not None else set()
    tiles.update(_box(config.BLOCK_Q, stage.query, extents, "BLOCK_Q", in_pred))
    tiles.update(_box(config.BLOCK_S, stage.stream, extents, "BLOCK_S", in_pred))
    return tiles


def choose_tiles(stage: Stage, extents: dict, device: str = "cpu") -> dict:
    """`stage_tiles` under the untuned default config."""
    return stage_tiles(stage, extents, default_config([stage], extents, device))


def query_tiles(stage, extents: dict, tiles: dict) -> int:
    if len(stage.query) == 1:
        return -(-extents[rank_of(stage.query[0])] // tiles["BLOCK_Q"])
    return math.prod(-(-extents[rank_of(v)] // tiles[f"BLOCK_Q_{v}"]) for v in stage.query)


_MODULES: dict[str, object] = {}


def import_source(source: str, prefix: str, interpret: bool) -> ModuleType:
    """Import generated source from a file (Triton's JIT reads the function source back), named
    `<prefix>_<hash>`. With `interpret`, the module is imported under TRITON_INTERPRET=1 so its
    kernels run on CPU tensors in Triton's interpreter; otherwise they compile for the GPU."""
    key = hashlib.sha1(source.encode()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), "einsum_ir_triton")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{prefix}_{key}.py")
    if not os.path.exists(path):
        tmp = path + f".{os.getpid()}"  # written whole, then renamed: other processes read it
        with open(tmp, "w") as fh:
            fh.write(source)
        os.replace(tmp, path)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        name = f"einsum_ir_{prefix}_{key}" + ("_interp" if interpret else "")
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    return mod


def load_module(source: str, interpret: bool = False) -> ModuleType:
    """The generated module, imported once per process (see `import_source`)."""
    mkey = hashlib.sha1(source.encode()).hexdigest()[:16] + ("_interp" if interpret else "")
    if mkey in _MODULES:
        return _MODULES[mkey]
    mod = import_source(source, "k", interpret)
    _MODULES[mkey] = mod
    dispatch.STATS["module_load"] += 1
    return mod


_SOURCES: dict[str, str] = {}  # cascade text -> generated source, for this process


def kernel_source(plan: Plan, cascade: Cascade) -> str:
    """The generated Triton module of `cascade`: from memory, else the on-disk cache (kind
    "source"), else the emitter. The source takes every extent at run time, so one text
    serves every shape, device and dtype."""
    text = str(cascade)
    if text not in _SOURCES:
        from einsum_ir.codegen.triton_emit import emit_plan

        def build() -> str:
            dispatch.STATS["emit"] += 1
            return emit_plan(plan, text)[0]

        _SOURCES[text] = cache.get_or_build("source", cache.key(text, "triton"), build)
    return _SOURCES[text]


class TritonKernel:
    """`kern(**tensors_and_params)` -> one tensor or a tuple in output order.

    Each call is dispatched on (device kind, dtype, shape bucket): the launch config comes from
    the autotuner on CUDA (cached on disk as a "choice") and is the interpreter's on CPU
    tensors; it is resolved once per key and kept in `configs`."""

    backend = "triton"

    def __init__(self, cascade: Cascade):
        from einsum_ir.codegen.triton_emit import stage_emitters

        self.cascade = cascade
        self.plan: Plan = build_plan(cascade)
        self._source = kernel_source(self.plan, cascade)
        self.emitters = stage_emitters(self.plan)
        self.token_ranks = dispatch.token_ranks(self.plan)
        self.configs: dict[DispatchKey, Config] = {}
        self.last_key: DispatchKey | None = None

    # -- introspection
    def source(self, shapes: dict | None = None, device: str = "h100") -> str:
        """The generated Triton source; with shapes, the config the pruning picks for them on
        `device` (no timing, no compile) and each stage's tiles in a comment."""
        text = self._source
        if shapes:
            bucket = dict(dispatch.bucket_of(self._extents_from_shapes(shapes), self.token_ranks))
            if device == "cpu":
                config = INTERPRETER_CONFIG
            else:
                from einsum_ir.codegen.autotune import pruned_best

                config = pruned_best(self, bucket, device, "bf16", aot=False)
            notes = [f"# config for {shapes} on {device}: {config}"]
            for s in self.plan.stages:
                notes.append(f"#   stage {s.index}: {stage_tiles(s, bucket, config)}")
            text = "\n".join(notes) + "\n" + text
        return text

    def resource_usage(self, shapes: dict, dtype: str = "bf16", target: str = "sm_90",
                       config: Config | None = None) -> dict:
        """AOT-compiled registers, spills and shared memory (the default config unless given)."""
        from einsum_ir.codegen.aot import resource_usage

        return resource_usage(self, shapes, dtype=dtype, target=target, config=config)

    def _extents_from_shapes(self, shapes: dict) -> dict:
        ext = {r: int(v) for r, v in shapes.items()}
        missing = [d for d in self.cascade.dims if d not in ext]
        if missing:
            raise BindError(f"shapes must bind every dim; missing {', '.join(missing)}")
        return ext

    # -- launch
    def bind(self, args: dict):
        tensors, extents, params = bind_arguments(self.cascade, args)
        for name, t in tensors.items():
            if t.dtype == torch.bool:  # Triton loads a bool mask as int8
                tensors[name] = t.to(torch.int8)
        return tensors, extents, params

    def __call__(self, **args):
        return self.run(args)

    def run(self, args: dict, config: Config | None = None):
        """One call; `config` forces a launch config (the autotuner times candidates this way)."""
        tensors, extents, params = self.bind(dict(args))
        first = next(iter(tensors.values()))
        floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
        out_dtype = floats[0] if floats else torch.float32
        key = dispatch.dispatch_key(first.device, out_dtype, extents, self.token_ranks)
        self.last_key = key
        if config is None:
            config = self.config_for(key, lambda cfg: self.run(args, cfg), first.device)
        return self._launch(tensors, extents, params, out_dtype, key, config)

    def config_for(self, key: DispatchKey, run: Callable[[Config], object],
                   device: torch.device) -> Config:
        """The launch config of a dispatch key, resolved once per key: the interpreter's on
        CPU; on CUDA the autotuner's choice (from the on-disk cache, or pruned and timed with
        `run`, which launches this call's tensors under a given config)."""
        if key not in self.configs:
            dispatch.STATS["config"] += 1
            if key.device == "cpu":
                self.configs[key] = INTERPRETER_CONFIG
            else:
                from einsum_ir.codegen.autotune import choose

                self.configs[key] = choose(self, key, run, dispatch.table_device(device))
        return self.configs[key]

    def _launch(self, tensors: dict, extents: dict, params: dict, out_dtype: torch.dtype,
                key: DispatchKey, config: Config):
        c = self.plan.cascade
        device = next(iter(tensors.values())).device
        interpret = device.type == "cpu"
        if interpret:
            _check_interpreter()
        else:
            _check_compiler()
        module = load_module(self._source, interpret=interpret)
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
        bucket = key.extents()
        for s, em in zip(self.plan.stages, self.emitters):
            # tiles from the bucket, grid from the true extents: one binary per bucket
            tiles = stage_tiles(s, bucket, config)
            ng = math.prod(extents[rank_of(v)] for v in s.grid)
            nqt = query_tiles(s, extents, tiles)
            grid = (nqt, max(ng, 1))
            dims = extents
            if s.skip.block_list:
                kt = math.prod(-(-extents[rank_of(v)] // tiles["BLOCK_S"]) for v in s.stream)
                buffers["BL"] = torch.empty(max(ng, 1) * nqt * kt, dtype=torch.int32, device=device)
                buffers["BC"] = torch.empty(max(ng, 1) * nqt, dtype=torch.int32, device=device)
                self.last_block_counts = buffers["BC"]  # live key tiles per (grid, query tile)
                dims = dict(extents, KT=kt, NQT=nqt)
            kargs, kw = [], {}
            for n, k in em.arg_names():
                if k in ("ptr", "blist_ptr"):
                    kargs.append(buffers[n[:-4]])
                elif k == "stride":
                    t, pos = n[len("stride_"):].rsplit("_", 1)
                    kargs.append(buffers[t].stride(int(pos)))
                elif k in ("dim", "blist_dim"):
                    kargs.append(dims[n])
                elif k in ("param", "param_int"):
                    kargs.append(params[n])
                else:  # constexprs: feature extents (exact in the bucket) and tiles
                    kw[n] = dims[n] if n in dims else tiles[n]
            opts = {} if interpret else {"num_warps": tiles["num_warps"], "num_stages": tiles["num_stages"]}
            fns = [getattr(module, em.name)]
            if s.skip.block_list:  # the block list first: the live key tiles per query tile
                fns.insert(0, getattr(module, em.list_emitter.name))
            for fn in fns:
                if interpret:
                    with _interpret_env():
                        fn[grid](*kargs, **kw, **opts)
                else:
                    fn[grid](*kargs, **kw, **opts)
        return collect_outputs(c, buffers, out_dtype)


def collect_outputs(cascade: Cascade, buffers: dict, out_dtype: torch.dtype):
    """The cascade's outputs from the stage buffers, in `out_dtype`: one tensor or a tuple in
    output order, like `ei.interpret`."""
    outs = []
    for name in cascade.output_names:
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
