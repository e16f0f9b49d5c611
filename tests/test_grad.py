"""The backward (issue: fused backward kernels derived from the cascade): `ei.grad`'s derivation,
and the fused kernels it lowers to, against autograd through the reference interpreter in fp64.

CPU path kernels run in fp64 and must agree to rounding; Triton kernels (the GPU when there is
one, else Triton's interpreter on CPU tensors) compute in fp32 and are held to a relative
tolerance against the fp64 reference."""
from __future__ import annotations

import io
import logging
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

import pytest
import torch

import einsum_ir as ei
from einsum_ir.codegen.autograd import Training, run_backward, training_forward
from einsum_ir.codegen.kernel import ReferenceKernel
from einsum_ir.lowering.strategy import build_plan
from einsum_ir.variants.formulas import FORMULAS
from support import KERNEL_DEVICE, make_inputs, on_kernel_device

ROOT = Path(__file__).resolve().parents[1]

WITH_BACKWARD = ["alibi", "bias_tensor", "diff_attn", "dma", "flashbias_lowrank", "flowformer", "fox", "gla_scalar",
                 "hip", "lightning2", "lightning_causal", "masformer_heads", "probe_cross", "radial", "shifted_sparse",
                 "symmetric", "var_sink", "vmoba",
                 "linear_elu", "linear_elu_causal", "moba", "moh",
                 "nbhd_1d", "nbhd_2d", "retnet", "sigmoid_bias", "sinks_window", "softcap", "softmax", "softmax_1pass",
                 "softmax_causal", "softmax_causal_bottom_right", "softmax_deferred", "softmax_gqa", "softmax_lse",
                 "softmax_window", "softplus_l1"]
# forward lowers, backward is not derived: the reason (docs/backward.md lists the same)
NO_BACKWARD = {"agent_attention": "the forward runs 2 stages", "psa": "the backward needs plain reads",
               "paged_decode": "the backward needs plain reads",
               "landmark": "present only where another reduction saw a point"}
# autograd through the interpreter divides by values at points the cascade leaves absent (var_sink's
# AI in a row without other image tokens): NaN gradients there, so these are checked against
# autograd through their plain-PyTorch formula instead (tests/test_grad_unions.py has more)
FORMULA_REFERENCE = {"var_sink"}
# (P, M, E, F): P = M; P < M ragged; P > M ragged
SHAPES = [(12, 12, 8, 8), (9, 21, 8, 6), (21, 10, 6, 5)]


