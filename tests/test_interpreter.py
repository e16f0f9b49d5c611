"""Reference semantics: reductions, absent points and fills, index expressions, predicates,
recurrences and call-time binding, each against plain torch or brute-force Python."""
import math

import pytest
import torch

import einsum_ir as ei
from einsum_ir.variants.formulas import gna_window


def run(spec: str, **args):
    return ei.interpret(ei.parse(spec), **args)


def test_reductions_max_min_prod_and_sum():
    x = torch.randn(3, 7)
    spec = "dims P M\ninput X[p,m]\nA[p] = max[m] X[p,m]\nB[p] = min[m] X[p,m]\nC[p] = prod[m] X[p,m]\nD[p] = X[p,m]\noutput A, B, C, D\n"
    a, b, c, d = run(spec, X=x)
    assert torch.equal(a, x.amax(1)) and torch.equal(b, x.amin(1))
    assert torch.allclose(c, x.prod(1)) and torch.allclose(d, x.sum(1))


def test_map_then_reduce_applies_to_the_whole_right_side():
    x, y = torch.randn(4, 3), torch.randn(5, 3)
    # sum over e of (X*Y + 1) = X@Y^T + E
    out = run("dims P M E\ninput X[p,e], Y[m,e]\nS[p,m] = X[p,e] * Y[m,e] + 1\noutput S\n", X=x, Y=y)
    assert torch.allclose(out, x @ y.T + 3, atol=1e-6)


def test_fully_masked_rows_give_fill_values_and_no_nan():
    spec = """dims P M E F
input Q[p,e], K[m,e], V[m,f]
S[p,m]  = Q[p,e] * K[m,e] where m < p - 2
GM[p]   = max[m] S[p,m]
SN[p,m] = exp(S[p,m] - GM[p])
SD[p]   = SN[p,m]
O[p,f]  = SN[p,m] * V[m,f] / SD[p]
LSE[p]  = GM[p] + log(SD[p])
output O, LSE fill -inf
"""
    q, k, v = torch.randn(6, 4), torch.randn(6, 4), torch.randn(6, 2)
    o, lse = run(spec, Q=q, K=k, V=v)
    assert not o.isnan().any() and not lse.isnan().any()
    assert torch.equal(o[:3], torch.zeros(3, 2)) and torch.equal(lse[:3], torch.full((3,), -math.inf))
    mask = torch.arange(6)[None, :] < torch.arange(6)[:, None] - 2
    scores = (q @ k.T).masked_fill(~mask, -math.inf)
    assert torch.allclose(o[3:], scores[3:].softmax(-1) @ v, atol=1e-6)
    assert torch.allclose(lse[3:], scores[3:].logsumexp(-1), atol=1e-6)


def test_index_variables_and_dims_as_values():
    out = run("dims P M\nparam c: float\ninput X[p,m]\nY[p,m] = X[p,m] - c * (p - m) + M\noutput Y\n",
              X=torch.zeros(3, 4), c=0.5)
    p, m = torch.arange(3)[:, None], torch.arange(4)[None, :]
    assert torch.allclose(out, -0.5 * (p - m) + 4.0)


