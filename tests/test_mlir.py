"""The torch-mlir frontend: PyTorch attention -> linalg-on-tensors -> cascade, with the pass
analysis and interpreter results checked, and cascade -> linalg.generic text -> torch-mlir's
parser -> cascade again."""
from __future__ import annotations

import math
import re

import pytest
import torch

pytest.importorskip("torch_mlir", reason="torch-mlir is not installed (extra 'mlir')")

import einsum_ir as ei  # noqa: E402
from einsum_ir.frontends.mlir_export import to_mlir  # noqa: E402
from einsum_ir.frontends.mlir_import import RaiseError, from_torch, parse_mlir, raise_module  # noqa: E402

NAMES = ["Q", "K", "V"]
RANKS = {"Q": "B H P E", "K": "B H M E", "V": "B H M F"}
SHAPES = dict(B=2, H=3, P=8, M=6, E=4, F=5)


def _qkv():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, 8, 4, generator=g), torch.randn(2, 3, 6, 4, generator=g),
            torch.randn(2, 3, 6, 5, generator=g))


def eager_softmax_attention(q, k, v):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v


class SoftplusAttention(torch.nn.Module):
    """Gao & Spratling, 2025: softplus scores, l1-normalized, scaled by log(E) log(M) / sqrt(E)."""

    def forward(self, q, k, v):
        e, m = q.shape[-1], k.shape[-2]
        w = torch.nn.functional.softplus(q @ k.transpose(-1, -2) * math.log(e) * math.log(m) / math.sqrt(e))
        return (w / w.sum(-1, keepdim=True)) @ v


def test_eager_softmax_attention():
    q, k, v = _qkv()
    c = from_torch(eager_softmax_attention, q, k, v, names=NAMES, ranks=RANKS)
    torch.testing.assert_close(ei.interpret(c, Q=q, K=k, V=v), eager_softmax_attention(q, k, v))
    # max, then sum, each a full reduction over M before M is revisited: 3 passes (FuseMax's
    # count for PyTorch eager attention).
    assert ei.passes(c, rank="M").count == 3
    assert [e.reduce for e in c.einsums if "m" in e.reduced] == ["max", "sum", "sum"]


def test_softplus_attention_module():
    q, k, v = _qkv()
    c = from_torch(SoftplusAttention(), q, k, v, names=NAMES, ranks=RANKS)
    torch.testing.assert_close(ei.interpret(c, Q=q, K=k, V=v), SoftplusAttention()(q, k, v))
    # No max shift; the l1 division comes before the contraction with V, so 2 passes
    # (deferring it, as the catalog's softplus_l1 does, gives 1).
    assert ei.passes(c, rank="M").count == 2
    assert ei.passes(ei.variants.load("softplus_l1"), rank="M").count == 1
    assert any(e.expr.fn == "log1p" for e in c.einsums if hasattr(e.expr, "fn"))


def test_transformers_llama_eager_attention():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama",
                                reason="transformers is not installed (extra 'hf')")

    class Attention(torch.nn.Module):
        num_key_value_groups = 2  # 4 query heads over 2 key/value heads

        def forward(self, q, k, v):
            return llama.eager_attention_forward(self, q, k, v, None, scaling=0.25)[0]

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 8, 16, generator=g), torch.randn(2, 2, 6, 16, generator=g),
               torch.randn(2, 2, 6, 8, generator=g))
    module = Attention().eval()
    c = from_torch(module, q, k, v, names=NAMES, ranks={"Q": "B H P E", "K": "B G M E", "V": "B G M F"})
    # repeat_kv raised into ranks: the query heads split into (G, R); K and V are read once.
    assert [len(d.indices) for d in c.inputs] == [5, 4, 4]
    assert c.inputs[1].indices == ("b", "g", "m", "e")
    out = ei.interpret(c, Q=q.reshape(2, 2, 2, 8, 16), K=k, V=v)  # (B, P, G, R, F), as returned
    torch.testing.assert_close(out.reshape(2, 8, 4, 8), module(q, k, v))
    assert ei.passes(c, rank="M").count == 3


def _structure(c) -> str:
    return re.sub(r"\d+\.\d+(e[-+]\d+)?", "#", str(c))  # f32 text rounds constants


@pytest.mark.parametrize("source", ["softplus_module", "catalog_softmax"])
def test_round_trip_through_torch_mlir_parser(source):
    q, k, v = _qkv()
    if source == "softplus_module":
        c = from_torch(SoftplusAttention(), q, k, v, names=NAMES, ranks=RANKS)
    else:
        c = ei.variants.load("softmax")
    text = to_mlir(c, SHAPES)
    assert "linalg.generic" in text
    back = raise_module(parse_mlir(text), names=NAMES, ranks=RANKS)
    torch.testing.assert_close(ei.interpret(back, Q=q, K=k, V=v), ei.interpret(c, Q=q, K=k, V=v))
    assert ei.passes(back).count == ei.passes(c).count
    if source == "softplus_module":  # raised twice: the same cascade
        assert _structure(back) == _structure(c)


def test_to_mlir_refuses_what_it_cannot_emit():
    with pytest.raises(ValueError, match="predicates"):
        to_mlir(ei.variants.load("softmax_causal"), SHAPES)
    with pytest.raises(ValueError, match="split"):
        to_mlir(ei.variants.load("softmax_1pass"), SHAPES)


def test_unraisable_linalg_is_named():
    q, k, v = _qkv()
    with pytest.raises(RaiseError, match="tensor.extract"):  # flip reads by computed index
        from_torch(lambda q, k, v: eager_softmax_attention(q.flip(2), k, v), q, k, v)
