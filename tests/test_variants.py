"""The variant catalog: every spec parses, round-trips, and matches an independent formula.

The oracle is `einsum_ir.variants.formulas`, plain PyTorch written without einsum_ir. The
interpreter is compared with it at several shapes (P = M, P < M with sizes that are not powers
of two, P > M with fully masked rows), and a few deliberately wrong specs check that the
comparison is sharp enough to notice small mistakes.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import einsum_ir as ei
from einsum_ir.variants import formulas as F

NAMES = ei.variants.names()
SIZES = list(F.SIZES)

# The variants from our sources (issue 14): each with a formula; a fused kernel where it lowers,
# else the LoweringError's reason, per backend.
SOURCES = ["fox", "symmetric", "diff_attn", "masformer_heads", "shifted_sparse", "probe_cross", "dma",
           "radial", "hip", "vmoba", "psa", "var_sink", "landmark"]
NOT_FUSED: dict[str, dict[str, str]] = {"cpu": {}, "triton": {}}
# Lowered, but the generated kernel is wrong: known emitter bugs, expected to fail until fixed.
EMITTER_BUGS: dict[tuple[str, str], str] = {}


def _tolerance(want: torch.Tensor | tuple[torch.Tensor, ...]) -> float:
    """1e-4 relative to the output scale (fp32 over sums of a few dozen terms)."""
    outs = want if isinstance(want, tuple) else (want,)
    finite = [o[torch.isfinite(o)].abs().max().item() for o in outs if torch.isfinite(o).any()]
    return 1e-4 * max([1.0] + finite)


def _as_tuple(x: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


# ---------------------------------------------------------------------------- the catalog


def test_catalog_is_complete():
    expected = {
        "softmax", "softmax_deferred", "softmax_1pass", "softmax_causal",
        "softmax_causal_bottom_right", "softmax_window", "softmax_gqa", "softmax_lse",
        "alibi", "bias_tensor", "flashbias_lowrank", "softcap", "softplus_l1", "sigmoid_bias",
        "linear_elu", "linear_elu_causal", "lightning_causal", "agent_attention", "flowformer",
        "moh", "moba", "sinks_window", "nbhd_1d", "nbhd_2d", "retnet", "lightning2",
        "gla_scalar",
    } | set(SOURCES)
    assert expected <= set(NAMES)
    assert set(NAMES) == set(F.FORMULAS), "every catalog variant needs a formula, and only those"


@pytest.mark.parametrize("name", NAMES)
def test_spec_opens_with_a_comment_naming_its_source(name):
    text = ei.variants.source(name)
    assert text.lstrip().startswith("#"), f"{name}.ein must open with a comment block"
    doc = ei.variants.load(name).doc
    assert len(doc.splitlines()) >= 2, "the comment says what the variant is and where it is from"
    assert re.search(r"\b(19|20)\d\d\b", doc), "the comment cites the paper with its year"


@pytest.mark.parametrize("name", NAMES)
def test_spec_round_trips(name):
    c = ei.variants.load(name)
    text = str(c)
    again = ei.parse(text)
    assert again == c
    assert str(again) == text


# ---------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_interpreter_matches_formula(name, size):
    args = F.example_args(name, size=size, seed=0)
    got = ei.interpret(ei.variants.load(name), **args)
    want = F.FORMULAS[name](**args)
    for g, w in zip(_as_tuple(got), _as_tuple(want)):
        assert not torch.isnan(g).any(), "the interpreter produced NaN"
        assert not torch.isnan(w).any(), "the formula produced NaN"
        assert g.shape == w.shape
        assert g.dtype == torch.float32
    # The oracle must not be trivially zero, or agreement would prove nothing.
    assert _as_tuple(want)[0].abs().max() > 1e-2
    err = F.max_error(got, want)
    assert err <= _tolerance(want), f"{name} at {size}: max abs error {err:.3g}"


@pytest.mark.parametrize("name", ["softmax", "alibi", "flowformer", "nbhd_2d", "moba", "psa", "landmark", "var_sink"])
def test_other_seeds(name):
    args = F.example_args(name, size="rect", seed=7)
    want = F.FORMULAS[name](**args)
    assert F.max_error(ei.interpret(ei.variants.load(name), **args), want) <= _tolerance(want)


def test_self_check_is_small():
    assert F.self_check("softmax_causal") < 1e-5
    assert F.self_check("softmax_lse", seed=3) < 1e-5


# ---------------------------------------------------------------------------- masked rows


def _run(name: str, size: str) -> tuple[dict, torch.Tensor]:
    args = F.example_args(name, size=size)
    return args, ei.interpret(ei.variants.load(name), **args)


def test_bottom_right_causal_with_more_queries_than_keys_fills_zero():
    args, out = _run("softmax_causal_bottom_right", "tall")
    p, m = args["Q"].shape[-2], args["K"].shape[-2]
    assert p > m
    assert torch.equal(out[:, :, :p - m], torch.zeros_like(out[:, :, :p - m]))
    assert (out[:, :, p - m:].abs().sum(dim=-1) > 0).all(), "rows with keys are not empty"


def test_window_past_the_keys_fills_zero():
    args, out = _run("softmax_window", "tall")
    m, w = args["K"].shape[-2], args["W"]
    first_empty = m + w - 1  # query p sees keys p-W+1..p, none of which exist past this
    assert first_empty < out.shape[-2]
    assert torch.equal(out[:, :, first_empty:], torch.zeros_like(out[:, :, first_empty:]))
    assert (out[:, :, :first_empty].abs().sum(dim=-1) > 0).all()


@pytest.mark.parametrize("size", SIZES)
def test_moba_block_with_no_selection_fills_zero(size):
    args, out = _run("moba", size)
    assert not args["Sel"][0, 0, -1].any()
    last = (args["Q"].shape[-2] - 1) // args["BS"] * args["BS"]
    rows = out[0, 0, last:]
    assert rows.numel() and torch.equal(rows, torch.zeros_like(rows))
    assert (out[0, 0, :last].abs().sum(dim=-1) > 0).all()


def test_lse_fill_is_minus_inf_on_fully_masked_rows():
    # softmax_lse with the bottom-right causal mask added: rows p < P - M see no key.
    text = ei.variants.source("softmax_lse").replace(
        "K[b,h,m,e] * scale\n", "K[b,h,m,e] * scale where m <= p + M - P\n", 1)
    c = ei.parse(text)
    assert c.einsum("S").where is not None
    args = F.example_args("softmax_lse", size="tall")
    out, lse = ei.interpret(c, **args)
    q, k = args["Q"], args["K"]
    p, m = q.shape[-2], k.shape[-2]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~torch.ones(p, m, dtype=torch.bool).tril(m - p), float("-inf"))
    want_lse = torch.logsumexp(s, dim=-1)
    assert torch.isneginf(lse[:, :, :p - m]).all()
    assert torch.isfinite(lse[:, :, p - m:]).all()
    assert F.max_error(lse, want_lse) < 1e-5
    assert torch.equal(out[:, :, :p - m], torch.zeros_like(out[:, :, :p - m]))
    assert not torch.isnan(out).any()


# ---------------------------------------------------------------------------- FuseMax cascades


@pytest.mark.parametrize("m0", [1, 2, 3, 5, 8, 13, 64])
def test_one_pass_cascade_equals_three_pass(m0):
    gen = torch.Generator().manual_seed(m0)
    q, k, v = (torch.randn(2, 2, 7, 8, generator=gen), torch.randn(2, 2, 13, 8, generator=gen),
               torch.randn(2, 2, 13, 5, generator=gen))
    three = ei.interpret(ei.variants.load("softmax"), Q=q, K=k, V=v)
    one = ei.interpret(ei.variants.load("softmax_1pass"), Q=q, K=k, V=v, M0=m0)
    assert not torch.isnan(one).any()
    assert (one - three).abs().max() < 1e-5
    assert (three - torch.nn.functional.scaled_dot_product_attention(q, k, v)).abs().max() < 1e-5


def test_masked_one_pass_fills_empty_rows_like_three_pass():
    src = ei.variants.source("softmax_1pass").replace(
        "* scale\n", "* scale where m1*M0+m0 <= p + M - P\n", 1)
    one_pass = ei.parse(src)
    assert one_pass.einsum("BQK").where is not None
    args = F.example_args("softmax_causal_bottom_right", size="tall")
    want = ei.interpret(ei.variants.load("softmax_causal_bottom_right"), **args)
    got = ei.interpret(one_pass, **args, M0=4)
    assert F.max_error(got, want) < 1e-5


# ---------------------------------------------------------------------------- the oracle is sharp


def _mutate(text: str, old: str, new: str) -> str:
    """Replace `old` by `new` in the statements only (the comments quote the same formulas)."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        code = line.split("#", 1)[0]
        if old in code:
            lines[i] = code.replace(old, new, 1) + line[len(code):]
            return "".join(lines)
    raise AssertionError(f"{old!r} is not in any statement")