def test_affine_index_expressions_and_out_of_range_reads_are_absent():
    x = torch.arange(10.0)
    y = run("dims P M\ninput X[m]\nY[p] = X[min(2*p + 1, M - 1)] + X[p // 3] * X[p % 4]\noutput Y\n", X=x, P=6)
    p = torch.arange(6)
    assert torch.equal(y, x[torch.clamp(2 * p + 1, max=9)] + x[p // 3] * x[p % 4])
    # p + 8 runs past M=10 for p >= 2: those points are absent and fill with 0.
    y = run("dims P M\ninput X[m]\nY[p] = X[p + 8]\noutput Y fill -1\n", X=x, P=4)
    assert torch.equal(y, torch.tensor([8.0, 9.0, -1.0, -1.0]))


def test_predicate_reads_a_boolean_selection_tensor():
    sel = torch.tensor([[True, False], [False, False]])
    x = torch.ones(4, 4)
    y = run("dims P M PB MB\ninput X[p,m], Sel[pb,mb]: bool\nY[p] = X[p,m] where Sel[p//2, m//2]\noutput Y\n",
            X=x, Sel=sel)
    assert torch.equal(y, torch.tensor([2.0, 2.0, 0.0, 0.0]))


def _gna_window(i: int, length: int, w: int, s: int) -> range:
    """GNA's rule, written out with Python ints (DESIGN section 5)."""
    left, right = w // 2, w // 2 + w % 2 - 1
    leader = min((i // s) * s + s // 2, length - 1)
    start = max(leader - left, 0) + (leader + right >= length) * (length - right - leader - 1)
    return range(start, start + w)


@pytest.mark.parametrize("length, w, s, d", [(17, 5, 1, 1), (17, 5, 5, 1), (16, 6, 3, 1), (20, 4, 2, 2), (9, 9, 1, 1)])
def test_nbhd_matches_the_gna_rule(length, w, s, d):
    spec = ("dims P M\nparam W: int\nparam S: int\nparam D: int\ninput X[p,m]\n"
            "O[p,m] = X[p,m] where nbhd(p, m, M, W, S, D)\noutput O\n")
    got = run(spec, X=torch.ones(length, length), W=w, S=s, D=d) != 0
    for i in range(length):
        g = i % d
        glen = len(range(g, length, d))
        window = _gna_window(i // d, glen, w, s)
        want = [j % d == g and j // d in window for j in range(length)]
        assert got[i].tolist() == want, (i, got[i].tolist(), want)
    assert bool(got.sum(1).eq(w).all())  # every query sees exactly w keys, none past the edges


def test_nbhd_in_a_spec_with_runtime_params():
    x = torch.randn(12, 3)
    y = run("dims P M E\nparam W: int\nparam S: int\ninput X[p,e], Y[m,e]\nO[p,m] = X[p,e] * Y[m,e] where nbhd(p, m, M, W, S)\noutput O\n",
            X=x, Y=x, W=5, S=2)
    mask = gna_window(12, 5, 2)
    assert torch.allclose(y, (x @ x.T) * mask, atol=1e-6)


def test_recurrence_is_a_running_sum_and_carries_over_absent_steps():
    spec = """dims M
split M -> M1 x M0
input X[m]
init R[0] = 0
T[m1] = X[m1*M0 + m0] where m1 != 1
R[m1+1] = R[m1] + T[m1]
Y[m1] = R[m1+1]
Z[m] = R[M1] + 0 * X[m]
output Y, Z
"""
    x = torch.arange(1.0, 11.0)
    y, z = run(spec, X=x, M0=4)
    first, last = x[0:4].sum(), x[8:10].sum()  # tile 1 is masked out whole: R keeps its value
    assert torch.allclose(y, torch.stack([first, first, first + last]))
    assert torch.allclose(z, (first + last).expand(10))


def test_cascade5_equals_cascade4_for_ragged_tiles():
    q, k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 13, 8), torch.randn(2, 2, 13, 3)
    ref = ei.interpret(ei.variants.load("softmax"), Q=q, K=k, V=v)
    for m0 in (1, 5, 13, 64):
        assert torch.allclose(ei.interpret(ei.variants.load("softmax_1pass"), Q=q, K=k, V=v, M0=m0), ref, atol=1e-5)


def test_dtypes_run_in_fp32_and_return_the_input_dtype():
    c = ei.variants.load("softmax")
    q = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    out = ei.interpret(c, Q=q, K=q, V=q)
    assert out.dtype == torch.bfloat16
    ref = torch.softmax(q.float() @ q.float().transpose(-1, -2) / math.sqrt(8), -1) @ q.float()
    assert torch.allclose(out.float(), ref, atol=1e-2)


@pytest.mark.parametrize("args, fragment", [
    (dict(Q=torch.zeros(1, 1, 4, 8), K=torch.zeros(1, 1, 5, 8), V=torch.zeros(1, 1, 6, 8)),
     "rank M is 5 in K (dim 2) but 6 in V (dim 2)"),
    (dict(Q=torch.zeros(1, 1, 4, 8), K=torch.zeros(1, 1, 5, 8)), "missing input tensor(s) V"),
    (dict(Q=torch.zeros(1, 4, 8), K=torch.zeros(1, 1, 5, 8), V=torch.zeros(1, 1, 5, 8)),
     "input Q[b, h, p, e] has 4 dims, but the tensor given has shape (1, 4, 8)"),
    (dict(Q=torch.zeros(1, 1, 4, 8), K=torch.zeros(1, 1, 5, 8), V=torch.zeros(1, 1, 5, 8), W=3),
     "unexpected argument(s) W"),
])
def test_binding_errors_name_ranks_and_tensors(args, fragment):
    with pytest.raises(ei.BindError) as info:
        ei.interpret(ei.variants.load("softmax"), **args)
    assert fragment in str(info.value)


def test_missing_runtime_param():
    with pytest.raises(ei.BindError, match="missing param W"):
        run("dims P\nparam W: int\ninput X[p]\nY[p] = X[p] where p < W\noutput Y\n", X=torch.ones(3))
