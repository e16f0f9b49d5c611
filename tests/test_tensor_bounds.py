"""Tensor-driven loop bounds (lowering/keyranges.py, per-program values): a predicate that reads
an integer input at the grid indices only (`m < Len[b]`, `p - m < Wh[h]`) bounds each program's
key loop from the tensor's value instead of listing tiles at run time; the CPU path takes the
loosest bounds over the programs it runs at once. Kernels against the interpreter, the plan's
data, the generated source, and the cost model's counts against brute force."""
from __future__ import annotations

import pytest
import torch

import einsum_ir as ei
from einsum_ir.ir import Access, Index
from einsum_ir.lowering.strategy import key_loop_plan
from support import assert_outputs_close, on_kernel_device

SPEC = """dims B H P M E F
param scale = 1/sqrt(E)
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f], Len[b]: int32
S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale where {pred}
GM[b,h,p]   = max[m] S[b,h,p,m]
SN[b,h,p,m] = exp(S[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m]
O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]
output O
"""
RAGGED = "m < Len[b]"
BOTTOM_RIGHT = "m <= p + Len[b] - P and m < Len[b]"  # the causal corner inside the valid keys


def _args(B=5, H=2, P=20, M=70, E=16, F=8, lens=(0, 70, 33, 1, 64), dtype=torch.float32, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"Q": torch.randn(B, H, P, E, generator=g).to(dtype), "K": torch.randn(B, H, M, E, generator=g).to(dtype),
            "V": torch.randn(B, H, M, F, generator=g).to(dtype), "Len": torch.tensor(lens, dtype=torch.int32)}


def test_a_length_per_sequence_bounds_the_loop_without_a_block_list():
    loop = key_loop_plan(ei.parse(SPEC.format(pred=RAGGED))).stages[0].loop
    assert not loop.block_list and loop.exact
    assert loop.values == (("Len_at_b", Access("Len", (Index("b"),))),)
    assert any("Len_at_b" in {s.name for s in e.free_symbols} for _, e in loop.key_defs)
    assert any(not s.masked for s in loop.tile_segments)  # tiles inside [0, Len) need no mask
    assert "bounds read per program Len[b]" in loop.describe()


def test_a_read_at_a_query_position_stays_a_block_list():
    # GQA packs the R query heads of a key head into one tile: Wr[r] differs inside a program
    gqa = """dims B G R P M E F
input Q[b,g,r,p,e], K[b,g,m,e], V[b,g,m,f], Wr[r]: int32
S[b,g,r,p,m] = Q[b,g,r,p,e] * K[b,g,m,e] where m < Wr[r]
GM[b,g,r,p] = max[m] S[b,g,r,p,m]
SN[b,g,r,p,m] = exp(S[b,g,r,p,m] - GM[b,g,r,p])
SD[b,g,r,p] = SN[b,g,r,p,m]
O[b,g,r,p,f] = SN[b,g,r,p,m] * V[b,g,m,f] / SD[b,g,r,p]
output O
"""
    loop = key_loop_plan(ei.parse(gqa)).stages[0].loop
    assert loop.block_list and not loop.values


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("pred", [RAGGED, BOTTOM_RIGHT, "m >= Len[b] - 40 and m < Len[b]", "m >= h and m < Len[b]"])
def test_kernels_equal_the_interpreter_across_ragged_lengths(backend, pred):
    c = ei.parse(SPEC.format(pred=pred))
    kern = ei.compile(c, backend=backend)
    for lens in [(0, 70, 33, 1, 64), (0, 0, 0, 0, 0), (70, 70, 70, 70, 70)]:
        args = _args(lens=lens)
        assert_outputs_close(kern(**on_kernel_device(args)), ei.interpret(c, **args))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_half_precision_ragged(backend):
    c = ei.parse(SPEC.format(pred=RAGGED))
    args = _args(dtype=torch.float16, lens=(5, 70, 0, 31, 64))
    out = ei.compile(c, backend=backend)(**on_kernel_device(args))
    ref = ei.interpret(c, **{k: v.float() if v.is_floating_point() else v for k, v in args.items()})
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float().cpu(), ref, atol=3e-2, rtol=3e-2)


