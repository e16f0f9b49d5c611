"""The torch.compile backend on plain PyTorch attention: what it captures, what it leaves and
why, outputs and gradients against eager. Most tests compile the rest of the graph with
"aot_eager" (no C++ build); one runs the default Inductor path."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from einsum_ir.codegen import dynamo_backend
from einsum_ir.codegen.dynamo_backend import einsum_ir_backend
from einsum_ir.frontends.fx import find_attention

dynamo_backend.register()
FAST = {"inner": "aot_eager"}


@pytest.fixture(autouse=True)
def fresh():
    torch._dynamo.reset()
    dynamo_backend.sites.clear()
    yield


def _qkv(heads=4, kv_heads=4, p=16, e=8, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, heads, p, e), (2, kv_heads, p, e), (2, kv_heads, p, e)]
    return [torch.randn(s, generator=g).requires_grad_(requires_grad) for s in shapes]


def _compile_and_compare(fn, *args, replaced: int, options=FAST):
    expected = fn(*args)
    out = torch.compile(fn, backend="einsum_ir", options=options)(*args)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert sum(s.replaced for s in dynamo_backend.sites) == replaced, \
        [s.describe() for s in dynamo_backend.sites]
    return dynamo_backend.sites


def _causal_window(p, w):
    i = torch.arange(p)
    return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < w)


def test_sdpa_causal_scale_gqa():
    q, k, v = _qkv(heads=4, kv_heads=2)
    sites = _compile_and_compare(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True),
        q, k, v, replaced=1)
    pattern = sites[0].pattern
    assert pattern.causal and pattern.gqa and not pattern.default_scale and pattern.mask is None


def test_sdpa_mask_from_index_arithmetic_becomes_predicates():
    def fn(q, k, v):
        i = torch.arange(q.shape[2])
        keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 5)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    sites = _compile_and_compare(fn, *_qkv(), replaced=1)
    assert sites[0].pattern.causal and sites[0].pattern.window and sites[0].mask is None
    assert sites[0].scalars["window"] == 5
    assert "predicates" in sites[0].describe()


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_tensor_masks_stay_operands(kind):
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 1, 16, 16, generator=g) > 0.3
    mask[..., 0] = True
    if kind == "float":
        mask = torch.randn(2, 1, 16, 16, generator=g)
    sites = _compile_and_compare(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                                 *_qkv(), mask, replaced=1)
    assert sites[0].pattern.mask == kind and sites[0].pattern.mask_ranks == ("B", "P", "M")


def test_explicit_chain_with_softcap_masked_fill_and_repeat_kv():
    def repeat_kv(x, n):
        b, h, s, d = x.shape
        return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)

    def fn(q, k, v):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        s = torch.tanh(s / 4.0) * 4.0
        i = torch.arange(q.shape[2])
        s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
        w = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, v)

    sites = _compile_and_compare(fn, *_qkv(heads=4, kv_heads=2), replaced=1)
    pattern = sites[0].pattern
    assert pattern.gqa and pattern.softcap and pattern.default_scale
    # masked_fill drops the points where m > p: the negation is the causal predicate
    assert pattern.causal and pattern.mask is None


def test_masked_fill_with_a_tensor_mask_is_negated():
    def fn(q, k, v, pad):
        s = (q @ k.transpose(-1, -2)).masked_fill(pad[:, None, None, :], -math.inf)
        return torch.softmax(s * 0.25, dim=-1) @ v

    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[0, 12:] = True
    sites = _compile_and_compare(fn, *_qkv(), pad, replaced=0)
    assert "a mask before a scale" in sites[0].reason

    def scaled_first(q, k, v, pad):
        s = (q @ k.transpose(-1, -2) * 0.25).masked_fill(pad[:, None, None, :], -math.inf)
        return torch.softmax(s, dim=-1) @ v

    torch._dynamo.reset()
    dynamo_backend.sites.clear()
    sites = _compile_and_compare(scaled_first, *_qkv(), pad, replaced=1)
    assert sites[0].invert_mask and sites[0].pattern.mask == "bool"
    assert sites[0].pattern.mask_ranks == ("B", "M")


def test_explicit_chain_with_additive_causal_mask():
    def fn(q, k, v):
        i = torch.arange(q.shape[2])
        bias = torch.where(i[None, :] <= i[:, None], 0.0, torch.finfo(q.dtype).min)
        s = q @ k.transpose(2, 3) * 0.5 + bias
        return F.softmax(s, dim=-1) @ v

    sites = _compile_and_compare(fn, *_qkv(), replaced=1)
    assert sites[0].pattern.causal and sites[0].mask is None and not sites[0].pattern.default_scale
    assert sites[0].pattern.catalog_name() is None  # a runtime scale, unlike softmax_causal


def test_left_alone_with_reasons(caplog):
    def fn(q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return w @ v, w.sum()  # the weights escape: nothing to fuse

    def other(q, k, v):
        s = torch.softmax(q @ k.transpose(-1, -2), dim=-2)  # softmax over queries
        return s @ v

    def dropout(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    with caplog.at_level(logging.INFO, logger="einsum_ir.dynamo"):
        for f in (fn, other):
            _compile_and_compare(f, *_qkv(), replaced=0)
        torch.compile(dropout, backend="einsum_ir", options=FAST)(*_qkv())
    reasons = [s.reason for s in dynamo_backend.sites]
    assert any("users" in r for r in reasons)
    assert any("dim -2" in r for r in reasons)
    assert any("dropout_p=0.5" in r for r in reasons)
    assert sum("left chain" in r.getMessage() for r in caplog.records) == 2


def test_training_gradients_match_eager():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).square().sum()

    leaves = _qkv(heads=4, kv_heads=2, requires_grad=True)
    fn(*leaves).backward()
    expected = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    torch.compile(fn, backend="einsum_ir", options=FAST)(*leaves).backward()
    for t, g in zip(leaves, expected):
        torch.testing.assert_close(t.grad, g, atol=1e-5, rtol=1e-5)
    assert sum(s.replaced for s in dynamo_backend.sites) == 1


def test_inductor_compiles_the_rest():
    """The default path: attention replaced, the surrounding projection fused by Inductor."""
    w = torch.randn(8, 8)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q @ w, k, v, is_causal=True).relu()

    _compile_and_compare(fn, *_qkv(), replaced=1, options=None)


def test_backend_is_found_by_name():
    assert torch._dynamo.lookup_backend("einsum_ir") is einsum_ir_backend


def test_find_attention_only_reads_the_graph():
    gm = torch.fx.symbolic_trace(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    sites = find_attention(gm.graph)  # no shape metadata under symbolic_trace
    assert len(sites) == 1 and not sites[0].replaced and "metadata" in sites[0].reason


def test_installed_entry_point_names_the_backend():
    # After `pip install`, torch finds the backend through this entry point with no import.
    from importlib.metadata import entry_points

    (point,) = [p for p in entry_points(group="torch_dynamo_backends") if p.name == "einsum_ir"]
    assert point.load() is einsum_ir_backend
