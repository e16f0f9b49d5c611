"""Cross-rank reads (docs/spec.md, "Einsums"; issue 14 item 2): an input read with the index
variable of another rank of equal extent, `G[b,h,m]` for `input G[b,h,p]`, checked against plain
PyTorch formulas in the interpreter, against the interpreter on the CPU path and in Triton, with
the two extents compared at bind time (and by the cost model), and printed back as written."""
import pytest
import torch

import einsum_ir as ei
from support import assert_outputs_close, on_kernel_device

# Gated linear attention: one cumulative log-gate G, read at the query and at the key.
GATED = """dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f], G[b,h,p]
S[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] where m <= p
D[b,h,p,m] = S[b,h,p,m] * exp(G[b,h,p] - G[b,h,m])
O[b,h,p,f] = D[b,h,p,m] * V[b,h,m,f]
output O
"""

# Softmax with an additive per-key bias stored along the query rank.
KEY_BIAS = """dims B H P M E F
param scale = 1/sqrt(E)
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f], Bq[b,h,p]
S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale
T[b,h,p,m]  = S[b,h,p,m] + Bq[b,h,m]
GM[b,h,p]   = max[m] T[b,h,p,m]
SN[b,h,p,m] = exp(T[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m]
O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]
output O
"""

# Symmetric (collapsed Q = K = V) attention: no input declares M, so it takes P's extent.
SYMMETRIC = """dims B H P M E
param scale = 1/sqrt(E)
input Q[b,h,p,e]
S[b,h,p,m]  = Q[b,h,p,e] * Q[b,h,m,e] * scale where m <= p
GM[b,h,p]   = max[m] S[b,h,p,m]
SN[b,h,p,m] = exp(S[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m]
O[b,h,p,e]  = SN[b,h,p,m] * Q[b,h,m,e] / SD[b,h,p]
output O
"""

B, H, N, E, F = 2, 3, 37, 16, 8  # N: a partial key tile


def _gated_inputs(n: int = N) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"Q": torch.randn(B, H, n, E, generator=g), "K": torch.randn(B, H, n, E, generator=g),
            "V": torch.randn(B, H, n, F, generator=g),
            "G": torch.cumsum(-torch.rand(B, H, n, generator=g), -1)}  # log-gates: decreasing


def _key_bias_inputs(n: int = N) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"Q": torch.randn(B, H, n, E, generator=g), "K": torch.randn(B, H, n, E, generator=g),
            "V": torch.randn(B, H, n, F, generator=g), "Bq": torch.randn(B, H, n, generator=g)}


def _symmetric_inputs(n: int = N) -> dict:
    return {"Q": torch.randn(B, H, n, E, generator=torch.Generator().manual_seed(2))}


def _gated_formula(Q, K, V, G):
    causal = torch.ones(Q.shape[2], K.shape[2], dtype=torch.bool).tril()
    decay = torch.exp(G[..., :, None] - G[..., None, :])
    return ((Q @ K.transpose(-1, -2)) * decay * causal) @ V


def _key_bias_formula(Q, K, V, Bq):
    return torch.softmax(Q @ K.transpose(-1, -2) / E ** 0.5 + Bq[..., None, :], -1) @ V


def _symmetric_formula(Q):
    causal = torch.ones(Q.shape[2], Q.shape[2], dtype=torch.bool).tril()
    scores = (Q @ Q.transpose(-1, -2) / E ** 0.5).masked_fill(~causal, -torch.inf)
    return torch.softmax(scores, -1) @ Q


CASES = {"gated": (GATED, _gated_inputs, _gated_formula),
         "key_bias": (KEY_BIAS, _key_bias_inputs, _key_bias_formula),
         "symmetric": (SYMMETRIC, _symmetric_inputs, _symmetric_formula)}


def _call(backend: str, c, args: dict):
    """`c` run on `backend`; "cpu" and "triton" raise LoweringError rather than fall back."""
    if backend == "reference":
        return ei.interpret(c, **args)
    if backend == "triton":
        pytest.importorskip("triton")
        args = on_kernel_device(args)
    return ei.compile(c, backend=backend)(**args)


@pytest.mark.parametrize("case", sorted(CASES))
def test_interpreter_matches_formula(case):
    spec, inputs, formula = CASES[case]
    args = inputs()
    torch.testing.assert_close(ei.interpret(ei.parse(spec), **args), formula(**args), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_kernel_matches_interpreter(case, backend):
    spec, inputs, _ = CASES[case]
    c = ei.parse(spec)
    args = inputs()
    want = ei.interpret(c, **args)
    got = _call(backend, c, args).cpu()
    # G's decay grows to e^N off the causal band's edge: compare relative to the output's scale
    assert_outputs_close(got / want.abs().max(), want / want.abs().max())


def test_triton_reads_the_declared_stride_at_the_key_index():
    shapes = {"B": 1, "H": 2, "P": 256, "M": 256, "E": 64, "F": 64}
    src = ei.compile(ei.parse(KEY_BIAS), backend="triton").source(shapes, device="h100")
    assert "r_k * stride_Bq_2" in src  # Bq's own P stride, stepped by the key tile's index


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_unequal_extents_are_a_bind_error_naming_both_ranks(backend):
    args = _gated_inputs()
    args["Q"], args["G"] = args["Q"][:, :, :30], args["G"][:, :, :30]  # P = 30, M = 37
    with pytest.raises(ei.BindError, match=r"^<spec>:4:42: G is read at m \(rank M\) in D, declared at p "
                                           r"\(rank P\): M=37 and P=30 differ"):
        _call(backend, ei.parse(GATED), args)


def test_a_given_extent_is_checked_against_the_paired_rank():
    with pytest.raises(ei.BindError, match=r"Q is read at m \(rank M\) in S, declared at p \(rank P\): "
                                           r"M=5 and P=37 differ"):
        ei.interpret(ei.parse(SYMMETRIC), M=5, **_symmetric_inputs())


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip(case):
    c = ei.parse(CASES[case][0])
    assert ei.parse(str(c)) == c


def test_cost_model_reads_the_gate_once_and_checks_extents():
    c = ei.parse(GATED)
    shapes = {"B": 1, "H": 2, "P": 1024, "M": 1024, "E": 64, "F": 64}
    assert ei.counts(c, shapes=shapes, dtype="bf16").input_bytes["G"] == 1 * 2 * 1024 * 2
    with pytest.raises(ValueError, match=r"M=512 and P=1024 differ"):
        ei.counts(c, shapes={**shapes, "M": 512})


@pytest.mark.parametrize("body, fragment", [
    ("S[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e]\nT[b,h,p,m] = S[b,h,m,p]\noutput T\n",
     "position 3 of S has rank P; only an input may be read at another rank's index"),
    ("split M -> M1 x M0\nS[b,h,p,m1] = Q[b,h,m1,e]\noutput S\n",
     "position 3 of Q has rank P; a cross-rank read pairs two ranks of the dims line, and M1 is a split rank"),
])
def test_what_cannot_be_read_at_another_rank(body, fragment):
    header = "dims B H P M E F\ninput Q[b,h,p,e], K[b,h,m,e]\n"
    with pytest.raises(ei.SpecError, match=fragment):
        ei.parse(header + body)