@pytest.mark.parametrize("name, old, new, size", [
    ("softmax_causal", "m <= p", "m < p", "rect"),
    ("softmax_window", "p - m < W", "p - m <= W", "rect"),
    ("alibi", "- Slope[h]", "+ Slope[h]", "rect"),
    ("softplus_l1", "log(E) * log(M)", "log(M)", "rect"),
    ("flowformer", "* P / M", "* M / P", "rect"),
    ("sinks_window", "m < NS", "m <= NS", "tall"),
    ("nbhd_1d", "nbhd(p, m, M, W, ST)", "nbhd(p, m, M, W, 1)", "rect"),
    ("moba", "m <= p", "m < p + BS", "rect"),
    ("lightning_causal", "p - m", "m - p", "rect"),
    ("lightning2", "p - m", "m - p", "rect"),
    ("retnet", "p - m", "m - p", "rect"),
    ("retnet", "/ sqrt(DS[h,p])", "/ DS[h,p]", "rect"),
    ("retnet", "max(abs(RS[b,h,p]), 1)", "abs(RS[b,h,p])", "rect"),
    ("retnet", "* scale", "", "rect"),
    ("gla_scalar", "G[b,h,p] - G[b,h,m]", "G[b,h,m] - G[b,h,p]", "rect"),
    ("gla_scalar", "m <= p", "m < p", "rect"),
    ("fox", "G[b,h,p] - G[b,h,m]", "G[b,h,m] - G[b,h,p]", "rect"),
    ("symmetric", "Q[b,h,m,e] * scale", "Q[b,h,m,e]", "rect"),
    ("diff_attn", "lam * E2", "E2", "rect"),
    ("masformer_heads", "p - m < Wh[h]", "p - m <= Wh[h]", "rect"),
    ("shifted_sparse", "(2*h // H) * (GS // 2)", "(2*h // H) * (GS // 4)", "rect"),
    ("shifted_sparse", "m < NS", "m <= NS", "small"),
    ("probe_cross", "* scale", "", "rect"),
    ("dma", "A[h] * softplus", "softplus", "rect"),
    ("dma", "and Keep[b,h,m]", "", "rect"),
    ("radial", "< Wt[", "<= Wt[", "rect"),
    ("hip", "< TK", "<= TK", "rect"),
    ("vmoba", "py // BY", "py // BX", "rect"),
    ("var_sink", "1 - Rho[h]", "1 + Rho[h]", "rect"),
    ("var_sink", "Rho[h] * AS[b,h,p]", "AS[b,h,p]", "rect"),
    ("psa", "2 * exp", "exp", "rect"),
    ("psa", "0.5", "0.25", "rect"),
    ("landmark", "m // L == p // L", "m // L <= p // L", "rect"),
    ("landmark", "* EB[b,h,p,m]", "", "small"),
])
def test_formula_catches_a_small_spec_mistake(name, old, new, size):
    wrong = ei.parse(_mutate(ei.variants.source(name), old, new))
    args = F.example_args(name, size=size)
    want = F.FORMULAS[name](**args)
    assert F.max_error(ei.interpret(wrong, **args), want) > 100 * _tolerance(want)