def test_the_triton_kernel_loads_the_length_once_per_program():
    src = ei.compile(ei.parse(SPEC.format(pred=BOTTOM_RIGHT)), backend="triton").source()
    assert src.count("tl.load(Len_ptr") == 1
    assert "Len_at_b = tl.load(Len_ptr + b * stride_Len_0)" in src
    assert "stage0_blocks" not in src  # no block-list kernel
    body = src[src.index("def stage0_kernel"):]
    assert body.index("Len_at_b = tl.load") < body.index("for j_m in range(")


def test_the_cpu_path_runs_full_tiles_only_where_every_program_is_full():
    c = ei.parse(SPEC.format(pred=RAGGED))
    kern = ei.compile(c, backend="cpu")
    kern.block_s = 10  # 7 key tiles of 10
    args = _args(lens=(0, 70, 33, 1, 64))
    assert_outputs_close(kern(**args), ei.interpret(c, **args))
    # key 0 is past the first sequence's length: no tile is full, and none past key 70 exists
    assert kern.last_stats == {"full": 0, "partial": 7, "empty": 0}
    args = _args(lens=(40, 70, 33, 45, 64))
    kern(**args)
    assert kern.last_stats == {"full": 3, "partial": 4, "empty": 0}  # keys 0-29 are full everywhere


def test_masformer_heads_gets_bounds_from_its_spans():
    c = ei.variants.load("masformer_heads")
    loop = key_loop_plan(c).stages[0].loop
    assert not loop.block_list and [e for _, e in loop.values] == [Access("Wh", (Index("h"),))]
    g = torch.Generator().manual_seed(1)
    B, H, P, M, E, F = 1, 4, 37, 37, 8, 8
    args = {"Q": torch.randn(B, H, P, E, generator=g), "K": torch.randn(B, H, M, E, generator=g),
            "V": torch.randn(B, H, M, F, generator=g), "Wh": torch.tensor([0, 1, 9, 100], dtype=torch.int32)}
    for backend in ("cpu", "triton"):
        assert_outputs_close(ei.compile(c, backend=backend)(**on_kernel_device(args)), ei.interpret(c, **args))


@pytest.mark.parametrize("pred", [RAGGED, "m <= p + Len[b] - P"])
def test_the_cost_model_counts_tensor_bounds_exactly(pred):
    c = ei.parse(SPEC.format(pred=pred))
    B, H, P, M, T = 3, 2, 37, 50, 16
    lens = torch.tensor([0, 50, 23], dtype=torch.int32)
    shapes = {"B": B, "H": H, "P": P, "M": M, "E": 16, "F": 16, "Len": lens}
    p, m, L = torch.arange(P)[None, :, None], torch.arange(M)[None, None, :], lens.long()[:, None, None]
    mask = (m < L) if pred == RAGGED else (m <= p + L - P)
    mask = mask.expand(B, P, M)
    r = ei.simulate(c, shapes, q_tile={"P": T}, kv_tile={"M": T})
    assert r.present * r.copies == float(mask.sum()) * H
    nq, nk = -(-P // T), -(-M // T)
    want = torch.zeros(B, nq, nk, dtype=torch.int8)
    for b in range(B):
        for i in range(nq):
            for j in range(nk):
                tile = mask[b, i * T:(i + 1) * T, j * T:(j + 1) * T]
                want[b, i, j] = 0 if not tile.any() else 2 if tile.all() else 1
    assert torch.equal(r.classes, want.reshape(B * nq, nk))
    assert int(ei.counts(c, shapes=shapes, dtype="fp32").macs) == int(mask.sum()) * H * (16 + 16)
