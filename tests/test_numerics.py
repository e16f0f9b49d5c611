"""Numerics at the edges of the floating-point range, on every backend that runs on a CPU: the
reference backend (the interpreter on the row-scaled cascade), the tiled CPU path, and Triton
(in its interpreter on CPU tensors, compiled on a GPU).

- the functions the issue found wrong in Triton, element by element against fp64: softplus at
  -1e4 .. 1e4 (log(1 + exp(x)) rounded to 0 below -17), log1p near 0, pow of negative bases;
- every catalog variant with logits near +-1e4 (mixed signs) and rows whose logits all sit near
  -30, -110 and -1e4, in fp32, fp16 and bf16: no NaN and no Inf wherever the fp64 interpreter
  is finite and in the output's range, and agreement with it;
- a row of softplus weights that all underflow gives its true value (softmax of the logits, in
  the limit), not 0/0;
- a dot's computed operand is cast to fp16 only when it provably fits (softmax probabilities).
"""
from __future__ import annotations

import math

import pytest
import torch
from support import KERNEL_DEVICE, make_inputs, on_kernel_device

import einsum_ir as ei

BACKENDS = ["reference", "cpu", "triton"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# bf16: Triton 3.9's interpreter gets tl.dot on bf16 wrong (tests/test_triton.py), so bf16
# kernels run on a GPU only
TRITON_DTYPES = ("fp32", "fp16", "bf16") if KERNEL_DEVICE == "cuda" else ("fp32", "fp16")
# scores q.k / sqrt(E): mixed signs around +-1e4, or every score of a row near one value
REGIMES = {"+-1e4": None, "-30": -30.0, "-110": -110.0, "-1e4": -1e4}
E = 16


def _run(kind: str, c, args: dict, kernel=None):
    kernel = kernel or ei.compile(c, backend=kind)
    return kernel(**(on_kernel_device(args) if kind == "triton" else args))


def _cast(args: dict, dtype) -> dict:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in args.items()}


# ------------------------------------------------------------------ functions, element by element

# O[p, f] = A[p, f]: S[p, m] = x_p where m == p, else 1 (q_p = [x_p e_p | e_p], k_m = [e_m | 1 - e_m],
# one nonzero product each, so S is exact), V = I; a NaN or inf of f(x_p) stays in row p, and
# the diagonal O[p, p] = f(x_p)
ELEMENTWISE = """dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e]
A[b,h,p,m] = {call}
O[b,h,p,f] = A[b,h,p,m] * V[b,h,m,f]
output O
"""
SOFTPLUS_ARGS = [-1e4, -745.0, -200.0, -104.0, -90.0, -30.0, -17.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 17.0,
                 30.0, 90.0, 1e4]
LOG1P_ARGS = [-0.999, -0.75, -0.5, -0.25, -1e-3, -1e-7, 0.0, 1e-7, 1e-3, 0.25, 0.5, 0.99, 1.0, 10.0, 1e4, 1e30]
POW_BASES = [-3.0, -2.0, -1.5, -1.0, -0.5, -0.25, -1e-3, 0.0, 1e-3, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 10.0]


def _elementwise(kind: str, call: str, xs: list[float]) -> torch.Tensor:
    """f at xs (fp32) through backend `kind`."""
    c = ei.parse(ELEMENTWISE.format(call=call))
    n = len(xs)
    eye = torch.eye(n)
    q = torch.cat([eye * torch.tensor(xs)[:, None], eye], dim=1)[None, None]
    k = torch.cat([eye, 1.0 - eye], dim=1)[None, None]
    return _run(kind, c, dict(Q=q, K=k, V=eye[None, None])).cpu()[0, 0].diagonal().double()