# ---------------------------------------------------------------------------- decayed forms

DECAYED = sorted(F.DECAY_INPUTS)


@pytest.mark.parametrize("lam", [1.0, 1e-3], ids=["lam1", "lam1e-3"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", DECAYED)
def test_decay_at_its_extremes_matches_formula(name, size, lam):
    args = F.with_decay(name, F.example_args(name, size=size), lam)
    want = F.FORMULAS[name](**args)
    got = ei.interpret(ei.variants.load(name), **args)
    assert not torch.isnan(got).any() and want.abs().max() > 1e-2
    assert F.max_error(got, want) <= _tolerance(want)


@pytest.mark.parametrize("name", [n for n in DECAYED if n != "retnet"])
def test_decay_one_is_causal_linear_attention_and_near_zero_keeps_the_diagonal(name):
    args = F.example_args(name, size="rect")
    q, k, v = args["Q"], args["K"], args["V"]
    s = (q @ k.transpose(-1, -2)).tril()                      # m <= p, no decay
    c = ei.variants.load(name)
    assert F.max_error(ei.interpret(c, **F.with_decay(name, args, 1.0)), s @ v) < 1e-4
    diag = torch.diagonal(s, dim1=-2, dim2=-1)[..., None] * v[..., :q.shape[-2], :]
    got = ei.interpret(c, **F.with_decay(name, args, 1e-6))
    assert F.max_error(got, diag) < 1e-4 * max(1.0, diag.abs().max().item())


def test_retnet_normalizes_rows_both_below_and_above_one():
    # max(|row sum|, 1) must divide some rows and leave others alone, or the check is idle.
    args = F.example_args("retnet", size="rect")
    q, k, lam = args["Q"], args["K"], args["Lam"]
    p, m = q.shape[-2], k.shape[-2]
    dist = (torch.arange(p)[:, None] - torch.arange(m)[None, :]).to(q.dtype)
    d = torch.where(dist >= 0, lam[:, None, None] ** dist.clamp(min=0), torch.zeros(()))
    rows = ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) * d / d.sum(-1, keepdim=True).sqrt()).sum(-1)
    assert (rows.abs() < 1).any() and (rows.abs() > 1).any()


