"""The Triton kernel object: shape binding, dispatch, launch of a plan's stages, and its
compiled forms (source, TTGIR/PTX, resource usage)."""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import cached_property

import torch

from einsum_ir.codegen import cache, dispatch
from einsum_ir.codegen.autograd import record, wants_grad
from einsum_ir.codegen.dispatch import INTERPRETER_CONFIG, Config, DispatchKey
from einsum_ir.codegen.names import spell
from einsum_ir.codegen.modules import check_compiler, check_interpreter, interpret_env, load_module
from einsum_ir.codegen.outputs import collect_outputs, interpreted
from einsum_ir.codegen.derived import DerivedKernels
from einsum_ir.codegen.tiles import group_tiles, launch_options, query_tiles, stage_tiles
from einsum_ir.errors import BindError, LoweringError
from einsum_ir.graph import cascade_graph
from einsum_ir.ir import Cascade, rank_of
from einsum_ir.lowering.plan import Plan
from einsum_ir.lowering.strategy import build_plan
from einsum_ir.lowering.underflow import scale_rows
from einsum_ir.params import bind_arguments

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


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


def generated_module(source: str, device: torch.device):
    """The generated module for tensors on `device`: run by Triton's interpreter on CPU
    tensors, compiled for CUDA ones."""
    interpret = device.type == "cpu"
    if interpret:
        check_interpreter()
    else:
        check_compiler()
    return load_module(source, interpret=interpret)


def compile_triton(cascade: Cascade, fp32: frozenset = frozenset()) -> "TritonKernel | ScanTritonKernel":
    """The Triton kernel of the plan the lowering chose: a key loop's (TritonKernel) or a
    chunked scan's (codegen/scan_triton.py); LoweringError with the reason when none applies."""
    from einsum_ir.lowering.chunked_scan import ScanPlan

    spelled = spell(cascade)
    plan = build_plan(spelled.cascade)
    if isinstance(plan, ScanPlan):
        from einsum_ir.codegen.scan_triton import ScanTritonKernel

        return ScanTritonKernel(cascade, plan, spelled, fp32)
    return TritonKernel(cascade, fp32)


