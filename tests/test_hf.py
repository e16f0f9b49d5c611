"""Hugging Face models from tiny configs with random weights (no downloads): Llama (GQA),
Mistral (sliding window), Gemma 2 (softcap, alternating window), GPT-2 and ViT.

Each runs two ways against eager attention: `attn_implementation="einsum_ir"` (the
attention interface) and `torch.compile(model, backend="einsum_ir")` (the Dynamo backend on
the model's own SDPA or eager attention). Both must match eager and replace every attention
site; a training step through the custom op, by either route, must give eager's gradients
through the fused backward (the recomputation fallback is made to fail)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (extra 'hf')")

import einsum_ir.integrations.hf as eihf  # noqa: E402
from einsum_ir.codegen import dynamo_backend, torch_op  # noqa: E402
from einsum_ir.codegen.hf import key_interval  # noqa: E402

eihf.register()
dynamo_backend.register()

LAYERS, SEQ = 2, 24
LM = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
          num_attention_heads=4)
MODELS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(LM, num_key_value_heads=2)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(LM, num_key_value_heads=2, sliding_window=8)),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(LM, num_key_value_heads=2, head_dim=16, sliding_window=8,
                    attn_logit_softcapping=2.0, query_pre_attn_scalar=24)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(vocab_size=128, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=64,
                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)),
}
# What each model's attention must become, by layer: predicates, never a dense mask.
EXPECTED = {
    "llama": [["m <= p", "K[b,g,m,e]"]] * LAYERS,
    "mistral": [["m <= p", "p - m < W", "K[b,g,m,e]"]] * LAYERS,
    "gemma2": [["m <= p", "p - m < W", "tanh"], ["m <= p", "tanh"]],
    "gpt2": [["m <= p"]] * LAYERS,
}


def _model(name: str, impl: str) -> torch.nn.Module:
    config_cls, model_cls, kwargs = MODELS[name]
    torch.manual_seed(0)
    return model_cls(config_cls(**kwargs, attn_implementation=impl)).eval()


def _ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 128, (batch, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def specs(monkeypatch) -> list[str]:
    """The spec text of every attention call, in order."""
    seen: list[str] = []
    call = torch_op.attention_call

    def spy(spec, tensors, scalars):
        seen.append(spec)
        return call(spec, tensors, scalars)

    monkeypatch.setattr(torch_op, "attention_call", spy)
    return seen


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    dynamo_backend.sites.clear()
    yield dynamo_backend.sites


@pytest.mark.parametrize("name", MODELS)
def test_attention_interface_matches_eager(name, specs):
    ids = _ids()
    with torch.no_grad():
        expected = _model(name, "eager")(ids).logits
        out = _model(name, "einsum_ir")(ids).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert len(specs) == LAYERS
    for spec, needles in zip(specs, EXPECTED[name]):
        assert all(n in spec for n in needles), spec
        assert "Msk" not in spec and "Bias" not in spec  # the causal/window mask became predicates


def test_vit_attention_interface(specs):
    config = dict(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=128,
                  image_size=16, patch_size=4)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    outs = []
    for impl in ("eager", "einsum_ir"):
        torch.manual_seed(0)
        model = transformers.ViTModel(transformers.ViTConfig(**config, attn_implementation=impl)).eval()
        with torch.no_grad():
            outs.append(model(pixels).last_hidden_state)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
    assert len(specs) == LAYERS and all("where" not in s for s in specs)  # bidirectional: no predicate


def test_padding_mask_becomes_bounds(specs):
    """Left padding with causality is a key interval per sequence: predicates, no mask tensor."""
    ids = _ids()
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :5] = 0
    with torch.no_grad():
        expected = _model("mistral", "eager")(ids, attention_mask=attention_mask).logits
        out = _model("mistral", "einsum_ir")(ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(out[:, 5:], expected[:, 5:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], expected[1], atol=1e-5, rtol=1e-4)
    assert len(specs) == LAYERS
    assert all("m >= Ks[b]" in s and "p + D - m < W" in s and "Msk" not in s for s in specs)


def test_key_interval_recognizes_exactly():
    """A generation mask gives (Ks, D); any other mask (packed sequences) keeps its dense form."""
    m, p = torch.arange(10), torch.arange(3)[:, None]
    starts = torch.tensor([0, 4])
    mask = ((m <= p + 7) & (m >= starts[:, None, None]))[:, None]
    got = key_interval(mask, None)
    assert got is not None and got[0].tolist() == [0, 4] and got[1] == 7
    windowed = mask & (p + 7 - m < 3)
    assert key_interval(windowed, 3)[1] == 7
    assert key_interval(windowed, None) is None  # the window is part of the mask's shape
    packed = mask.clone()
    packed[0, 0, 2, 3] = False  # a hole: no interval
    assert key_interval(packed, None) is None
    assert key_interval(torch.zeros(2, 1, 3, 10, dtype=torch.bool), None) is None


GENERATE = {"llama": MODELS["llama"], "mistral": MODELS["mistral"],
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(LM, num_key_value_heads=2))}


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", GENERATE)
def test_generate_matches_eager(name, cache, specs):
    """Greedy generation with left padding: eager's tokens; every decode step's attention is
    predicates and per-sequence bounds (`m >= Ks[b]`), never a mask tensor."""
    config_cls, model_cls, kwargs = GENERATE[name]
    ids = _ids(3)[:, :12]
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :5] = 0
    attention_mask[2, :2] = 0
    ids = ids.masked_fill(attention_mask == 0, 0)
    tokens = []
    for impl in ("eager", "einsum_ir"):
        torch.manual_seed(0)
        model = model_cls(config_cls(**kwargs, attn_implementation=impl, pad_token_id=0)).eval()
        tokens.append(model.generate(ids, attention_mask=attention_mask, max_new_tokens=10, do_sample=False,
                                     cache_implementation=cache))
    assert torch.equal(tokens[1], tokens[0])
    decode = specs[LAYERS:]  # after the prompt's step, one query per sequence against the cache
    assert len(decode) == 9 * LAYERS
    assert all("m >= Ks[b]" in s and "m <= p + D" in s and "Msk" not in s for s in decode)
    if name == "mistral":
        assert all("p + D - m < W" in s for s in decode)


def test_generate_decodes_through_split_kv(monkeypatch):
    """The decode steps run the kernel itself (no statistics saved for a backward), which
    splits the keys where the cost model says so (on a GPU); forced to split on the CPU path
    here, the greedy tokens stay eager's, and every attention call ran split."""
    from einsum_ir.codegen.api import AutoKernel
    from einsum_ir.codegen.combine import SplitKernels

    config_cls, model_cls, kwargs = GENERATE["llama"]
    ids = _ids(2)[:, :12]
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :4] = 0
    ids = ids.masked_fill(attention_mask == 0, 0)
    tokens, splits = [], []
    run = SplitKernels.__call__

    def counted(self, *args, **kw):
        splits.append(1)
        return run(self, *args, **kw)

    for impl in ("eager", "einsum_ir"):
        if impl == "einsum_ir":
            monkeypatch.setattr(AutoKernel, "split_kv", 3)
            monkeypatch.setattr(SplitKernels, "__call__", counted)
        torch.manual_seed(0)
        model = model_cls(config_cls(**kwargs, attn_implementation=impl, pad_token_id=0)).eval()
        tokens.append(model.generate(ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False))
    assert torch.equal(tokens[1], tokens[0])
    assert len(splits) == 6 * LAYERS  # the prompt's step and every decode step, in every layer