def _grads_of(kern, c, args: dict, seeds_seed: int = 1):
    """Gradients of every floating input through `kern` (a compiled kernel, or the interpreter)
    for random output gradients, and the output gradients used."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point()
                  else v) for k, v in args.items()}
    outs = kern(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seeds_seed)
    seeds = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    names = [k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    found = torch.autograd.grad(outs, [leaves[n] for n in names], seeds, allow_unused=True)
    return {n: (torch.zeros_like(leaves[n]) if d is None else d) for n, d in zip(names, found)}, outs


def _reference(c, args: dict, name: str | None = None) -> dict:
    """Autograd through the reference interpreter in fp64 (through the formula: FORMULA_REFERENCE)."""
    wide = {k: (v.double().cpu() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in args.items()}
    fn = FORMULAS[name] if name in FORMULA_REFERENCE else (lambda **a: ei.interpret(c, **a))
    return _grads_of(fn, c, wide)[0]


def _inputs(name, c, shape, dtype, device="cpu"):
    P, M, E, F = shape
    args = make_inputs(name, c, P=P, M=M, E=E, F=F, dtype=dtype)
    args = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in args.items()}
    return on_kernel_device(args) if device != "cpu" else args


def _assert_grads_close(got: dict, want: dict, tol: float, what: str) -> None:
    assert got.keys() == want.keys(), what
    for n, w in want.items():
        g = got[n].detach().double().cpu()
        assert not g.isnan().any(), f"{what}: NaN in d{n}"
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(g, w, atol=tol * scale, rtol=tol, msg=lambda t: f"{what}, d{n}: {t}")


# ---------------------------------------------------------------------------- the derivation


def test_catalog_split_is_complete():
    assert set(WITH_BACKWARD) | set(NO_BACKWARD) == set(ei.variants.names())
    for name in WITH_BACKWARD:
        ei.grad(ei.variants.load(name))
    for name, reason in NO_BACKWARD.items():
        with pytest.raises(ei.LoweringError, match=reason):
            ei.grad(ei.variants.load(name))


# a derived backward that a backend does not build as kernels (the autograd node then recomputes
# through the interpreter): the reason (docs/catalog.md lists the same)
BACKWARD_NOT_BUILT = {("probe_cross", "triton"): "three tile axes"}


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("name", WITH_BACKWARD)
def test_the_backends_build_the_fused_backward(name, backend):
    """Every derived backward becomes kernels on both backends (FoX's and symmetric attention's
    too: their gradients are kept per query and per key, and added after the kernel), but those
    listed, which are refused with their reason."""
    if backend == "triton":
        pytest.importorskip("triton")
    kern = ei.compile(ei.variants.load(name), backend=backend)
    if (name, backend) in BACKWARD_NOT_BUILT:
        with pytest.raises(ei.LoweringError, match=BACKWARD_NOT_BUILT[name, backend]):
            kern.training.build()
        return
    kern.training.build()


def test_an_input_read_at_both_token_ranks_adds_its_contributions_after_the_kernel():
    g = ei.grad(ei.variants.load("fox"))
    assert g.epilogue is not None and g.epilogue.output_names == [g.grads["G"]]
    (backward,) = g.backward
    assert g.grads["G"] not in backward.output_names and set(g.epilogue.input_names) <= set(backward.output_names)


def test_docs_list_every_variant_with_or_without_a_backward():
    text = (ROOT / "docs" / "backward.md").read_text()
    for name in WITH_BACKWARD + list(NO_BACKWARD):
        assert f"`{name}`" in text, name
    for reason in NO_BACKWARD.values():
        assert reason in text


@pytest.mark.parametrize("name", WITH_BACKWARD)
def test_derived_backward_cascades_match_autograd(name):
    """The cascades alone (run by the interpreter): the derivation is exact."""
    c = ei.variants.load(name)
    args = _inputs(name, c, SHAPES[1], torch.float64)
    t = Training(c, lambda cascade, fp32: ReferenceKernel(cascade))
    outputs, saved = training_forward(t, args)
    g = torch.Generator().manual_seed(1)
    seeds = tuple(torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outputs)
    got = run_backward(t, args, outputs, saved, seeds)
    leaves = {k: (v.clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in args.items()}
    outs = (FORMULAS[name] if name in FORMULA_REFERENCE else lambda **a: ei.interpret(c, **a))(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    names = [k for k in got if leaves[k].requires_grad]
    want = torch.autograd.grad(outs, [leaves[k] for k in names], seeds, allow_unused=True)
    _assert_grads_close({k: got[k] for k in names},
                        {k: torch.zeros_like(got[k]) if w is None else w for k, w in zip(names, want)}, 1e-9, name)


def test_softmax_saves_row_statistics_only_and_its_max_gets_no_gradient():
    g = ei.grad(ei.variants.load("softmax_causal"))
    assert g.saved == ("GM", "SD") and g.shift_only == ("GM",)
    for name in g.saved:  # O(N): no saved value keeps the key rank
        assert "m" not in [i.name for i in g.forward.einsum(name).target.indices]
    assert g.prologue is not None and g.prologue.output_names == ["dSD_O"]  # FA2's D, derived
    (b,) = g.backward
    assert set(b.output_names) == {"dQ", "dK", "dV"}
    stage = build_plan(b).stages[0]
    assert stage.stream == ("p",) and stage.query == ("m",)  # a program per key tile
    assert stage.kind("dQ") == "tile_sum" and stage.kind("dK") == "carried"
    assert stage.predicate is not None  # the causal mask skips key tiles in the backward too
    assert ei.passes(b, rank="P").count == 1


def test_gradients_of_biases_gates_decays_and_factors_exist():
    expected = {"bias_tensor": {"Bias"}, "flashbias_lowrank": {"U", "W"}, "alibi": {"Slope"},
                "lightning_causal": {"Lam"}, "moh": {"Gate"}, "retnet": {"Lam"}, "lightning2": {"Slope"}}
    for name, extra in expected.items():
        g = ei.grad(ei.variants.load(name))
        assert extra <= set(g.grads), name


def test_a_full_bias_gradient_is_written_tile_by_tile():
    g = ei.grad(ei.variants.load("bias_tensor"))
    (b,) = g.backward
    stage = build_plan(b).stages[0]
    assert g.grads["Bias"] in stage.tile_stores


def test_the_derivation_names_no_variant():
    """Derived, never templated: the derivation's code (comments and docstrings aside) mentions
    no catalog variant and no normalization by name."""
    source = (ROOT / "lowering" / "grad.py").read_text()
    names = {tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.NAME}
    banned = set(ei.variants.names()) | {"softmax", "exp", "exp2", "log2e", "GM", "SD", "O_num"}
    assert not names & banned, names & banned


NEW_VARIANT = """dims B H P M E F
param scale = 1 / sqrt(E)
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f], T[h], G[b,h,p]
S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale * T[h] where p - m < 7 and m <= p
A[b,h,p,m]  = sigmoid(S[b,h,p,m]) * softplus(S[b,h,p,m] - 1)
O[b,h,p,f]  = A[b,h,p,m] * V[b,h,m,f] * G[b,h,p]
output O
"""


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_a_new_ein_variant_gets_a_fused_backward_with_no_python(backend):
    c = ei.parse(NEW_VARIANT)
    g = torch.Generator().manual_seed(0)
    args = dict(Q=torch.randn(1, 2, 19, 8, generator=g), K=torch.randn(1, 2, 19, 8, generator=g),
                V=torch.randn(1, 2, 19, 5, generator=g), T=torch.rand(2, generator=g) + 0.5,
                G=torch.randn(1, 2, 19, generator=g))
    dtype = torch.float64 if backend == "cpu" else torch.float32
    args = {k: v.to(dtype) for k, v in args.items()}
    if backend == "triton":
        args = on_kernel_device(args)
    got, _ = _grads_of(ei.compile(c, backend=backend), c, args)
    _assert_grads_close(got, _reference(c, args), 1e-10 if backend == "cpu" else _triton_tol(), backend)


def test_a_max_the_outputs_read_routes_its_gradient_to_the_maxima():
    spec = ei.variants.source("softmax").replace("output O", "output O, GM")
    c = ei.parse(spec)
    g = ei.grad(c)
    assert g.shift_only == ()  # GM is an output now: its gradient is not zero
    args = make_inputs("softmax", c, P=5, M=7, E=4, F=3, dtype=torch.float64)
    t = Training(c, lambda cascade, fp32: ReferenceKernel(cascade))
    outputs, saved = training_forward(t, args)
    seeds = tuple(torch.randn_like(o) for o in outputs)
    got = run_backward(t, args, outputs, saved, seeds)
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    want = torch.autograd.grad(ei.interpret(c, **leaves), [leaves[k] for k in ("Q", "K", "V")], seeds)
    for k, w in zip(("Q", "K", "V"), want):
        torch.testing.assert_close(got[k], w)


def test_what_cannot_be_differentiated_is_refused_with_the_reason():
    spec = ei.variants.source("softmax").replace("* K[b,h,m,e]", "* K[b,h,m // 2,e]", 1)
    with pytest.raises(ei.LoweringError, match=r"<spec>:\d+:\d+: S reads K\[b,h,m//2,e\] at index expressions.*"
                                               r"pass it as an input"):
        ei.grad(ei.parse(spec))


# ---------------------------------------------------------------------------- fused kernels


def _triton_tol() -> float:
    return 3e-2 if KERNEL_DEVICE == "cuda" else 2e-4  # TF32 dots on a GPU


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "P%d_M%d_E%d_F%d" % s)
@pytest.mark.parametrize("name", WITH_BACKWARD)
def test_cpu_backward_matches_autograd_in_fp64(name, shape):
    c = ei.variants.load(name)
    args = _inputs(name, c, shape, torch.float64)
    kern = ei.compile(c, backend="cpu")
    got, _ = _grads_of(kern, c, args)
    _assert_grads_close(got, _reference(c, args, name), 1e-9, f"{name} cpu")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "P%d_M%d_E%d_F%d" % s)
@pytest.mark.parametrize("name", WITH_BACKWARD)
def test_triton_backward_matches_autograd(name, shape):
    pytest.importorskip("triton")
    c = ei.variants.load(name)
    args = _inputs(name, c, shape, torch.float32, device=KERNEL_DEVICE)
    got, _ = _grads_of(ei.compile(c, backend="triton"), c, args)
    _assert_grads_close(got, _reference(c, args, name), _triton_tol(), f"{name} triton")


@pytest.mark.parametrize("name", ["softmax_causal", "softplus_l1", "alibi", "softmax_gqa"])
def test_cpu_backward_matches_the_independent_formula(name):
    """Against autograd through the variant's plain-PyTorch formula, not the interpreter."""
    c = ei.variants.load(name)
    from einsum_ir.variants.formulas import example_args

    args = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in example_args(name, size="rect").items()}
    got, _ = _grads_of(ei.compile(c, backend="cpu"), c, args)
    want, _ = _grads_of(FORMULAS[name], c, args)
    _assert_grads_close(got, want, 1e-10, name)


