"""Ahead-of-time compilation for a GPU target with no GPU present (DESIGN section 7).

`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))`
gives PTX and a cubin; `cuobjdump --dump-resource-usage` (shipped in the Triton wheel) reads
registers, spills (LOCAL) and shared memory from the cubin. The specialization mirrors what the
JIT does at run time: 16-byte aligned pointers and strides, unit last strides, extents and int
params unspecialized. Results are cached in codegen.cache as kind "aot".
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

from einsum_ir.codegen import cache, dispatch
from einsum_ir.codegen.dispatch import Config
from einsum_ir.codegen.modules import import_source
from einsum_ir.codegen.tiles import default_config, group_tiles, launch_options, stage_tiles

DTYPE_SIG = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
INT_SIG = {"bool": "i8", "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64"}


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@functools.lru_cache(maxsize=64)
def _compiled_module(source: str):
    """The generated module imported with real `@triton.jit` functions (interpret mode off)."""
    return import_source(source, "aot", interpret=False)


def specialization(kern, stage_index: int, shapes: dict, dtype: str = "bf16",
                   config: Config | None = None, kernel_name: str | None = None) -> dict:
    """What the JIT would specialize one stage's kernel on, as plain data: the kernel name, its
    signature, constexpr values, divisibility attributes (by argument position) and options.
    Plain data, so another Triton version can compile the same source (see NOTES). Tiles come
    from the shapes' bucket, as at run time; `config` defaults to the untuned one."""
    em = kern.emitters[stage_index]
    if kernel_name is not None and em.list_emitter is not None and kernel_name == em.list_emitter.name:
        em = em.list_emitter  # the block-list kernel has the same arguments
    stage = kern.plan.stages[stage_index]
    c = kern.plan.cascade
    ext = kern._extents_from_shapes(shapes)
    bucket = dict(dispatch.bucket_of(ext, kern.token_ranks))
    tiles = stage_tiles(stage, bucket, config or default_config(kern.plan.stages, ext, "gpu"))
    tiles.update(group_tiles(stage, {**ext, **shapes}, tiles["BLOCK_S"]))  # a group size given with the shapes
    sig, constexprs, attrs = {}, {}, {}
    for pos, (n, k) in enumerate(em.arg_names()):
        if k == "ptr":
            t = n[:-4]
            decl = c.tensors[t].dtype if t in c.input_names else None
            if t in c.input_names and t not in kern.fp32_spelled:
                ty = INT_SIG.get(decl) or DTYPE_SIG[dtype if decl in (None, "fp32", "fp16", "bf16") else decl]
            elif t in c.output_names and t not in stage.summed_across_programs and t not in kern.fp32_spelled:
                ty = DTYPE_SIG[dtype]
            else:
                ty = "fp32"
            sig[n] = "*" + ty
            attrs[(pos,)] = [["tt.divisibility", 16]]
        elif k == "stride":
            t, dim = n[len("stride_"):].rsplit("_", 1)
            if int(dim) == len(c.tensors[t].ranks) - 1:
                sig[n] = "constexpr"
                constexprs[n] = 1
            else:
                sig[n] = "i32"
                attrs[(pos,)] = [["tt.divisibility", 16]]
        elif k == "blist_ptr":
            sig[n] = "*i32"
            attrs[(pos,)] = [["tt.divisibility", 16]]
        elif k in ("dim", "param_int", "blist_dim"):
            sig[n] = "i32"
        elif k == "param":
            sig[n] = "fp32"
        else:
            sig[n] = "constexpr"
            constexprs[n] = ext[n] if n in ext else tiles[n]
    return {"name": em.name, "signature": sig, "constexprs": constexprs,
            "divisible": [pos for (pos,) in attrs],
            "options": launch_options(tiles)}