@pytest.fixture
def fused_backward(monkeypatch) -> list[int]:
    """Every backward through the custom op must be the fused one: the fallback (recomputation
    through the interpreter) raises, and each fused backward call is counted."""
    calls: list[int] = []
    run_backward = torch_op.run_backward

    def refuse(*args, **kwargs):
        raise AssertionError("the custom op fell back to recomputing the forward through the interpreter")

    def counted(*args, **kwargs):
        calls.append(1)
        return run_backward(*args, **kwargs)

    monkeypatch.setattr(torch_op, "recompute_gradients", refuse)
    monkeypatch.setattr(torch_op, "run_backward", counted)
    return calls


def _eager_grads(name: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Parameter gradients of one training step with eager attention (the baseline)."""
    model = _model(name, "eager").train()
    model(ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], atol=1e-5, rtol=1e-4, msg=n)


def test_training_configs_exercise_gqa_window_and_softcap():
    """The training steps run GQA, and a window and a softcap that are in play at SEQ tokens."""
    for name in ("llama", "mistral", "gemma2"):
        kwargs = MODELS[name][2]
        assert kwargs["num_key_value_heads"] < kwargs["num_attention_heads"], name  # GQA
    assert MODELS["mistral"][2]["sliding_window"] < SEQ and MODELS["gemma2"][2]["sliding_window"] < SEQ
    assert MODELS["gemma2"][2]["attn_logit_softcapping"]


@pytest.mark.parametrize("name", MODELS)
def test_training_step_matches_eager(name, specs, fused_backward):
    """attn_implementation="einsum_ir": eager's gradients, through the fused backward (one call
    per layer; the recomputation fallback would fail the test)."""
    ids = _ids()
    expected = _eager_grads(name, ids)
    model = _model(name, "einsum_ir").train()
    model(ids, labels=ids).loss.backward()
    _assert_same_grads(model, expected)
    assert len(specs) == LAYERS and len(fused_backward) == LAYERS
    for spec, needles in zip(specs, EXPECTED[name]):
        assert all(n in spec for n in needles), spec


@pytest.mark.parametrize("name,impl", [("llama", "sdpa"), ("mistral", "sdpa"), ("gemma2", "eager"),
                                       ("gpt2", "sdpa"), ("gpt2", "eager")])
def test_compile_backend_replaces_every_site(name, impl, fresh_dynamo):
    """Gemma 2 has no SDPA path in transformers (softcap), so its eager chain is captured."""
    model, ids = _model(name, impl), _ids()
    with torch.no_grad():
        expected = model(ids).logits
        out = torch.compile(model, backend="einsum_ir", options={"inner": "aot_eager"})(ids).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    replaced = [s for s in fresh_dynamo if s.replaced]
    assert len(replaced) == LAYERS, [s.describe() for s in fresh_dynamo]
    assert all(s.mask is None and s.pattern.causal for s in replaced)
    if name in ("mistral", "gemma2"):
        assert replaced[0].pattern.window and replaced[0].scalars["window"] == 8


def test_compile_backend_vit(fresh_dynamo):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                    intermediate_size=128, image_size=16, patch_size=4,
                                    attn_implementation="sdpa")
    model = transformers.ViTModel(config).eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(pixels).last_hidden_state
        compiled = torch.compile(model, backend="einsum_ir", options={"inner": "aot_eager"})
        out = compiled(pixels).last_hidden_state
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert sum(s.replaced for s in fresh_dynamo) == LAYERS


@pytest.mark.parametrize("name,impl", [("llama", "sdpa"), ("mistral", "sdpa"), ("gemma2", "eager")])
def test_compile_backend_training_step(name, impl, fresh_dynamo, fused_backward):
    """torch.compile(backend="einsum_ir") on the model's own attention: eager attention's
    gradients, through the fused backward of the custom op (one call per layer)."""
    ids = _ids()
    expected = _eager_grads(name, ids)
    model = _model(name, impl).train()
    torch.compile(model, backend="einsum_ir", options={"inner": "aot_eager"})(ids, labels=ids).loss.backward()
    _assert_same_grads(model, expected)
    replaced = [s for s in fresh_dynamo if s.replaced]
    assert len(replaced) == LAYERS, [s.describe() for s in fresh_dynamo]
    assert len(fused_backward) == LAYERS
    assert all(s.pattern.causal and s.pattern.gqa for s in replaced)
    if name in ("mistral", "gemma2"):
        assert replaced[0].pattern.window and replaced[0].scalars["window"] == 8
    if name == "gemma2":
        assert all(s.scalars["softcap"] == 2.0 for s in replaced)


def test_dropout_is_refused():
    model = _model("gpt2", "einsum_ir")
    model.config.attn_pdrop = 0.1
    for block in model.transformer.h:
        block.attn.attn_dropout.p = 0.1
    with pytest.raises(NotImplementedError, match="dropout"):
        model.train()(_ids())
