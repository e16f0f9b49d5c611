"""Split-KV decode (lowering/split_kv.py, codegen/combine.py, cost_model/split_choice.py): the
keys cut into splits, one partial state per split from the merge's partial cascade with a split
rank, combined by the merge rules and finished; equal to the single-pass kernel on both backends,
with ragged and empty sequences, and the cost model's split count per shape and device."""
from __future__ import annotations

import pytest
import torch

import einsum_ir as ei
from einsum_ir.codegen.combine import combine_source
from einsum_ir.cost_model.split_choice import choose_splits
from einsum_ir.lowering.split_kv import derive_split, split_choice
from einsum_ir.lowering.strategy import build_plan
from support import assert_outputs_close, make_inputs, on_kernel_device

RAGGED = """dims B H P M E F
param scale = 1/sqrt(E)
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f], Len[b]: int32
S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale where m < Len[b]
GM[b,h,p]   = max[m] S[b,h,p,m]
SN[b,h,p,m] = exp(S[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m]
O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]
output O
"""
M = 200  # 4 splits of 64 keys on Triton (keys per split are whole key tiles), 4 of 50 on the CPU


def _ragged_args(P: int, lens, dtype=torch.float32, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, H, E, F = len(lens), 2, 16, 8
    return {"Q": torch.randn(B, H, P, E, generator=g).to(dtype), "K": torch.randn(B, H, M, E, generator=g).to(dtype),
            "V": torch.randn(B, H, M, F, generator=g).to(dtype), "Len": torch.tensor(lens, dtype=torch.int32)}


def test_the_split_cascade_puts_the_split_in_the_grid_with_bounds_per_program():
    sk = derive_split(ei.parse(RAGGED))
    (stage,) = build_plan(sk.cascade).stages
    assert stage.grid[0] == sk.split and stage.stream == ("m",)
    assert not stage.loop.block_list
    assert {e for _, e in stage.loop.values} == {ei.ir.Access("Len", (ei.ir.Index("b"),)), ei.ir.Index(sk.split)}
    assert list(sk.cascade.output_names) == ["GM", "SD", "O_num", "n_seen"]
    assert all(sk.cascade.einsum(o).lhs_vars[0] == sk.split for o in sk.cascade.output_names)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("P", [1, 4, 16])
def test_split_kv_equals_the_single_pass_kernel_on_ragged_lengths(backend, P):
    c = ei.parse(RAGGED)
    split, single = ei.compile(c, backend=backend, split_kv=4), ei.compile(c, backend=backend, split_kv=1)
    args = on_kernel_device(_ragged_args(P, (0, 200, 37, 64, 1)))  # empty, full, mid-split, a split's edge
    got, want = split(**args), single(**args)
    assert "kernel" in split.split_kernels.__dict__ and "kernel" not in single.split_kernels.__dict__
    assert_outputs_close(got, want)
    assert_outputs_close(got, ei.interpret(c, **{k: v.cpu() for k, v in args.items()}))
    assert torch.all(got[0] == 0)  # a sequence of no key: every split is empty, the row takes the fill


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_every_sequence_empty(backend):
    c = ei.parse(RAGGED)
    args = on_kernel_device(_ragged_args(2, (0, 0)))
    out = ei.compile(c, backend=backend, split_kv=3)(**args)
    assert not out.isnan().any() and torch.all(out == 0)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_half_precision_states_merge_in_fp32(backend):
    c = ei.parse(RAGGED)
    args = on_kernel_device(_ragged_args(4, (200, 90, 5), dtype=torch.float16))
    out = ei.compile(c, backend=backend, split_kv=4)(**args)
    ref = ei.interpret(c, **{k: (v.float() if v.is_floating_point() else v).cpu() for k, v in args.items()})
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float().cpu(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("name", ["softmax_lse", "softmax_gqa", "sigmoid_bias", "paged_decode", "agent_attention"])
def test_catalog_variants_split(backend, name):
    # an LSE from the finish, GQA's packed query heads, a sum that merges by adding, a paged
    # cache, and a second key loop (agent attention's queries over the agents) in the finish
    c = ei.variants.load(name)
    args = on_kernel_device(make_inputs(name, c, P=3, M=150, E=16, F=8))
    assert_outputs_close(ei.compile(c, backend=backend, split_kv=3)(**args), ei.interpret(c, **
                         {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()}))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_a_union_taken_after_the_loop_splits_with_a_count_per_state(backend):
    """var_sink's finish takes union_sum(O_u0, O_u1) by whether each sum saw a point (rows with
    no sink have no redistributed share): its splits keep a count per carried value."""
    c = ei.variants.load("var_sink")
    args = make_inputs("var_sink", c, P=40, M=40, E=8, F=8)
    merge = derive_split(c).merge
    assert {"n_AS_num", "n_AI_num"} <= {r.name for r in merge.rules}
    assert_outputs_close(ei.compile(c, backend=backend, split_kv=4)(**on_kernel_device(args)), ei.interpret(c, **args))


def test_the_combine_kernel_is_generated_from_the_merge_rules():
    src = combine_source(derive_split(ei.parse(RAGGED)))
    # the merge's names as generated code spells them (codegen/names.py: O_num is O__num)
    assert "def combine_kernel(GM_parts, SD_parts, O__num_parts, n__seen_parts" in src
    assert "GM = tl.maximum(GM, tl.load(GM_parts + j_sk * ROWS + row_i" in src
    assert "SD += tl.load(SD_parts + j_sk * ROWS + row_i, mask=row_ok, other=0.0) * tl.exp2((GM_part - GM_new))" in src
    assert "#   S[sk,b,h,p,m]" in src  # the split cascade in the header


def test_the_cost_model_chooses_the_split_count():
    c = ei.variants.load("softmax")
    decode = {"B": 1, "H": 32, "P": 1, "M": 32768, "E": 128, "F": 128}
    many = split_choice(c, decode, "h100")
    assert many.splits >= 8 and many.programs >= 132 and many.base_programs == 32
    assert split_choice(c, {**decode, "P": 4096, "M": 4096}, "h100").splits == 1  # prefill fills the GPU
    assert split_choice(c, decode, "cpu").splits == 1
    assert split_choice(c, {**decode, "M": 256}, "h100").splits == 1  # four key tiles: no second split
    assert split_choice(c, {**decode, "H": 8}, "h100").splits > many.splits  # fewer heads, more splits
    # the states' traffic bounds it: 16 queries of 128 features against 1024 keys
    capped = choose_splits(8, 16, 1024, state_bytes=16 * 131 * 4, kv_bytes=1024 * 256 * 2, device="h100")
    assert capped.splits < 16 // 4 + 1 and "traffic" in capped.reason


def test_dispatch_splits_only_on_a_gpu_unless_told():
    c = ei.parse(RAGGED)
    args = _ragged_args(1, (200, 3))
    assert ei.compile(c, backend="cpu").splits_for(args) == 1
    assert ei.compile(c, backend="cpu", split_kv=6).splits_for(args) == 6
    leaves = {k: v.clone().requires_grad_() if v.is_floating_point() else v for k, v in args.items()}
    assert ei.compile(c, backend="cpu", split_kv=6).splits_for(leaves) == 1  # training: the saved forward


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_spec_names_that_the_emitters_use_split_too(backend):
    from test_names import ADVERSARIAL, _args

    c = ei.parse(ADVERSARIAL)
    args = _args(c)
    out = ei.compile(c, backend=backend, split_kv=2)(**on_kernel_device(args))
    torch.testing.assert_close(out.cpu(), ei.interpret(c, **args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, why", [("nbhd_2d", "span 2 ranks"), ("linear_elu", "chunked scan")])
def test_a_cascade_that_split_kv_cannot_cut_says_why(name, why):
    c = ei.variants.load(name)
    with pytest.raises(ei.LoweringError, match=why):
        derive_split(c)
    args = make_inputs(name, c, P=3, M=20, E=8, F=8)
    with pytest.raises(ei.LoweringError, match=why):
        ei.compile(c, backend="cpu", split_kv=2)(**args)