@pytest.mark.parametrize("name", DECAYED)
def test_fp16_inputs(name):
    args = F.example_args(name, size="rect", dtype=torch.float16)
    got = ei.interpret(ei.variants.load(name), **args)
    assert got.dtype == torch.float16
    want = F.FORMULAS[name](**{k: v.float() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    assert F.max_error(got, want) <= 2e-3 * max(1.0, want.abs().max().item())


# ---------------------------------------------------------------------------- kernels of the sources


def _kernel_cases():
    for name in SOURCES:
        for backend in ("cpu", "triton"):
            bug = EMITTER_BUGS.get((name, backend))
            marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
            yield pytest.param(name, backend, marks=marks, id=f"{name}-{backend}")


@pytest.mark.parametrize("name, backend", list(_kernel_cases()))
def test_source_variant_kernel_matches_interpreter_or_says_why(name, backend):
    """Fused (CPU path, Triton: Triton's interpreter without a GPU) at the three shape sets,
    fully masked rows included; or the LoweringError that says why not."""
    if backend == "triton":
        pytest.importorskip("triton")
    from support import assert_outputs_close, on_kernel_device

    c = ei.variants.load(name)
    reason = NOT_FUSED[backend].get(name)
    if reason:
        with pytest.raises(ei.LoweringError, match=reason):
            ei.compile(c, backend=backend)
        return
    kern = ei.compile(c, backend=backend)
    for size in SIZES:
        args = F.example_args(name, size=size)
        want = ei.interpret(c, **args)
        if backend == "triton":
            assert_outputs_close(kern(**on_kernel_device(args)), want)
        else:
            assert_outputs_close(kern(**args), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", SIZES)
def test_var_sink_moves_the_share_only_where_there_is_somewhere_to_put_it(size):
    """Heads with Rho = 0 are plain causal softmax; in the others a row with sinks and other image
    tokens keeps a total weight of 1, and the oracle is not trivially the softmax."""
    args = F.example_args("var_sink", size=size)
    plain = F.softmax_causal(args["Q"], args["K"], args["V"])
    got = ei.interpret(ei.variants.load("var_sink"), **args)
    idle = args["Rho"] == 0
    assert idle.any() and (~idle).any()
    assert F.max_error(got[:, idle], plain[:, idle]) < 1e-5
    assert F.max_error(got[:, ~idle], plain[:, ~idle]) > 1e-2


def test_catalog_doc_names_every_source_variant_and_why_it_is_not_fused():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "catalog.md").read_text()
    for name in SOURCES:
        assert f"`{name}`" in text, name
    for reasons in NOT_FUSED.values():
        for reason in reasons.values():
            assert re.search(reason, text), reason


def _count_shapes(c, args: dict) -> dict:
    """ei.counts' bindings for example arguments: every extent, the runtime params, and the
    values of the integer and boolean tensors a mask reads."""
    from einsum_ir.ir import rank_of

    shapes = {k: v for k, v in args.items() if not isinstance(v, torch.Tensor)}
    for d in c.inputs:
        t = args[d.name]
        shapes.update({rank_of(i): n for i, n in zip(d.indices, t.shape)})
        if not t.is_floating_point():
            shapes[d.name] = t
    for r in c.cross_rank_reads:
        shapes.setdefault(rank_of(r.var), shapes[rank_of(r.declared)])
    return shapes


@pytest.mark.parametrize("name", [
    "fox", "masformer_heads", "shifted_sparse", "hip", "radial",
])
@pytest.mark.parametrize("size", SIZES)
def test_counted_score_points_equal_the_formulas_mask(name, size):
    """ei.counts reads the mask's tensors by value: the present (b,h,p,m) points of the row max
    equal the nonzero attention weights of the formula, found by attending to one-hot values."""
    c = ei.variants.load(name)
    args = F.example_args(name, size=size)
    b, h, m = args["K"].shape[0], args["K"].shape[1], args["K"].shape[-2]
    args["V"] = torch.eye(m).expand(b, h, m, m)
    weights = F.FORMULAS[name](**args)
    got = ei.counts(c, shapes=_count_shapes(c, args)).einsum("GM").points
    assert got == int((weights != 0).sum())