class TritonKernel(DerivedKernels):
    """`kern(**tensors_and_params)` -> one tensor or a tuple in output order.

    Each call is dispatched on (device kind, dtype, shape bucket): the launch config comes from
    the autotuner on CUDA (cached on disk as a "choice") and is the interpreter's on CPU
    tensors; it is resolved once per key and kept in `configs`."""

    backend = "triton"
    config_class = Config

    def __init__(self, cascade: Cascade, fp32: frozenset = frozenset()):
        from einsum_ir.codegen.triton_emit import stage_emitters

        self.cascade = cascade
        self.fp32 = frozenset(fp32)  # held in fp32 whatever the dtype: saved outputs, saved inputs
        self.spelled = spell(cascade)  # the names generated code uses (codegen/names.py)
        self.fp32_spelled = self.spelled.set(self.fp32)  # the same, as the plan names them
        self.plan: Plan = build_plan(self.spelled.cascade)
        self._source = kernel_source(self.plan, self.spelled.cascade)
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

    def launch_config(self, shapes: dict, dtype: str, target: str) -> Config | None:
        """The config an ahead-of-time compile uses when none is given: None, the default tiles."""
        return None

    def launch_summary(self, shapes: dict, device: str = "h100", aot: bool = True) -> str:
        """The config the autotuner's pruning picks for `shapes` on `device` (untimed)."""
        from einsum_ir.codegen.autotune import pruned_best

        return str(pruned_best(self, shapes, device, "bf16", aot=aot))

    def resource_usage(self, shapes: dict, dtype: str = "bf16", target: str = "sm_90",
                       config: Config | None = None) -> dict:
        """AOT-compiled registers, spills and shared memory (the default config unless given)."""
        from einsum_ir.codegen.aot import resource_usage

        return resource_usage(self, shapes, dtype=dtype, target=target, config=config)

    def asm(self, shapes: dict, dtype: str = "bf16", target: str = "sm_90",
            config: Config | None = None) -> list[dict]:
        """{"name", "ttgir", "ptx"} for every kernel the cascade launches, compiled ahead of time
        for `target` (no GPU needed); the default config unless one is given."""
        from einsum_ir.codegen.aot import asm

        return asm(self, shapes, dtype=dtype, target=target, config=config)

    def specializations(self, shapes: dict, dtype: str, config: Config | None = None) -> list[dict]:
        """What the JIT specializes each stage's kernel on (codegen/aot.py `specialization`)."""
        from einsum_ir.codegen.aot import specialization

        return [specialization(self, i, shapes, dtype, config) for i in range(len(self.emitters))]

    def compiled_usage(self, shapes: dict, dtype: str, target: str, config: Config | None = None) -> dict:
        """`resource_usage` compiled in this process, uncached (what the AOT subprocess runs)."""
        from einsum_ir.codegen.aot import _resource_usage

        return _resource_usage(self, shapes, dtype, target, config)

    def compiled_asm(self, shapes: dict, dtype: str, target: str, config: Config | None = None) -> list[dict]:
        from einsum_ir.codegen.aot import _asm

        return _asm(self, shapes, dtype, target, config)

    def _extents_from_shapes(self, shapes: dict) -> dict:
        ext = {r: int(v) for r, v in shapes.items()}
        missing = [d for d in self.cascade.dims if d not in ext]
        if missing:
            raise BindError(f"shapes must bind every dim; missing {', '.join(missing)}")
        return self.spelled.args(ext)

    # -- launch
    def bind(self, args: dict):
        tensors, extents, params = (self.spelled.args(x) for x in bind_arguments(self.cascade, args, self.fp32))
        for name, t in tensors.items():
            if t.dtype == torch.bool:  # Triton loads a bool mask as int8
                tensors[name] = t.to(torch.int8)
        return tensors, extents, params

    def __call__(self, **args):
        if wants_grad(args):
            return record(self, self.training, self.run, args)
        splits = self.splits_for(args)
        if splits > 1:
            return self.run_split(args, splits)
        return self.run(args)

    def same_backend(self, cascade: Cascade, fp32: frozenset = frozenset()):
        return compile_triton(cascade, fp32)

    def run(self, args: dict, config: Config | None = None):
        """One call; `config` forces a launch config (the autotuner times candidates this way)."""
        tensors, extents, params = self.bind(dict(args))
        if 0 in extents.values():
            return interpreted(self.cascade, args, self.fp32)
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
        module = generated_module(self._source, device)
        buffers = dict(tensors)
        atomic = {t for s in self.plan.stages for t in s.summed_across_programs}
        tiled = {t for s in self.plan.stages for t in s.tile_stores}
        for name in c.output_names + list(self.plan.intermediates):
            shape = [extents[r] for r in c.tensors[name].ranks]
            if name in atomic:
                buffers[name] = torch.zeros(shape, dtype=torch.float32, device=device)
            elif name in tiled:  # written only where the key loop visits: the rest is the fill
                fill = next(o.fill for o in c.outputs if o.name == name)
                buffers[name] = torch.full(shape, float(fill), dtype=out_dtype, device=device)
            elif name in c.output_names:
                dtype = torch.float32 if name in self.fp32_spelled else out_dtype
                buffers[name] = torch.empty(shape, dtype=dtype, device=device)
            else:
                buffers[name] = torch.empty(shape, dtype=torch.float32, device=device)
        bucket = key.extents()
        for s, em in zip(self.plan.stages, self.emitters):
            # tiles from the bucket, grid from the true extents: one binary per bucket
            tiles = stage_tiles(s, bucket, config)
            tiles.update(group_tiles(s, {**extents, **params}, tiles["BLOCK_S"]))  # the call's group size
            ng = math.prod(extents[rank_of(v)] for v in s.grid)
            nqt = query_tiles(s, extents, tiles)
            grid = (nqt, max(ng, 1))
            dims = extents
            if s.loop.block_list:  # per (grid, query tile): the full and the partial key tiles
                kt = math.prod(-(-extents[rank_of(v)] // tiles["BLOCK_S"]) for v in s.stream)
                for n in ("FL", "PL"):
                    buffers[n] = torch.empty(max(ng, 1) * nqt * max(kt, 1), dtype=torch.int32, device=device)
                for n in ("FC", "PC"):
                    buffers[n] = torch.empty(max(ng, 1) * nqt, dtype=torch.int32, device=device)
                self.last_block_counts = (buffers["FC"], buffers["PC"])
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
            opts = {} if interpret else launch_options(tiles)
            fns = [getattr(module, em.name)]
            if s.loop.block_list:  # the block list first: the live key tiles per query tile
                fns.insert(0, getattr(module, em.list_emitter.name))
            for fn in fns:
                if interpret:
                    with interpret_env():
                        fn[grid](*kargs, **kw, **opts)
                else:
                    fn[grid](*kargs, **kw, **opts)
        return collect_outputs(c, buffers, out_dtype, self.fp32_spelled)


class ReferenceKernel(DerivedKernels):
    """The interpreter behind the kernel interface, on the cascade with its normalized weights
    scaled per row (lowering.underflow: exact, and like the fused backends it gives a row of
    tiny weights its value instead of 0/0). `ei.interpret` runs the cascade as written."""

    backend = "reference"

    def __init__(self, cascade: Cascade):
        self.cascade = cascade

    @cached_property
    def scaled(self) -> Cascade:
        return scale_rows(self.cascade, cascade_graph(self.cascade))

    def __call__(self, **args):
        from einsum_ir.interpreter import interpret

        return interpret(self.scaled, **args)

    def same_backend(self, cascade: Cascade, fp32: frozenset = frozenset()) -> "ReferenceKernel":
        return ReferenceKernel(cascade)

    def source(self, shapes=None, device="h100") -> str:
        raise LoweringError("the reference backend runs the interpreter; it has no generated source")

    def resource_usage(self, shapes, dtype="bf16", target="sm_90"):
        raise LoweringError("the reference backend runs the interpreter; it has no compiled kernel")