# bottom-right causal with P > M: the first P - M query rows see no key
EMPTY_ROWS = ei.variants.source("softmax_lse").replace(
    "S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale",
    "S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale where m <= p + M - P")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fully_masked_rows_get_zero_gradients_never_nan(backend):
    c = ei.parse(EMPTY_ROWS)
    dtype = torch.float64 if backend == "cpu" else torch.float32
    args = make_inputs("softmax_lse", c, P=23, M=9, E=8, F=6, dtype=dtype)
    if backend == "triton":
        pytest.importorskip("triton")
        args = on_kernel_device(args)
    got, (o, lse) = _grads_of(ei.compile(c, backend=backend), c, args)
    assert torch.all(o[:, :, :14] == 0) and torch.all(torch.isneginf(lse[:, :, :14]))
    assert torch.all(got["Q"][:, :, :14] == 0)
    _assert_grads_close(got, _reference(c, args), 1e-10 if backend == "cpu" else _triton_tol(), backend)


def test_the_custom_op_runs_the_fused_backward(monkeypatch):
    from einsum_ir.codegen import torch_op

    def refuse(*args, **kwargs):
        raise AssertionError("the custom op recomputed through the interpreter")

    monkeypatch.setattr(torch_op, "recompute_gradients", refuse)
    c = ei.variants.load("softmax_window")
    args = make_inputs("softmax_window", c, P=17, M=17, E=8, F=8, dtype=torch.float64)
    got, _ = _grads_of(lambda **a: torch_op.run(c, **a), c, args)
    _assert_grads_close(got, _reference(c, args), 1e-10, "custom op")