def compile_stage(kern, stage_index: int, shapes: dict, dtype: str = "bf16", target: str = "sm_90",
                  kernel_name: str | None = None, config: Config | None = None):
    """Compile one stage's kernel for `target`; returns the triton CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = specialization(kern, stage_index, shapes, dtype, config, kernel_name)
    fn = getattr(_compiled_module(kern._source), spec["name"])
    attrs = {(pos,): [["tt.divisibility", 16]] for pos in spec["divisible"]}
    cap = int(target.replace("sm_", ""))
    src = ASTSource(fn, spec["signature"], spec["constexprs"], attrs)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=spec["options"])


def _usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(cubin)
        path = fh.name
    try:
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(path)
    # one line per function: the kernel and any device function it calls (a `.func` helper);
    # the worst of them, not whichever the dump lists first
    worst = lambda field: max(int(v) for v in re.findall(field + r":(\d+)", out))  # noqa: E731
    # "stack": the STACK frame, where recent ptxas also puts spilled registers
    return {"registers": worst("REG"), "spills": worst("LOCAL"), "stack": worst("STACK"),
            "shared_bytes": worst("SHARED")}


AOT_FORMAT = 6  # bump when what is measured (or how) changes


def usage_key(kern, shapes: dict, dtype: str, target: str, config: Config | None = None) -> str:
    """The cache key of one AOT measurement: exactly what is compiled (the source and every
    kernel's specialization, `kern.specializations`), the target and Triton's version. Not `cache.key`, whose hash of
    einsum-ir's own code would throw away ~100 s of compiles after any unrelated edit; the
    source text and the specialization already carry everything the result depends on."""
    specs = kern.specializations(shapes, dtype, config)
    for spec in specs:  # JSON needs str keys; positions are already in "divisible"
        spec["constexprs"] = sorted(spec["constexprs"].items())
    text = json.dumps([AOT_FORMAT, kern._source, specs, target, cache.versions()["triton"]],
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def resource_usage(kern, shapes: dict, dtype: str = "bf16", target: str = "sm_90",
                   config: Config | None = None) -> dict:
    """{"registers", "spills", "shared_bytes"} (worst over stages) plus "wgmma" and per-stage data.

    Results are cached on disk (kind "aot" of codegen.cache)."""
    return resource_usage_batch([(kern, shapes, dtype, target, config)])[0]


def resource_usage_batch(items: list) -> list[dict]:
    """Resource usage of many (kernel, shapes, dtype, target[, config]) at once: cached ones
    from disk, the rest compiled here, or in one clean subprocess when this process runs
    Triton's interpreter (TRITON_INTERPRET=1 at import makes in-process compiles impossible)."""
    items = [tuple(it) + (None,) * (5 - len(it)) for it in items]
    # no config given: the one the kernel launches with on that target
    items = [(k, sh, dt, tg, cfg if cfg is not None else k.launch_config(sh, dt, tg)) for k, sh, dt, tg, cfg in items]
    keys = [usage_key(*it) for it in items]
    found = {k: cache.load("aot", k) for k in dict.fromkeys(keys)}
    todo = {k: it for k, it in zip(keys, items) if found[k] is None}
    if todo:
        if _interpreting():
            results = _in_subprocess(list(todo.values()))
        else:
            results = [it[0].compiled_usage(*it[1:]) for it in todo.values()]
        for k, r in zip(todo, results):
            cache.store("aot", k, r)
            found[k] = r
    return [found[k] for k in keys]


def _interpreting() -> bool:
    """True when this process imported Triton under TRITON_INTERPRET=1: its library functions
    (tl.max, tl.cdiv, ...) are then interpreter objects and cannot be compiled here."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.standard.cdiv, JITFunction)


_CHILD = """
import json, sys
import einsum_ir as ei
from einsum_ir.codegen.kernel import compile_triton
from einsum_ir.codegen import aot
out = []
kernels = {}
for req in json.loads(sys.stdin.read()):
    key = (req["cascade"], tuple(req["fp32"]))
    if key not in kernels:
        kernels[key] = compile_triton(ei.parse(req["cascade"]), frozenset(req["fp32"]))
    kern = kernels[key]  # a TritonKernel, or the chunked scan's kernel (each its own config type)
    config = kern.config_class(**req["config"]) if req["config"] else None
    run = kern.compiled_usage if req["what"] == "usage" else kern.compiled_asm
    try:
        out.append(run(req["shapes"], req["dtype"], req["target"], config))
    except Exception as err:
        out.append({"error": f"{type(err).__name__}: {str(err)[-300:]}"})
print(json.dumps(out))
"""


def _in_subprocess(items: list, what: str = "usage") -> list:
    """Compile in a fresh interpreter without TRITON_INTERPRET (`what`: "usage" or "asm")."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    req = json.dumps([{"cascade": str(k.cascade), "fp32": sorted(k.fp32), "shapes": sh, "dtype": dt, "target": tg, "what": what,
                       "config": cfg.as_dict() if cfg else None} for k, sh, dt, tg, cfg in items])
    out = subprocess.run([sys.executable, "-c", _CHILD], input=req, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"AOT compile failed: {out.stderr.strip().splitlines()[-1:]}")
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for r in results:
        if isinstance(r, dict) and "error" in r:
            raise RuntimeError(f"AOT compile failed: {r['error']}")
    return results


