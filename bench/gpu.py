"""The prepared GPU script (DESIGN section 7): correctness of every fused catalog variant against
the reference interpreter, then TFLOP/s of the generated Triton kernels next to SDPA and
FlexAttention wherever those can express the variant, forward and then forward + backward.
One run, one GPU, under 10 minutes.

    python bench/gpu.py                 # on a machine with a CUDA GPU
    python bench/gpu.py --dry-run       # anywhere: list the cases it would run, run nothing
    python bench/gpu.py --budget 300    # stop starting new measurements after 300 s

Phase 1 (correctness): each catalog variant is compiled with `ei.compile(c, backend="triton")`
(variants without a fused lowering are listed with the reason) and run at a ragged shape
(P=200, M=333, E=F=64; bf16 inputs) on the GPU; the output is compared with `ei.interpret` on
the same inputs (fp32 math) with atol=rtol=2e-2 (bf16 probabilities in the second GEMM), and
fills must match exactly (no NaN, same +-inf). `--fp32` adds an fp32-input check.

Phase 2 (speed): bf16, B=2, H=16, N=4096, D=64 unless the variant needs other ranks. FLOPs are
the useful ones, 2 x the tensor-core MACs of the present points as counted by `ei.counts`
(MoBA's from its selection tensor), the same number for every implementation of a variant, so
the TFLOP/s columns compare times. Times are medians of `triton.testing.do_bench`.
SDPA: `F.scaled_dot_product_attention` (is_causal, enable_gqa, or a dense mask / bias built
before timing; FlashBias's U @ W^T is formed inside the timed call). Flex:
`torch.compile(flex_attention)` with `create_block_mask` masks and `score_mod`s; compile time is
excluded (one warm-up call). "n/a" means the library cannot express the variant.

Phase 3 (training): forward + backward (`torch.autograd.grad` of the output for dQ, dK, dV and
any float bias), for TRAIN's variants: first the fused backward's gradients against autograd
through the interpreter at the check shape (bf16 inputs, tolerance 5e-2 of the largest
gradient), then TFLOP/s next to SDPA and FlexAttention at the speed shape. Useful FLOPs are 3.5x
the forward's (FlashAttention-2's count: two matrix products forward, five backward).

Phase 4 (decode): one decode step (P=1), B=8 sequences, 32 query heads on 8 KV heads, D=128,
bf16, against caches of M in {4096, 32768} keys: contiguous (`softmax_gqa`) and paged
(`paged_decode`, pages of 16 and 128 keys in shuffled order behind a block table), each output
checked against SDPA on the contiguous cache. A decode step reads the whole cache once, so
its figure is bandwidth: the K and V bytes over the time, as a fraction of the device table's
HBM peak (cost_model/devices.yaml). SDPA on the paged cases first gathers the pages (it has no
paged form); FlexAttention runs the contiguous cache.

Roof: softmax and causal softmax are also timed with the project's own hand-written
FlashAttention-2 kernel (bench/roof.py), the yardstick the generated kernels are measured by.

The tables are printed and, when the environment has OUT (the device runner's output folder),
written to $OUT/gpu_bench.txt.

Written for torch >= 2.5 (tested API surface: flex_attention, create_block_mask, enable_gqa)
and Triton 3.x.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch

import einsum_ir as ei

CHECK_SHAPE = {"P": 200, "M": 333, "E": 64, "F": 64, "B": 1, "H": 2}
BENCH = {"B": 2, "H": 16, "N": 4096, "D": 64}

# runtime params and extra ranks for the speed phase (the correctness phase uses
# tests/support.PARAMS, which are small)
BENCH_PARAMS = {
    "softmax_window": {"W": 1024},
    "sinks_window": {"NS": 64, "W": 1024},
    "nbhd_1d": {"W": 1024, "ST": 64},
    "nbhd_2d": {"WX": 17, "WY": 17, "SX": 1, "SY": 1, "PX": 64, "PY": 64, "MX": 64, "MY": 64},
    "softcap": {"cap": 30.0},
    "moba": {"BS": 256},
    "softmax_gqa": {"G": 4, "R": 4},
    "agent_attention": {"N": 64},
    "flashbias_lowrank": {"R": 16},
}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


T0 = time.perf_counter()


# ----------------------------------------------------------------------------- inputs


def check_inputs(name, c, device, dtype):
    from support import make_inputs

    s = CHECK_SHAPE
    return make_inputs(name, c, P=s["P"], M=s["M"], E=s["E"], F=s["F"], B=s["B"], H=s["H"], dtype=dtype,
                       device=device, seed=0)


def bench_inputs(name, c, device, dtype=torch.bfloat16):
    from support import make_inputs

    b = BENCH
    extra = dict(BENCH_PARAMS.get(name, {}))
    args = make_inputs(name, c, P=b["N"], M=b["N"], E=b["D"], F=b["D"], B=b["B"],
                       H=b["H"] if name != "softmax_gqa" else extra["G"], dtype=dtype, device=device,
                       seed=0, extra=extra)
    if name == "moba":  # a realistic MoBA selection: own block + ~25% of the earlier blocks
        bs = int(args["BS"])
        nb = -(-b["N"] // bs)
        g = torch.Generator().manual_seed(0)
        r = torch.rand(b["B"], b["H"], nb, nb, generator=g) < 0.25
        own = torch.eye(nb, nb, dtype=torch.bool)
        args["Sel"] = (r | own).to(device)
    return args


def shapes_of(c, args) -> dict:
    out = {}
    for d in c.inputs:
        for idx, n in zip(d.indices, args[d.name].shape):
            out[idx.upper()] = int(n)
    for p in c.params:
        if p.type is not None:
            out[p.name] = args[p.name]
    return out


def useful_flops(name, c, args) -> float:
    if name == "moba":
        sel, bs = args["Sel"], int(args["BS"])
        i = torch.arange(sel.shape[-2], device=sel.device)[:, None]
        j = torch.arange(sel.shape[-1], device=sel.device)[None, :]
        per_block = torch.where(j < i, bs * bs, torch.where(j == i, bs * (bs + 1) // 2, 0))
        pairs = float((sel.long() * per_block).sum())
        E, F = args["Q"].shape[-1], args["V"].shape[-1]
        return 2.0 * pairs * (E + F)
    return 2.0 * float(ei.counts(c, shapes_of(c, args)).macs)


# ----------------------------------------------------------------------------- SDPA and Flex


def sdpa_fn(name, args):
    """A zero-argument callable running SDPA on the variant, or None when it cannot."""
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention
    if not {"Q", "K", "V"} <= set(args):  # two query/key pairs, or one tensor for both sides
        return None
    q, k, v = args["Q"], args["K"], args["V"]
    P, M = q.shape[-2], k.shape[-2]
    dev = q.device
    i = torch.arange(P, device=dev)[:, None]
    j = torch.arange(M, device=dev)[None, :]
    if name in ("softmax", "softmax_deferred", "softmax_lse"):
        return lambda: sdpa(q, k, v)
    if name == "softmax_causal":
        return lambda: sdpa(q, k, v, is_causal=True)
    if name == "softmax_causal_bottom_right":
        mask = j <= i + (M - P)
        return lambda: sdpa(q, k, v, attn_mask=mask)
    if name == "softmax_window":
        mask = (j <= i) & (i - j < args["W"])
        return lambda: sdpa(q, k, v, attn_mask=mask)
    if name == "sinks_window":
        mask = (j <= i) & ((j < args["NS"]) | (i - j < args["W"]))
        return lambda: sdpa(q, k, v, attn_mask=mask)
    if name == "softmax_gqa":
        b, g, r, p, e = q.shape
        qq = q.reshape(b, g * r, p, e)
        return lambda: sdpa(qq, k, v, enable_gqa=True)
    if name == "bias_tensor":
        return lambda: sdpa(q, k, v, attn_mask=args["Bias"].to(q.dtype))
    if name == "flashbias_lowrank":
        u, w = args["U"], args["W"]
        return lambda: sdpa(q, k, v, attn_mask=(u @ w.transpose(-1, -2)).to(q.dtype))
    if name == "alibi":
        slope = args["Slope"].to(torch.float32)
        bias = -slope[:, None, None] * (i - j).to(torch.float32)
        bias = bias.masked_fill(~(j <= i), float("-inf")).to(q.dtype)[None]
        return lambda: sdpa(q, k, v, attn_mask=bias)
    if name == "moba":
        bs = int(args["BS"])
        sel = args["Sel"]
        mask = sel[:, :, (i // bs).squeeze(1)][:, :, :, (j // bs).squeeze(0)] & (j <= i)
        return lambda: sdpa(q, k, v, attn_mask=mask)
    if name == "nbhd_1d":
        mask = _nbhd_mask(P, M, args["W"], args["ST"], dev)
        return lambda: sdpa(q, k, v, attn_mask=mask)
    return None


def _nbhd_start(q, L, w, s):
    left = w // 2
    right = w // 2 + w % 2 - 1
    leader = torch.clamp((q // s) * s + s // 2, max=L - 1)
    start = torch.clamp(leader - left, min=0) + (leader + right >= L).long() * (L - right - leader - 1)
    return torch.clamp(start, min=0)


def _nbhd_mask(P, M, w, s, dev):
    qi = torch.arange(P, device=dev)[:, None]
    kj = torch.arange(M, device=dev)[None, :]
    start = _nbhd_start(qi, M, w, s)
    return (kj >= start) & (kj < start + w)


_FLEX = {}


def flex_fn(name, args):
    """A zero-argument callable running compiled FlexAttention on the variant, or None."""
    import torch._dynamo as dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fa" not in _FLEX:
        # every variant brings its own score_mod/mask_mod: one recompile each. Start each from a
        # clean cache and raise the recompile limit, so that Dynamo never falls back to eager
        # (unfused) flex_attention after 8 recompiles.
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        if hasattr(dynamo.config, "accumulated_cache_size_limit"):
            dynamo.config.accumulated_cache_size_limit = max(dynamo.config.accumulated_cache_size_limit, 256)
    else:
        dynamo.reset()
    _FLEX["fa"] = torch.compile(flex_attention, dynamic=False)
    fa = _FLEX["fa"]
    q, k, v = args["Q"], args["K"], args["V"]
    P, M = q.shape[-2], k.shape[-2]
    dev = q.device

    def bm(mask_mod, B=None, H=None):
        return create_block_mask(mask_mod, B, H, P, M, device=dev)

    if name in ("softmax", "softmax_deferred", "softmax_lse"):
        return lambda: fa(q, k, v)
    if name == "softmax_causal":
        mask = bm(lambda b, h, qi, ki: ki <= qi)
        return lambda: fa(q, k, v, block_mask=mask)
    if name == "softmax_causal_bottom_right":
        off = M - P
        mask = bm(lambda b, h, qi, ki: ki <= qi + off)
        return lambda: fa(q, k, v, block_mask=mask)
    if name == "softmax_window":
        W = int(args["W"])
        mask = bm(lambda b, h, qi, ki: (ki <= qi) & (qi - ki < W))
        return lambda: fa(q, k, v, block_mask=mask)
    if name == "sinks_window":
        W, NS = int(args["W"]), int(args["NS"])
        mask = bm(lambda b, h, qi, ki: (ki <= qi) & ((ki < NS) | (qi - ki < W)))
        return lambda: fa(q, k, v, block_mask=mask)
    if name == "softmax_gqa":
        b, g, r, p, e = q.shape
        qq = q.reshape(b, g * r, p, e)
        return lambda: fa(qq, k, v, enable_gqa=True)
    if name == "softcap":
        cap = float(args["cap"])
        return lambda: fa(q, k, v, score_mod=lambda s, b, h, qi, ki: cap * torch.tanh(s / cap))
    if name == "alibi":
        slope = args["Slope"].to(torch.float32)
        mask = bm(lambda b, h, qi, ki: ki <= qi)
        return lambda: fa(q, k, v, block_mask=mask,
                          score_mod=lambda s, b, h, qi, ki: s - slope[h] * (qi - ki))
    if name == "bias_tensor":
        bias = args["Bias"]
        return lambda: fa(q, k, v, score_mod=lambda s, b, h, qi, ki: s + bias[b, h, qi, ki])
    if name == "moba":
        sel, bs = args["Sel"], int(args["BS"])
        mask = bm(lambda b, h, qi, ki: sel[b, h, qi // bs, ki // bs] & (ki <= qi), B=q.shape[0], H=q.shape[1])
        return lambda: fa(q, k, v, block_mask=mask)
    if name == "nbhd_1d":
        W, ST = int(args["W"]), int(args["ST"])
        mask = bm(lambda b, h, qi, ki: (ki >= _nbhd_start(qi, M, W, ST)) & (ki < _nbhd_start(qi, M, W, ST) + W))
        return lambda: fa(q, k, v, block_mask=mask)
    if name == "softplus_l1":
        E = q.shape[-1]
        lscale = math.log(E) * math.log(M) / math.sqrt(E)
        # softmax(log softplus(s)) = softplus(s) / sum softplus(s): the L1 normalization
        return lambda: fa(q, k, v, scale=1.0,
                          score_mod=lambda s, b, h, qi, ki: torch.log(torch.nn.functional.softplus(s * lscale)))
    return None


def roof_fn(name, args):
    """The hand-written FlashAttention-2 forward (bench/roof.py) where it applies, else None."""
    if name not in ("softmax", "softmax_causal"):
        return None
    from roof import attention

    q, k, v = args["Q"], args["K"], args["V"]
    return lambda: attention(q, k, v, causal=name == "softmax_causal")


SDPA_CAN = ["softmax", "softmax_deferred", "softmax_lse", "softmax_causal", "softmax_causal_bottom_right",
            "softmax_window", "sinks_window", "softmax_gqa", "bias_tensor", "flashbias_lowrank", "alibi",
            "moba", "nbhd_1d"]
FLEX_CAN = ["softmax", "softmax_deferred", "softmax_lse", "softmax_causal", "softmax_causal_bottom_right",
            "softmax_window", "sinks_window", "softmax_gqa", "softcap", "alibi", "bias_tensor", "moba",
            "nbhd_1d", "softplus_l1"]


# ----------------------------------------------------------------------------- phases


def close(out, ref, atol, rtol) -> tuple[bool, float, str]:
    out = out if isinstance(out, tuple) else (out,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    worst = 0.0
    for o, r in zip(out, ref):
        o, r = o.float(), r.float()
        if o.shape != r.shape:
            return False, math.inf, f"shape {tuple(o.shape)} != {tuple(r.shape)}"
        if torch.isnan(o).any():
            return False, math.inf, "NaN in output"
        if not torch.equal(torch.isinf(o), torch.isinf(r)):
            return False, math.inf, "fills (+-inf) differ"
        fin = torch.isfinite(r)
        d = (o[fin] - r[fin]).abs()
        worst = max(worst, float(d.max()) if d.numel() else 0.0)
        if not bool((d <= atol + rtol * r[fin].abs()).all()):
            return False, worst, "values differ"
    return True, worst, ""


def phase_correctness(names, device, fp32: bool, deadline: float) -> tuple[dict, dict]:
    kernels, results = {}, {}
    for name in names:
        c = ei.variants.load(name)
        try:
            kern = ei.compile(c, backend="triton")
        except ei.LoweringError as err:
            results[name] = ("not fused", str(err).splitlines()[0][:90])
            log(f"{name}: not fused ({str(err)[:80]})")
            continue
        except Exception as err:  # noqa: BLE001 - an emitter bug: report it, keep going
            results[name] = ("FAIL", f"compile: {type(err).__name__}: {str(err)[:70]}")
            log(f"{name}: compile FAILED {type(err).__name__}: {err}")
            continue
        kernels[name] = kern
        if time.perf_counter() > deadline:
            results[name] = ("skipped", "time budget")
            continue
        msgs, ok_all = [], True
        for dtype, tol in [(torch.bfloat16, 2e-2)] + ([(torch.float32, 1e-2)] if fp32 else []):
            try:
                args = check_inputs(name, c, device, dtype)
                out = kern(**args)
                torch.cuda.synchronize()
                ref = ei.interpret(c, **args)
                ok, err, why = close(out, ref, tol, tol)
            except Exception as e:  # noqa: BLE001 - report and keep going
                ok, err, why = False, math.inf, f"{type(e).__name__}: {str(e).splitlines()[0][:70]}"
                traceback.print_exc()
            ok_all &= ok
            msgs.append(f"{str(dtype)[6:]} max|err| {err:.1e}" + (f" ({why})" if why else ""))
        results[name] = ("PASS" if ok_all else "FAIL", "; ".join(msgs))
        log(f"{name}: {results[name][0]} {results[name][1]}")
    return kernels, results


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def phase_speed(kernels, device, deadline: float, skip_flex: bool) -> dict:
    """Ours and SDPA for every variant first, then FlexAttention (whose compiles are the slow
    part), so that a tight budget only cuts Flex cells."""
    rows, inputs = {}, {}
    for name, kern in kernels.items():
        c = kern.cascade
        row = {"ours": None, "sdpa": None, "flex": None, "roof": None}
        rows[name] = row
        if time.perf_counter() > deadline:
            row["note"] = "skipped (time budget)"
            continue
        try:
            args = bench_inputs(name, c, device)
            row["flops"] = useful_flops(name, c, args)
            kern(**args)  # compile for this shape outside the timing
            row["ours"] = bench_ms(lambda kern=kern, args=args: kern(**args))
        except Exception as e:  # noqa: BLE001 - report and keep going
            row["note"] = f"ours failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
            log(f"{name}: {row['note']}")
            continue
        inputs[name] = args
        row["sdpa"] = _measure(name, "sdpa", sdpa_fn, args, deadline)
        row["roof"] = _measure(name, "roof", roof_fn, args, deadline)
        log(f"{name}: ours {row['ours']:.3f} ms, sdpa {row['sdpa']}, roof {row['roof']}")
    for name, args in inputs.items():
        if skip_flex:
            rows[name]["flex"] = "skipped"
            continue
        rows[name]["flex"] = _measure(name, "flex", flex_fn, args, deadline)
        log(f"{name}: flex {rows[name]['flex']}")
    return rows


def _measure(name, lib, make, args, deadline):
    if time.perf_counter() > deadline:
        return "budget"
    try:
        fn = make(name, args)
        if fn is None:
            return "n/a"
        fn()  # warm-up (compiles flex)
        torch.cuda.synchronize()
        return bench_ms(fn)
    except Exception as e:  # noqa: BLE001 - report and keep going
        log(f"{name}: {lib} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        return "error"


TRAIN = ["softmax", "softmax_causal", "softmax_window", "softcap", "alibi", "bias_tensor", "softplus_l1"]


def _requiring_grad(args: dict) -> dict:
    return {k: (v.detach().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in args.items()}


def _step(fn, args: dict, seed: torch.Tensor | None = None):
    """A zero-argument callable: fn's output and its backward; returns the gradients of args."""
    leaves = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def step():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        dout = seed if seed is not None else torch.ones_like(out)
        found = torch.autograd.grad(out, [args[k] for k in leaves], dout.reshape(out.shape), allow_unused=True)
        return {k: g for k, g in zip(leaves, found) if g is not None}
    return step