def test_calls_that_need_no_gradient_record_nothing():
    c = ei.variants.load("softmax_causal")
    args = make_inputs("softmax_causal", c, P=8, M=8, E=4, F=4)
    kern = ei.compile(c, backend="cpu")
    leaves = {k: v.requires_grad_(True) for k, v in args.items()}
    assert type(kern(**leaves).grad_fn).__name__ == "_FusedBackward"
    with torch.no_grad():
        assert kern(**leaves).grad_fn is None
    assert kern(**args | {k: v.detach() for k, v in leaves.items()}).grad_fn is None


def test_no_fused_backward_falls_back_to_recomputation_with_one_warning(caplog):
    c = ei.variants.load("agent_attention")
    args = make_inputs("agent_attention", c, P=10, M=12, E=8, F=6, dtype=torch.float64)
    kern = ei.compile(c, backend="cpu")
    with caplog.at_level(logging.WARNING, logger="einsum_ir"):
        got, _ = _grads_of(kern, c, args)
        _grads_of(kern, c, args)
    warnings = [r for r in caplog.records if "no fused backward" in r.getMessage()]
    assert len(warnings) == 1 and "2 stages" in warnings[0].getMessage()
    _assert_grads_close(got, _reference(c, args), 1e-10, "fallback")


MEMORY_CHECK = """
import ctypes, sys, torch
sys.path.insert(0, {root!r})
import einsum_ir as ei
n, h = 8192, 8
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, h, n, 64, generator=g).requires_grad_(True) for _ in range(3))
do = torch.randn(1, h, n, 64, generator=g)
kern = ei.compile(ei.variants.load("softmax_causal"), backend="cpu")
kern(Q=q[:, :, :256], K=k[:, :, :256], V=v[:, :, :256]).backward(do[:, :, :256])  # warm up
q.grad = k.grad = v.grad = None
ctypes.CDLL("libc.so.6").malloc_trim(0)
open("/proc/self/clear_refs", "w").write("5")
def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
base = kib("VmRSS:")
kern(Q=q, K=k, V=v).backward(do)
print((kib("VmHWM:") - base) * 1024, h * n * n * 4)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset peak RSS")
def test_cpu_backward_memory_is_o_n():
    """Causal softmax at N=8192: forward plus backward peak RSS above the inputs stays below 10%
    of the N^2 score matrix (the gradients themselves, O(N), included)."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(MEMORY_CHECK.format(root=str(ROOT)))],
                         capture_output=True, text=True, timeout=600, check=True)
    peak, scores = map(int, out.stdout.split())
    assert peak < 0.10 * scores, f"peak {peak / 2**20:.0f} MiB vs scores {scores / 2**20:.0f} MiB"