def _assert_matches_fp64(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Equal NaN positions and infinities; elsewhere relative error <= rtol (absolute 1e-44, the
    spacing of fp32's subnormals, for results that underflow fp32's normal range)."""
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    finite = torch.isfinite(want)
    assert torch.equal(got[~finite & ~torch.isnan(want)], want[~finite & ~torch.isnan(want)])
    torch.testing.assert_close(got[finite], want[finite], rtol=rtol, atol=1e-44)


@pytest.mark.parametrize("kind", BACKENDS)
def test_softplus_is_accurate_from_minus_1e4_to_1e4(kind):
    # before: Triton's log(1 + exp(x)) was 0 below x = -17 (a row near -30: all NaN)
    want = torch.nn.functional.softplus(torch.tensor(SOFTPLUS_ARGS, dtype=torch.float64))
    want = want.float().double()  # the fp32 value nearest the exact one
    _assert_matches_fp64(_elementwise(kind, "softplus(S[b,h,p,m])", SOFTPLUS_ARGS), want, rtol=4e-7)


@pytest.mark.parametrize("kind", BACKENDS)
def test_softplus_scaled_is_accurate_where_both_factors_leave_fp32(kind):
    # e^s softplus(x) for s = -x (the row scale lowering.underflow applies): log1p(e^x)/e^x
    xs = [-1e4, -745.0, -200.0, -104.0, -30.0, -1.0, 0.0]
    x = torch.tensor(xs, dtype=torch.float64)
    want = torch.exp(torch.where(x < -40, x, torch.log(torch.nn.functional.softplus(x))) - x).float().double()
    _assert_matches_fp64(_elementwise(kind, "softplus_scaled(S[b,h,p,m], -S[b,h,p,m])", xs), want, rtol=4e-7)


@pytest.mark.parametrize("kind", BACKENDS)
def test_log1p_is_accurate_near_zero(kind):
    # before: Triton's log(1 + x) lost x's low bits (log1p(1e-7) came out 1.19e-7)
    want = torch.log1p(torch.tensor(LOG1P_ARGS, dtype=torch.float32).double()).float().double()
    _assert_matches_fp64(_elementwise(kind, "log1p(S[b,h,p,m])", LOG1P_ARGS), want, rtol=4e-7)


@pytest.mark.parametrize("exponent", ["2", "2.0", "3", "4.0", "7", "-1", "-2.0", "0", "0.5", "1.5"])
@pytest.mark.parametrize("kind", BACKENDS)
def test_pow_is_sign_correct(kind, exponent):
    # before: Triton's exp(b * log(a)) was NaN for every negative base, and pow(S, 2) did not compile
    want = torch.pow(torch.tensor(POW_BASES, dtype=torch.float32).double(), float(exponent)).float().double()
    got = _elementwise(kind, f"pow(S[b,h,p,m], {exponent})", POW_BASES)
    _assert_matches_fp64(got, want, rtol=2e-6)  # exp2(b * log2|a|): a few ulps of b * log2|a|


# ------------------------------------------------------------------ every catalog variant


def _regime_inputs(name: str, c, regime: str) -> dict:
    """fp64 inputs whose scores q.k / sqrt(E) sit in `regime`."""
    # small (Triton's interpreter is slow) but with a ragged key tile; a 4x5 grid for 2-D layouts
    grid = {d: n for d, n in dict(PX=4, PY=5, MX=4, MY=5).items() if d in c.dims}
    args = make_inputs(name, c, P=17, M=13, E=E, F=16, H=1, dtype=torch.float64, extra=grid)
    target = REGIMES[regime]
    # the score's operands: the float inputs over the queries (or the keys) and the head dim E
    sides = {side: [d.name for d in c.inputs if side in d.indices and "e" in d.indices
                    and args[d.name].is_floating_point()] for side in ("p", "m")}
    for side, names in sides.items():
        for n in names:
            x = args[n]
            if target is None:  # q.k / sqrt(E) of size ~1e4, both signs in every row
                args[n] = x * (1e4 * 4 / math.sqrt(E)) ** 0.5
            else:  # q = a u, k = -a u + noise: every score near the target (|target| where one
                # tensor is both sides: symmetric attention's Q.Q)
                u = torch.ones(E, dtype=torch.float64) / math.sqrt(E)
                a = (abs(target) * math.sqrt(E)) ** 0.5
                args[n] = ((a if side == "p" else math.copysign(a, target)) * u).expand_as(x) + 0.01 * x
    return args


def _nonfinite_where_finite(got, want, dtype) -> tuple[int, int, float]:
    """(NaN count, Inf count, max error relative to 1 + |want|) over the points where the fp64
    value is finite and within the dtype's range."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    nan = inf = 0
    err = 0.0
    for g, w in zip(got, want):
        g = g.cpu().double()
        ok = torch.isfinite(w) & (w.abs() <= torch.finfo(dtype).max)
        nan += int(torch.isnan(g)[ok].sum())
        inf += int(torch.isinf(g)[ok].sum())
        both = ok & torch.isfinite(g)
        if both.any():
            err = max(err, float(((g - w).abs() / (1 + w.abs()))[both].max()))
    return nan, inf, err


# max error relative to 1 + |fp64 on the same (rounded) inputs|: every backend computes in fp32,
# where a score of 1e4 is off by up to 6e-4 (measured: 1.1e-3 on moba), and rounds its output to
# the inputs' dtype (measured: 5.8e-4 in fp16, 3.8e-3 in bf16)
TOLERANCE = {"fp32": 3e-3, "fp16": 3e-3, "bf16": 1.6e-2}
# softplus_l1's logits are the scores times log(E) log(M) (7.1 here): near -7e4 an fp32 ulp is
# 7.8e-3, and its weights are the softmax of those logits (measured: 7.0e-3 on every backend).
# Before the interpreter kept exponents, its fp64 reference was 0/0 there and went unchecked.
LOGIT_ROUNDING = {("softplus_l1", "-1e4"): 1e-2}


@pytest.mark.parametrize("name", ei.variants.names())
def test_no_nan_or_inf_where_fp64_is_finite(name):
    c = ei.variants.load(name)
    try:
        kernels = {kind: ei.compile(c, backend=kind) for kind in BACKENDS}
    except ei.LoweringError:  # not fused: the reference backend and the CPU path's fallback cover it
        kernels = {"reference": ei.compile(c, backend="reference")}
    failures = []
    for regime in REGIMES:
        base = _regime_inputs(name, c, regime)
        for dname, dtype in DTYPES.items():
            args = _cast(base, dtype)
            want = ei.interpret(c, **_cast(args, torch.float64))  # the rounded inputs, in fp64
            for kind, kernel in kernels.items():
                if kind == "triton" and dname not in TRITON_DTYPES:
                    continue
                nan, inf, err = _nonfinite_where_finite(_run(kind, c, args, kernel), want, dtype)
                if nan or inf or err > max(TOLERANCE[dname], LOGIT_ROUNDING.get((name, regime), 0.0)):
                    failures.append(f"{regime} {dname} {kind}: {nan} NaN, {inf} Inf, error {err:.3g}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------ rows of tiny softplus weights


def _log_softplus(x: torch.Tensor) -> torch.Tensor:
    """log softplus(x) in fp64 without underflow: x itself below -40 (it is x - e^x/2 there). The
    other branch never sees such x, so that its gradient is not 0/0 either."""
    tail = x < -40
    return torch.where(tail, x, torch.log(torch.nn.functional.softplus(torch.where(tail, 0.0, x))))


def _tiny_softplus_rows(logit: float) -> tuple[dict, float]:
    """softplus_l1's inputs (fp32) whose logits q.k * lscale are `logit` minus a spread of a few
    units, different per row; and lscale."""
    P, M = 12, 20
    g = torch.Generator().manual_seed(5)
    lscale = math.log(E) * math.log(M) / math.sqrt(E)
    q = torch.zeros(1, 1, P, E)
    q[..., 0] = 1.0
    q[..., 1] = torch.rand(P, generator=g)
    k = torch.zeros(1, 1, M, E)
    k[..., 0] = logit / lscale
    k[..., 1] = -4.0 * torch.randn(M, generator=g).abs() / lscale
    return dict(Q=q, K=k, V=torch.randn(1, 1, M, 8, generator=g)), lscale


def _softplus_l1_fp64(Q, K, V, lscale: float) -> torch.Tensor:
    """softplus_l1 with its logits rounded as every backend rounds them (fp32 products: an ulp of
    1e4 is 1e-3), then exactly: the weights normalized in the log domain."""
    exact = (Q.double() @ K.double().transpose(-1, -2)) * lscale
    rounded = ((Q.float() @ K.float().transpose(-1, -2)) * torch.tensor(lscale, dtype=torch.float32)).double()
    x = exact + (rounded - exact).detach()  # the backends' value, fp64's gradient
    return torch.softmax(_log_softplus(x), dim=-1) @ V.double()


@pytest.mark.parametrize("logit", [-104.0, -110.0, -800.0, -1e4])
def test_rows_of_underflowing_softplus_weights_keep_their_value(logit):
    # before: every backend gave 0/0 (NaN) once all of a row's logits were below about -104
    c = ei.variants.load("softplus_l1")
    args, lscale = _tiny_softplus_rows(logit)
    want = _softplus_l1_fp64(**args, lscale=lscale)
    assert torch.isfinite(want).all()
    assert bool(((args["Q"] @ args["K"].transpose(-1, -2)) * lscale <= logit).all())
    for kind in BACKENDS:
        torch.testing.assert_close(_run(kind, c, args).cpu().double(), want, atol=1e-5, rtol=1e-5, msg=kind)


@pytest.mark.parametrize("logit", [-104.0, -110.0, -800.0, -1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_interpreter_keeps_their_value_too(logit, dtype):
    """ei.interpret itself (no row scaling): softplus below -40 keeps an exponent, which the
    sums carry (before: 0/0 below -104 in fp32, -745 in fp64). Against fp64's formula on the
    logits the interpreter forms in that dtype."""
    c = ei.variants.load("softplus_l1")
    args, lscale = _tiny_softplus_rows(logit)
    args = _cast(args, dtype)
    if dtype == torch.float64:
        x = (args["Q"] @ args["K"].transpose(-1, -2)) * lscale
        want = torch.softmax(_log_softplus(x), dim=-1) @ args["V"]
        tol = 1e-12
    else:
        want, tol = _softplus_l1_fp64(**args, lscale=lscale), 1e-5
    torch.testing.assert_close(ei.interpret(c, **args).double(), want, atol=tol, rtol=tol)


SIGMOID_NORMALIZED = """dims P M E F
input Q[p,e], K[m,e], V[m,f]
S[p,m] = Q[p,e] * K[m,e]
A[p,m] = sigmoid(S[p,m])
AD[p] = A[p,m]
O[p,f] = A[p,m] * V[m,f] / AD[p]
output O, A, AD
"""


def test_exponents_are_the_functions_mechanism_not_softplus_only():
    """sigmoid has a scaled form too: a row of sigmoids of -1e4 normalizes to the softmax of its
    logits; the outputs A and AD themselves are their plain values (0 where fp32 underflows
    them), and a row above the tail is computed as before."""
    g = torch.Generator().manual_seed(3)
    q = torch.ones(3, 1)
    k = torch.tensor([-1e4, -1e4 + 1.5, -1e4 - 2.0, -1e4 + 0.25]).view(-1, 1)
    v = torch.randn(4, 5, generator=g)
    q[2] = -1e-3  # a row of logits near +10: no exponent there
    o, a, ad = ei.interpret(ei.parse(SIGMOID_NORMALIZED), Q=q, K=k, V=v)
    x = (q @ k.T).double()
    assert torch.equal(a[:2], torch.zeros(2, 4)) and torch.equal(ad[:2], torch.zeros(2))
    torch.testing.assert_close(o[:2].double(), torch.softmax(x[:2], -1) @ v.double(), atol=1e-6, rtol=1e-6)
    s = torch.sigmoid(x[2])
    torch.testing.assert_close(o[2].double(), (s / s.sum()) @ v.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a[2], torch.sigmoid((q @ k.T)[2]))


@pytest.mark.parametrize("logit", [-30.0, -1e4])
@pytest.mark.parametrize("kind", BACKENDS)
def test_their_gradients_too(kind, logit):
    """The backward recomputes the scaled weights from the saved row max (and its derivative is
    sigmoid_scaled): finite, and fp64's."""
    c = ei.variants.load("softplus_l1")
    args, lscale = _tiny_softplus_rows(logit)
    d_out = torch.randn(1, 1, 12, 8, generator=torch.Generator().manual_seed(6))
    leaves = {n: t.double().requires_grad_() for n, t in args.items()}
    (_softplus_l1_fp64(**leaves, lscale=lscale) * d_out).sum().backward()
    mine = {n: t.clone().requires_grad_() for n, t in on_kernel_device(args).items()} if kind == "triton" \
        else {n: t.clone().requires_grad_() for n, t in args.items()}
    (ei.compile(c, backend=kind)(**mine) * d_out.to(mine["Q"].device)).sum().backward()
    # fp32 logits near L are off by about |L| * 6e-8 and along their common part the gradient
    # cancels (to 1e-12 in fp64, to 3e-3 of the largest gradient in fp32 at L = -1e4)
    tol = max(1e-4, 4e-7 * abs(logit))
    for n in args:
        want = leaves[n].grad
        torch.testing.assert_close(mine[n].grad.cpu().double(), want, atol=tol * float(want.abs().max()),
                                   rtol=1e-3, msg=f"d{n}")


# ------------------------------------------------------------------ dot operands


@pytest.mark.parametrize("name, cast", [("softmax_causal", True), ("sigmoid_bias", True), ("softplus_l1", False)])
def test_a_computed_dot_operand_is_cast_to_fp16_only_when_it_fits(name, cast):
    """Softmax probabilities and sigmoid weights lie in [0, 1]: cast to the value tile's dtype.
    Softplus weights have no bound: kept fp32 beside an fp16 V (`_wide`, `_partner`)."""
    src = ei.compile(ei.variants.load(name), backend="triton").source(
        dict(B=1, H=1, P=64, M=64, E=64, F=64))
    assert ("_wide(" not in src) == cast and (".to(V.dtype)" in src) == cast, name
