"""Differential fuzzing: random masked softmax cascades through every backend vs the interpreter.

The catalog pins the known variants; this draws predicates the catalog never wrote (offset
bands, sinks, strided neighborhoods, `or` of ranges, empty rows) at ragged sizes, so tile
skipping, full-tile detection and in-tile masks meet shapes nobody picked by hand.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import einsum_ir as ei
from support import CAUSAL_SOFTMAX_LSE, TOLERANCE, on_kernel_device

pytest.importorskip("triton")

TEMPLATE = CAUSAL_SOFTMAX_LSE.replace("where m <= p", "where {predicate}")

offsets = st.integers(-6, 6)
atoms = st.one_of(
    offsets.map(lambda c: f"m <= p + {c}" if c >= 0 else f"m <= p - {-c}"),
    st.integers(1, 12).map(lambda w: f"p - m < {w}"),
    st.integers(1, 5).map(lambda n: f"m < {n}"),
    st.integers(0, 9).map(lambda n: f"m >= {n}"),
    st.tuples(st.integers(1, 9), st.integers(1, 4)).map(lambda ws: f"nbhd(p, m, M, {max(ws)}, {min(ws)})"),
    st.just("m <= p + M - P"),
)
predicates = st.recursive(
    atoms,
    lambda inner: st.one_of(
        st.tuples(inner, inner).map(lambda ab: f"({ab[0]}) and ({ab[1]})"),
        st.tuples(inner, inner).map(lambda ab: f"({ab[0]}) or ({ab[1]})"),
        inner.map(lambda a: f"not ({a})"),
    ),
    max_leaves=3,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(predicate=predicates, p=st.integers(1, 37), m=st.integers(1, 37), seed=st.integers(0, 99))
def test_backends_agree_with_the_interpreter(predicate, p, m, seed):
    if "nbhd" in predicate:
        p = m  # a neighborhood is over one sequence
    c = ei.parse(TEMPLATE.format(predicate=predicate))
    g = torch.Generator().manual_seed(seed)
    args = dict(Q=torch.randn(1, 2, p, 8, generator=g), K=torch.randn(1, 2, m, 8, generator=g),
                V=torch.randn(1, 2, m, 5, generator=g))
    want = ei.interpret(c, **args)
    for backend in ("cpu", "triton"):
        got = ei.compile(c, backend=backend)(**(on_kernel_device(args) if backend == "triton" else args))
        tol = 1e-4 if backend == "cpu" or TOLERANCE < 1e-3 else TOLERANCE
        for g_out, w_out in zip(got, want):
            g_out = g_out.cpu()
            assert not g_out.isnan().any(), (backend, predicate)
            torch.testing.assert_close(g_out, w_out, atol=tol, rtol=tol,
                                       msg=lambda text: f"{backend}, where {predicate}: {text}")


MAPS = """dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f], Bias[h,p,m]
S0[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] where {predicate}
S[b,h,p,m]  = {score}
A[b,h,p,m]  = {weight}
AD[b,h,p]   = A[b,h,p,m]
O[b,h,p,f]  = A[b,h,p,m] * V[b,h,m,f] / {normalizer}
output O
"""
scores = st.sampled_from([
    "S0[b,h,p,m]", "S0[b,h,p,m] * 0.5 + Bias[h,p,m]", "3 * tanh(S0[b,h,p,m] / 3)",
    "S0[b,h,p,m] - 0.1 * (p - m)", "S0[b,h,p,m] + log1p(abs(Bias[h,p,m]))",
])
weights = st.sampled_from([
    "sigmoid(S[b,h,p,m])", "softplus(S[b,h,p,m])", "relu(S[b,h,p,m]) + 0.01", "exp(S[b,h,p,m] / 4)",
    "S[b,h,p,m] * S[b,h,p,m]", "where(S[b,h,p,m] > 0, S[b,h,p,m], 0.1)",
])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(predicate=predicates, score=scores, weight=weights, normalizer=st.sampled_from(["AD[b,h,p]", "M"]),
       p=st.integers(1, 37), seed=st.integers(0, 99))
def test_score_maps_and_normalizations_agree(predicate, score, weight, normalizer, p, seed):
    c = ei.parse(MAPS.format(predicate=predicate, score=score, weight=weight, normalizer=normalizer))
    m = p  # nbhd atoms need one sequence
    g = torch.Generator().manual_seed(seed)
    args = dict(Q=torch.randn(1, 2, p, 8, generator=g), K=torch.randn(1, 2, m, 8, generator=g),
                V=torch.randn(1, 2, m, 5, generator=g), Bias=torch.randn(2, p, m, generator=g))
    want = ei.interpret(c, **args)
    for backend in ("cpu", "triton"):
        got = ei.compile(c, backend=backend)(**(on_kernel_device(args) if backend == "triton" else args))
        tol = 1e-4 if backend == "cpu" or TOLERANCE < 1e-3 else TOLERANCE
        torch.testing.assert_close(got.cpu(), want, atol=tol, rtol=tol,
                                   msg=lambda text: f"{backend}: {score}; {weight}; where {predicate}: {text}")
