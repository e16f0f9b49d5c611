"""A hand-written FlashAttention-2 forward in Triton: the yardstick for the generated kernels.

    python bench/roof.py            # AOT statistics (no GPU): roof next to the generated kernels
    python bench/roof.py --check    # run the roof in Triton's interpreter against SDPA (CPU)

The kernel is written by hand for the two cases it covers, softmax attention with and without
a causal mask, in the shape the generated kernels aim for: a query tile per program, keys and
values streamed through shared memory, the running max and sum in registers, exp2 with
log2(e) folded into the score scale, and for the causal mask one unmasked loop below the
diagonal and one masked loop over it (no branch in either). `bench/gpu.py` times it beside the
generated kernels, SDPA and FlexAttention; here the same AOT columns as docs/kernels.md compare
registers, spills, shared memory and software pipelining.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if __name__ == "__main__" and "--check" in sys.argv:  # CPU tensors run in the interpreter,
    os.environ.setdefault("TRITON_INTERPRET", "1")  # which must be chosen before importing triton

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

LOG2E = 1.4426950408889634


@triton.jit
def _attend(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, lo, hi, offs_m, offs_n, n_keys,
            qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) in tiles of BLOCK_N; MASKED tiles test the key bound (and, CAUSAL, the
    diagonal)."""
    k_ptrs += lo * stride_kn
    v_ptrs += lo * stride_vn
    for start in range(lo, hi, BLOCK_N):
        if MASKED:
            keys = start + offs_n
            k = tl.load(k_ptrs, mask=(keys < n_keys)[None, :], other=0.0)
            qk = tl.dot(q, k) * qk_scale
            keep = (keys < n_keys)[None, :]
            if CAUSAL:
                keep = keep & (keys[None, :] <= offs_m[:, None])
            qk = tl.where(keep, qk, float("-inf"))
            v = tl.load(v_ptrs, mask=(keys < n_keys)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            qk = tl.dot(q, k) * qk_scale
            v = tl.load(v_ptrs)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, m_i, l_i


@triton.jit
def roof_forward(Q, K, V, O, stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn,
                 stride_vz, stride_vh, stride_vn, stride_oz, stride_oh, stride_om, H, N_Q, N_K, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Softmax attention of one query tile over one (batch, head); last strides are 1."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    off_hz = tl.program_id(1).to(tl.int64)
    z, h = off_hz // H, off_hz % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + z * stride_qz + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=(offs_m < N_Q)[:, None], other=0.0)
    k_ptrs = K + z * stride_kz + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = V + z * stride_vz + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    if CAUSAL:  # keys below the tile's first query: no mask; the diagonal band: masked
        full_end = (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
        band_end = tl.minimum((pid_m + 1) * BLOCK_M, N_K)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, 0, full_end,
                                offs_m, offs_n, N_K, qk_scale, False, True, BLOCK_N)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, full_end, band_end,
                                offs_m, offs_n, N_K, qk_scale, True, True, BLOCK_N)
    else:  # whole tiles unmasked, then the ragged last one
        full_end = N_K // BLOCK_N * BLOCK_N
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, 0, full_end,
                                offs_m, offs_n, N_K, qk_scale, False, False, BLOCK_N)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, full_end, N_K,
                                offs_m, offs_n, N_K, qk_scale, True, False, BLOCK_N)
    out = acc / l_i[:, None]
    tl.store(O + z * stride_oz + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=(offs_m < N_Q)[:, None])


def attention(q, k, v, causal: bool, block_m: int = 128, block_n: int = 64, warps: int = 8, stages: int = 2):
    """`roof_forward` on [B, H, N, D] tensors (the keys' last dimension contiguous)."""
    import torch

    B, H, NQ, D = q.shape
    NK = k.shape[2]
    o = torch.empty_like(q)
    grid = (triton.cdiv(NQ, block_m), B * H)
    extra = {} if q.device.type == "cpu" else {"num_warps": warps, "num_stages": stages, "enable_fp_fusion": True}
    roof_forward[grid](q, k, v, o, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                       H, NQ, NK, 1.0 / math.sqrt(D), HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
                       CAUSAL=causal, **extra)
    return o


def aot(causal: bool, head_dim: int, target: str = "sm_90", block_m: int = 128, block_n: int = 64,
        warps: int = 8, stages: int = 2) -> dict:
    """Registers, spills, shared memory and pipelining of the roof, compiled for `target` with no
    GPU (bf16, the generated kernels' default tiles)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from einsum_ir.codegen.aot import _usage, pipelining

    sig = {n: "*bf16" for n in ("Q", "K", "V", "O")}
    sig |= {n: "i32" for n in ("stride_qz", "stride_qh", "stride_qm", "stride_kz", "stride_kh", "stride_kn",
                               "stride_vz", "stride_vh", "stride_vn", "stride_oz", "stride_oh", "stride_om",
                               "H", "N_Q", "N_K")}
    sig |= {"sm_scale": "fp32", "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
            "CAUSAL": "constexpr"}
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "CAUSAL": causal}
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names[:4] + names[4:16]}
    src = ASTSource(roof_forward, sig, constexprs, attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", int(target[3:]), 32),
                        options={"num_warps": warps, "num_stages": stages, "enable_fp_fusion": True})
    u = _usage(ck.asm["cubin"])
    u["shared_bytes"] = max(u["shared_bytes"], int(getattr(ck.metadata, "shared", 0) or 0))
    return u | pipelining(ck.asm["ttgir"], ck.asm["ptx"])


def aot_table() -> str:
    """The roof and the generated softmax kernels side by side (sm_90, bf16, 128 x 64 tiles)."""
    import einsum_ir as ei
    from einsum_ir.codegen.kernel import compile_triton
    from einsum_ir.codegen.report import default_shapes

    rows = [("kernel", "d", "registers", "spills", "shared KiB", "async loads", "async mma")]
    for causal, name in ((False, "softmax"), (True, "softmax_causal")):
        kern = compile_triton(ei.variants.load(name))
        for d in (64, 128):
            r = aot(causal, d)
            g = kern.resource_usage(default_shapes(kern.cascade, d), dtype="bf16", target="sm_90")
            for label, u in ((f"roof {'causal' if causal else 'dense'}", r), (f"generated {name}", g)):
                rows.append((label, str(d), str(u["registers"]), str(u["spills"]), str(u["shared_bytes"] // 1024),
                             str(u["async_loads"]), str(u["async_mma"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def check() -> float:
    """Max error of the roof (Triton's interpreter, CPU) against SDPA, both masks, ragged sizes."""
    import torch

    worst = 0.0
    g = torch.Generator().manual_seed(0)
    for causal in (False, True):
        q, k, v = (torch.randn(1, 2, 70, 16, generator=g) for _ in range(3))
        got = attention(q, k, v, causal, block_m=16, block_n=16)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        worst = max(worst, float((got - want).abs().max()))
    return worst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="run the roof in Triton's interpreter against SDPA")
    args = ap.parse_args(argv)
    if args.check:
        print(f"roof vs SDPA (Triton interpreter, CPU): max |diff| {check():.2e}")
        return
    print(aot_table())


if __name__ == "__main__":
    main()