def check_training(kern, name: str, device, dtype=torch.bfloat16, tol: float = 5e-2) -> tuple[str, str]:
    """(PASS or FAIL, what was compared): the kernel's gradients against autograd through the
    interpreter in fp32 on the same inputs, at the check shape."""
    c = kern.cascade
    args = _requiring_grad(check_inputs(name, c, device, dtype))
    first = kern(**args)
    first = first[0] if isinstance(first, tuple) else first
    seed = torch.randn(first.shape, device=device, dtype=first.dtype)
    got = _step(lambda: kern(**args), args, seed)()
    wide = _requiring_grad({k: (v.detach().float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                            for k, v in args.items()})
    want = _step(lambda: ei.interpret(c, **wide), wide, seed.float())()
    if got.keys() != want.keys():
        return "FAIL", f"gradients of {sorted(got)}, expected {sorted(want)}"
    worst = max(float((got[k].float() - want[k]).abs().max()) / max(1.0, float(want[k].abs().max())) for k in want)
    return ("PASS" if worst <= tol else "FAIL"), f"grads {', '.join(want)}: max rel err {worst:.1e}"


def phase_training(names, device, deadline: float, skip_flex: bool) -> tuple[dict, dict]:
    checks, rows = {}, {}
    for name in names:
        c = ei.variants.load(name)
        if time.perf_counter() > deadline:
            checks[name] = ("skipped", "time budget")
            continue
        try:
            kern = ei.compile(c, backend="triton")
            checks[name] = check_training(kern, name, device)
        except Exception as e:  # noqa: BLE001 - report and keep going
            checks[name] = ("FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:70]}")
            traceback.print_exc()
            continue
        log(f"{name} backward: {checks[name][0]} {checks[name][1]}")
        row = {}
        rows[name] = row
        try:
            args = _requiring_grad(bench_inputs(name, c, device))
            row["flops"] = 3.5 * useful_flops(name, c, args)
            step = _step(lambda: kern(**args), args)
            step()
            row["ours"] = bench_ms(step)
        except Exception as e:  # noqa: BLE001
            row["note"] = f"ours failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
            log(f"{name}: {row['note']}")
            continue
        for lib, make in (("sdpa", sdpa_fn), ("flex", flex_fn)):
            if lib == "flex" and skip_flex:
                row[lib] = "skipped"
                continue
            row[lib] = _measure(name, lib, lambda n, a, make=make: _training_of(make(n, a), a), args, deadline)
        log(f"{name} fwd+bwd: ours {row['ours']:.3f} ms, sdpa {row['sdpa']}, flex {row['flex']}")
    return checks, rows


def _training_of(fn, args):
    return None if fn is None else _step(fn, args)


DECODE = {"B": 8, "H": 32, "KV": 8, "D": 128, "M": (4096, 32768), "pages": (None, 16, 128)}


def device_peak_bandwidth() -> tuple[str, float]:
    """The device table's entry for this GPU (by its name) and its HBM peak in bytes/s."""
    from cost_model import devices

    name = torch.cuda.get_device_name().lower()
    for d in devices.table().values():
        if d.key in name.replace(" ", "") or any(a.lower() in name for a in d.aliases):
            return d.name, d.hbm_bandwidth
    return "unknown device (H100 SXM assumed)", devices.get("h100").hbm_bandwidth


def phase_decode(device, deadline: float, skip_flex: bool) -> list[dict]:
    """Decode steps: ours (contiguous and paged) against SDPA and Flex; bandwidth of each."""
    import torch.nn.functional as F

    from cpu import gathered, paged_cache

    d = DECODE
    rows = []
    kernels = {"contiguous": ei.compile(ei.variants.load("softmax_gqa"), backend="triton"),
               "paged": ei.compile(ei.variants.load("paged_decode"), backend="triton")}
    for m in d["M"]:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(d["B"], d["H"], 1, d["D"], generator=g).to(device, torch.bfloat16)
        k, v = (torch.randn(d["B"], d["KV"], m, d["D"], generator=g).to(device, torch.bfloat16) for _ in range(2))
        qg = q.reshape(d["B"], d["KV"], d["H"] // d["KV"], 1, d["D"])
        want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        cache_bytes = 2 * k.numel() * k.element_size()
        for page in d["pages"]:
            row = {"M": m, "case": "contiguous" if page is None else f"paged{page}", "bytes": cache_bytes}
            rows.append(row)
            if time.perf_counter() > deadline:
                row["note"] = "skipped (time budget)"
                continue
            if page is None:
                ours = lambda: kernels["contiguous"](Q=qg, K=k, V=v)  # noqa: E731
                sdpa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
            else:
                pool_k, pool_v, table = (x.to(device) for x in paged_cache(k.cpu(), v.cpu(), page))
                lengths = torch.full((d["B"],), m, dtype=torch.int32, device=device)
                ours = (lambda pk=pool_k, pv=pool_v, t=table, n=lengths:
                        kernels["paged"](Q=qg, Kc=pk, Vc=pv, Tbl=t, Len=n, M=m))
                sdpa = (lambda pk=pool_k, pv=pool_v, t=table: F.scaled_dot_product_attention(
                    q, gathered(pk, t), gathered(pv, t), enable_gqa=True))
            try:
                out = ours().reshape(want.shape).float()
                err = float((out - want.float()).abs().max())
                row["check"] = "PASS" if err < 2e-2 else f"FAIL (max err {err:.1e})"
                row["ours"] = bench_ms(ours)
            except Exception as e:  # noqa: BLE001 - report and keep going
                row["note"] = f"ours failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
                log(f"decode {row['case']} M={m}: {row['note']}")
                continue
            row["sdpa"] = _timed(sdpa)
            if not skip_flex and page is None:
                from torch.nn.attention.flex_attention import flex_attention

                fa = torch.compile(flex_attention)
                row["flex"] = _timed(lambda: fa(q, k, v, enable_gqa=True))
            log(f"decode {row['case']} M={m}: ours {row['ours']:.3f} ms, sdpa {row.get('sdpa')}, "
                f"flex {row.get('flex')}")
    return rows


def _timed(fn):
    try:
        fn()
        torch.cuda.synchronize()
        return bench_ms(fn)
    except Exception as e:  # noqa: BLE001 - report and keep going
        log(f"decode: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        return "error"


def _decode_table(rows) -> None:
    device, peak = device_peak_bandwidth()
    d = DECODE
    _header(f"Decode (bf16, P=1, B={d['B']} H={d['H']} on {d['KV']} KV heads D={d['D']}; bandwidth = K and V "
            f"bytes / time, as a fraction of {device}'s {peak / 1e12:g} TB/s)",
            f"{'case':11s} {'M':>6s} {'check':6s} {'ours ms':>8s} {'sdpa ms':>8s} {'flex ms':>8s} "
            f"{'ours/sdpa':>9s} {'ours/flex':>9s} {'ours BW':>8s} {'sdpa BW':>8s}")
    contiguous = {r["M"]: r.get("ours") for r in rows if r["case"] == "contiguous"}
    for r in rows:
        if r.get("ours") is None:
            print(f"{r['case']:11s} {r['M']:6d} {r.get('note', '-')}")
            continue
        frac = {k: (f"{r['bytes'] / (r[k] * 1e-3) / peak:8.0%}" if isinstance(r.get(k), float) else f"{'-':>8s}")
                for k in ("ours", "sdpa")}
        ms = {k: (f"{r[k]:8.3f}" if isinstance(r.get(k), float) else f"{str(r.get(k, '-')):>8s}")
              for k in ("ours", "sdpa", "flex")}
        print(f"{r['case']:11s} {r['M']:6d} {r['check'][:6]:6s} {ms['ours']} {ms['sdpa']} {ms['flex']} "
              f"{_speedup(r.get('sdpa'), r['ours'])} {_speedup(r.get('flex'), r['ours'])} {frac['ours']} {frac['sdpa']}")
    for r in rows:
        if r["case"] != "contiguous" and isinstance(r.get("ours"), float) and isinstance(contiguous.get(r["M"]), float):
            print(f"  {r['case']} M={r['M']}: paged / contiguous (ours) {r['ours'] / contiguous[r['M']]:.2f}")
    print("ours/x > 1: ours is faster; sdpa on the paged cases includes gathering the pages.")


def print_tables(results, rows, training=None, decode=None) -> None:
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        _tables(results, rows)
        if training is not None:
            _training_tables(*training)
        if decode is not None:
            _decode_table(decode)
    print(text.getvalue(), end="")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_bench.txt"), "w") as fh:
            fh.write(text.getvalue())


def _tflops(ms, flops) -> str:
    return f"{flops / (ms * 1e-3) / 1e12:9.1f}" if isinstance(ms, float) else f"{(ms or '-'):>9s}"


def _speedup(other, ours) -> str:
    return f"{other / ours:8.2f}x" if isinstance(other, float) and isinstance(ours, float) else f"{'-':>9s}"


def _checks(title: str, results: dict) -> None:
    print()
    print(title)
    print("-" * 100)
    for name, (status, msg) in results.items():
        print(f"{name:28s} {status:10s} {msg}")


def _tables(results, rows) -> None:
    _checks("Correctness (Triton kernel vs ei.interpret, bf16 inputs, P=200 M=333 E=F=64)", results)
    passed = sum(1 for s, _ in results.values() if s == "PASS")
    failed = [n for n, (s, _) in results.items() if s == "FAIL"]
    print(f"{passed} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    print()
    b = BENCH
    print(f"Speed (bf16, B={b['B']} H={b['H']} N={b['N']} D={b['D']} unless noted; TFLOP/s of useful FLOPs)")
    head = f"{'variant':28s} {'GFLOP':>8s} {'ours ms':>8s} {'ours TF/s':>9s} {'sdpa TF/s':>9s} {'flex TF/s':>9s} " \
           f"{'roof TF/s':>9s} {'ours/sdpa':>9s} {'ours/flex':>9s} {'ours/roof':>9s}"
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        if r.get("ours") is None:
            print(f"{name:28s} {r.get('note', '-')}")
            continue
        fl, ours = r["flops"], r["ours"]
        print(f"{name:28s} {fl / 1e9:8.1f} {ours:8.3f} " +
              " ".join([_tflops(r[k], fl) for k in ("ours", "sdpa", "flex", "roof")] +
                       [_speedup(r[k], ours) for k in ("sdpa", "flex", "roof")]))
    print("ours/x > 1: the generated kernel is faster than x. n/a: the library cannot express the variant;")
    print("roof: the hand-written FlashAttention-2 kernel of bench/roof.py (softmax, causal softmax).")


def _header(title: str, head: str) -> None:
    print()
    print(title)
    print(head)
    print("-" * len(head))


def _training_tables(checks, rows) -> None:
    _checks("Training: fused backward vs autograd through ei.interpret (bf16 inputs, P=200 M=333 E=F=64)", checks)
    b = BENCH
    _header(f"Forward + backward (bf16, B={b['B']} H={b['H']} N={b['N']} D={b['D']} unless noted; TFLOP/s of 3.5x "
            f"the forward's useful FLOPs)",
            f"{'variant':28s} {'ours ms':>8s} {'ours TF/s':>9s} {'sdpa TF/s':>9s} {'flex TF/s':>9s} "
            f"{'ours/sdpa':>9s} {'ours/flex':>9s}")
    for name, r in rows.items():
        if r.get("ours") is None:
            print(f"{name:28s} {r.get('note', '-')}")
            continue
        fl, ours = r["flops"], r["ours"]
        print(f"{name:28s} {ours:8.3f} " + " ".join([_tflops(r[k], fl) for k in ("ours", "sdpa", "flex")] +
                                                    [_speedup(r[k], ours) for k in ("sdpa", "flex")]))


def dry_run(names) -> None:
    print(f"bench/gpu.py --dry-run: torch {torch.__version__}; would run on a CUDA GPU:")
    print(f"phase 1: correctness at {CHECK_SHAPE} (bf16) against ei.interpret")
    for name in names:
        c = ei.variants.load(name)
        try:
            kern = ei.compile(c, backend="triton")
            del kern
            status = "fused"
        except ei.LoweringError as err:
            status = f"not fused: {str(err).splitlines()[0][:70]}"
        print(f"  {name:28s} {status}")
    print(f"phase 2: speed at {BENCH} bf16 (per-variant params below)")
    for name in names:
        c = ei.variants.load(name)
        try:
            ei.compile(c, backend="triton")
        except ei.LoweringError:
            continue
        args = bench_inputs(name, c, "cpu") if name not in ("bias_tensor",) else None
        shapes = shapes_of(c, args) if args else {"note": "N x N bias"}
        if args:
            shapes = {k: v for k, v in shapes.items() if k not in ("PB", "MB")}
        libs = [lib for lib, can in (("sdpa", SDPA_CAN), ("flex", FLEX_CAN)) if name in can]
        print(f"  {name:28s} vs {', '.join(libs) or 'nothing (n/a)':12s} {shapes}")
    print(f"phase 3: forward + backward, gradients at {CHECK_SHAPE} then speed at {BENCH}: "
          + ", ".join(n for n in TRAIN if n in names))
    print(f"phase 4: decode steps at {DECODE} (bf16): softmax_gqa and paged_decode against SDPA and Flex")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list the cases; needs no GPU")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds after which no new measurement starts")
    ap.add_argument("--fp32", action="store_true", help="also check fp32 inputs")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take time)")
    ap.add_argument("--variants", nargs="+", default=None)
    ap.add_argument("--no-backward", action="store_true", help="skip phase 3 (forward + backward)")
    ap.add_argument("--no-decode", action="store_true", help="skip phase 4 (decode steps)")
    ap.add_argument("--backward-budget", type=float, default=120.0,
                    help="seconds phase 3 may run past --budget (default 120)")
    args = ap.parse_args(argv)
    names = args.variants or ei.variants.names()
    if args.dry_run:
        dry_run(names)
        return 0
    if not torch.cuda.is_available():
        print("no CUDA GPU: run with --dry-run to list the cases", file=sys.stderr)
        return 2
    import triton

    device = "cuda"
    log(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    deadline = T0 + args.budget
    kernels, results = phase_correctness(names, device, args.fp32, deadline)
    rows = phase_speed(kernels, device, deadline, args.no_flex)
    training = None if args.no_backward else phase_training([n for n in TRAIN if n in names], device,
                                                             deadline + args.backward_budget, args.no_flex)
    decode = None if args.no_decode else phase_decode(device, deadline + args.backward_budget + 60, args.no_flex)
    print_tables(results, rows, training, decode)
    log("done")
    failed = [s for s, _ in list(results.values()) + (list(training[0].values()) if training else [])]
    failed += [r["check"][:4] for r in decode or [] if "check" in r]
    return 1 if "FAIL" in failed else 0


if __name__ == "__main__":
    sys.exit(main())