ASYNC_LOADS = re.compile(r"\b(?:ttg|triton_gpu)\.async_copy_global_to_local\b|\bttng\.async_tma_copy_global_to_local\b")
ASYNC_MMA = re.compile(r"\bttng\.warp_group_dot\b[^\n]*isAsync = true")


def pipelining(ttgir: str, ptx: str) -> dict:
    """What the compiled loop shows of software pipelining: async copies into shared memory
    (cp.async or TMA) and async warpgroup MMAs in the TTGIR, cp.async in the PTX."""
    return {"async_loads": len(ASYNC_LOADS.findall(ttgir)), "async_mma": len(ASYNC_MMA.findall(ttgir)),
            "cp_async": ptx.count("cp.async.") > 0}


def launched(kern, stage_index: int) -> list[str]:
    """The kernels one stage launches, in order (its block-list kernel first)."""
    em = kern.emitters[stage_index]
    return ([em.list_emitter.name] if em.list_emitter is not None else []) + [em.name]


def asm(kern, shapes: dict, dtype: str = "bf16", target: str = "sm_90", config: Config | None = None) -> list[dict]:
    """{"name", "ttgir", "ptx"} for every kernel the cascade launches, compiled for `target`
    (in a clean subprocess when this process runs Triton's interpreter)."""
    config = config if config is not None else kern.launch_config(shapes, dtype, target)
    if _interpreting():
        return _in_subprocess([(kern, shapes, dtype, target, config)], "asm")[0]
    return kern.compiled_asm(shapes, dtype, target, config)


def _asm(kern, shapes: dict, dtype: str, target: str, config: Config | None = None) -> list[dict]:
    out = []
    for i in range(len(kern.emitters)):
        for name in launched(kern, i):
            ck = compile_stage(kern, i, shapes, dtype, target, name, config)
            out.append({"name": name, "ttgir": ck.asm["ttgir"], "ptx": ck.asm["ptx"]})
    return out


def kernel_usage(ck) -> dict:
    """One compiled kernel's registers, spills, shared memory, matrix instructions and pipelining."""
    u = _usage(ck.asm["cubin"])
    u["shared_bytes"] = max(u["shared_bytes"], int(getattr(ck.metadata, "shared", 0) or 0))
    u["wgmma"] = "wgmma" in ck.asm["ptx"]
    u["mma"] = "mma" in ck.asm["ptx"]
    u.update(pipelining(ck.asm["ttgir"], ck.asm["ptx"]))
    return u


def worst_usage(stages: list[dict]) -> dict:
    """The worst over a cascade's kernels; the matrix and pipelining facts over those kernels
    that have a matrix product (a scan's sweep that only sums a map has none)."""
    mma = [s for s in stages if s["mma"]] or stages
    return {"registers": max(s["registers"] for s in stages), "spills": max(s["spills"] for s in stages),
            "stack": max(s["stack"] for s in stages), "shared_bytes": max(s["shared_bytes"] for s in stages),
            "wgmma": all(s["wgmma"] for s in mma),
            "async_loads": min(s["async_loads"] for s in mma),
            "async_mma": min(s["async_mma"] for s in mma),
            "cp_async": all(s["cp_async"] for s in mma), "stages": stages}


def _resource_usage(kern, shapes: dict, dtype: str, target: str, config: Config | None = None) -> dict:
    stages = []
    for i, em in enumerate(kern.emitters):
        u = kernel_usage(compile_stage(kern, i, shapes, dtype, target, config=config))
        if em.list_emitter is not None:  # the block-list kernel must build too
            lk = compile_stage(kern, i, shapes, dtype, target, em.list_emitter.name, config)
            lu = _usage(lk.asm["cubin"])
            u["block_list"] = lu
            u["registers"] = max(u["registers"], lu["registers"])
            u["spills"] = max(u["spills"], lu["spills"])
        stages.append(u)
    return worst_usage(stages)
