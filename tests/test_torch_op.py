"""The cascade custom op: values against plain PyTorch, gradcheck in float64, opcheck, and
tracing through torch.compile with no graph break."""
from __future__ import annotations

import pytest
import torch

import einsum_ir as ei
from einsum_ir.codegen import torch_op
from einsum_ir.codegen.torch_op import attention, cascade_op, reference_attention, run
from einsum_ir.frontends.attention import AttentionPattern

CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "window": dict(is_causal=True, window=3),
    "softcap_scale": dict(is_causal=True, softcap=2.0, scale=0.7),
}


def _qkv(heads: int = 4, kv_heads: int = 2, p: int = 6, m: int = 6, e: int = 4, f: int = 3,
         dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, p, e, generator=g, dtype=dtype),
            torch.randn(2, kv_heads, m, e, generator=g, dtype=dtype),
            torch.randn(2, kv_heads, m, f, generator=g, dtype=dtype)]


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_plain_pytorch(case):
    q, k, v = _qkv()
    out = attention(q, k, v, enable_gqa=True, **CASES[case])
    torch.testing.assert_close(out, reference_attention(q, k, v, **CASES[case]))


@pytest.mark.parametrize("mask_shape", [(6, 6), (2, 1, 6, 6), (2, 4, 6, 6), (2, 1, 1, 6)])
def test_masks_broadcast_like_sdpa(mask_shape):
    q, k, v = _qkv(heads=4, kv_heads=4)
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(mask_shape, generator=g) > 0.3
    keep[..., 0] = True  # no fully masked row: SDPA gives NaN there, the cascade gives 0
    bias = torch.randn(mask_shape, generator=g, dtype=torch.float64)
    for mask in (keep, bias):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(attention(q, k, v, attn_mask=mask), expected)


def test_gqa_mask_over_heads_splits_into_groups():
    q, k, v = _qkv(heads=4, kv_heads=2)
    bias = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    torch.testing.assert_close(attention(q, k, v, attn_mask=bias, enable_gqa=True), expected)


def test_gqa_needs_enable_gqa():
    q, k, v = _qkv(heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="enable_gqa"):
        attention(q, k, v)


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_float64(case):
    q, k, v = (t.requires_grad_() for t in _qkv(p=4, m=5, e=3, f=2))
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention(q, k, v, enable_gqa=True, **CASES[case]), (q, k, v))


def test_gradcheck_flows_into_a_float_bias():
    q, k, v = (t.requires_grad_() for t in _qkv(heads=2, kv_heads=2, p=4, m=4, e=3, f=2))
    bias = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: attention(q, k, v, attn_mask=b, is_causal=True), (q, k, v, bias))


def test_any_single_output_cascade_runs_and_differentiates():
    softplus = ei.variants.load("softplus_l1")
    q, k, v = (t.requires_grad_() for t in _qkv(heads=2, kv_heads=2, p=4, m=4, e=3, f=2))
    torch.testing.assert_close(run(softplus, Q=q, K=k, V=v), ei.interpret(softplus, Q=q, K=k, V=v))
    assert torch.autograd.gradcheck(lambda q, k, v: run(softplus, Q=q, K=k, V=v), (q, k, v))


@pytest.mark.parametrize("scalars", [[], [3.0]])
def test_opcheck(scalars):
    """Schema, fake tensor, autograd registration and AOT dispatch (dynamic shapes)."""
    pattern = AttentionPattern(causal=True, window=bool(scalars))
    q, k, v = (t.requires_grad_() for t in _qkv(heads=2, kv_heads=2))
    torch.library.opcheck(cascade_op, (pattern.spec(), [q, k, v], scalars))


def test_compiles_without_graph_break_and_trains():
    q, k, v = _qkv(dtype=torch.float32)

    def loss(q, k, v):
        return attention(q, k, v, is_causal=True, window=4, enable_gqa=True).square().sum()

    explained = torch._dynamo.explain(loss)(q, k, v)
    assert explained.graph_break_count == 0 and explained.graph_count == 1

    grads = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager)


def test_half_inputs_keep_their_dtype():
    q, k, v = _qkv(dtype=torch.bfloat16)
    out = attention(q, k, v, is_causal=True, enable_gqa=True)
    assert out.dtype == torch.bfloat16
    expected = reference_attention(*(t.double() for t in (q, k, v)), is_causal=True)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def test_wrong_arity_is_explained():
    with pytest.raises(ei.BindError, match="takes tensors"):
        cascade_op(AttentionPattern().spec(), _qkv(heads=2, kv_heads=2)[:2], [])
    assert torch_op.cascade_of(AttentionPattern().spec()).output_names == ["O"]
