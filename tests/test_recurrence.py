"""User-written recurrences (lowering/recurrence.py): FuseMax's 1-pass cascade folds back to the
multi-pass softmax, lowers, and runs on both backends at ragged sizes; other recurrence shapes
are refused, naming the Einsum."""
import pytest
import torch

import einsum_ir as ei
from einsum_ir.lowering.online import online
from einsum_ir.lowering.recurrence import fold_recurrences
from einsum_ir.lowering.strategy import build_plan
from support import assert_outputs_close, make_inputs, on_kernel_device

ONE_PASS = ei.variants.source("softmax_1pass")
RAGGED = [(9, 13, 4), (5, 21, 8), (12, 7, 16)]  # (P, M, M0): M not a multiple of M0; one tile past M


def _qkv(P: int, M: int, dtype=torch.float64) -> dict:
    c = ei.variants.load("softmax_1pass")
    return make_inputs("softmax_1pass", c, P=P, M=M, E=8, F=6, dtype=dtype)


def test_softmax_1pass_folds_to_the_multi_pass_softmax():
    c = fold_recurrences(ei.variants.load("softmax_1pass"))
    print(c)
    assert not c.inits and not c.splits and not any(e.recurrence_var for e in c.einsums)
    assert [e.reduce for e in c.einsums if e.reduced] == ["sum", "max", "sum", "sum"]  # Q.K, GM, SD, SN*V
    assert ei.parse(str(c)) == c
    assert ei.passes(ei.variants.load("softmax_1pass")).count == 1
    args = _qkv(9, 13)
    assert_outputs_close(ei.interpret(c, **args), ei.interpret(ei.variants.load("softmax"), **args), 1e-12)


@pytest.mark.parametrize("P,M,M0", RAGGED)
def test_softmax_1pass_on_the_cpu_path_equals_the_interpreter(P, M, M0):
    c = ei.variants.load("softmax_1pass")
    kern = ei.compile(c, backend="cpu")
    assert "recurrence folding" in kern.plan.rewrites
    args = _qkv(P, M)
    assert_outputs_close(kern(**args, M0=M0), ei.interpret(c, **args, M0=M0), 1e-10)


@pytest.mark.parametrize("P,M,M0", RAGGED[:2])
def test_softmax_1pass_in_triton_equals_the_interpreter(P, M, M0):
    pytest.importorskip("triton")  # tests/conftest.py sets TRITON_INTERPRET without a GPU
    c = ei.variants.load("softmax_1pass")
    kern = ei.compile(c, backend="triton")
    args = _qkv(P, M, torch.float32)
    assert_outputs_close(kern(**on_kernel_device(args), M0=M0), ei.interpret(c, **args, M0=M0))


def test_softmax_1pass_gradients_equal_the_interpreters():
    """The derived backward of the folded cascade (called without M0: the training forward
    binds the folded cascade's arguments, which have no tile)."""
    c = ei.variants.load("softmax_1pass")
    args = {k: v.requires_grad_(True) for k, v in _qkv(7, 11).items()}
    seed = torch.randn(1, 2, 7, 6, dtype=torch.float64)
    got = torch.autograd.grad(ei.compile(c, backend="cpu")(**args), list(args.values()), seed)
    want = torch.autograd.grad(ei.interpret(c, **args, M0=4), list(args.values()), seed)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["softmax_causal", "softmax_lse", "alibi", "softmax_window"])
def test_the_online_rewrites_1_pass_form_folds_back_and_lowers(name):
    """lowering.online writes Cascade 5 from Cascade 4 for any masked variant; folding undoes it."""
    c = ei.variants.load(name)
    folded = fold_recurrences(online(c))
    args = make_inputs(name, c, P=9, M=13, E=8, F=6, dtype=torch.float64)
    assert_outputs_close(ei.interpret(folded, **args), ei.interpret(c, **args), 1e-12)
    assert ei.parse(str(folded)) == folded
    build_plan(folded)


MIN_FORM = ONE_PASS.replace("init RM[b,h,0,p] = -inf", "init RM[b,h,0,p] = inf").replace(
    "max[m0] BQK[b,h,m1,m0,p]", "min[m0] -BQK[b,h,m1,m0,p]").replace(
    "max(RM[b,h,m1,p], LM[b,h,m1,p])", "min(RM[b,h,m1,p], LM[b,h,m1,p])").replace(
    "exp(BQK[b,h,m1,m0,p] - RM[b,h,m1+1,p])", "exp(BQK[b,h,m1,m0,p] + RM[b,h,m1+1,p])").replace(
    "exp(RM[b,h,m1,p] - RM[b,h,m1+1,p])", "exp(RM[b,h,m1+1,p] - RM[b,h,m1,p])")


def test_a_running_min_folds_into_a_min_reduction():
    one_pass = ei.parse(MIN_FORM)
    assert one_pass.einsum("RM").expr.fn == "min"
    folded = fold_recurrences(one_pass)
    assert folded.einsum("RM").reduce == "min" and not folded.inits
    for M0 in (3, 16):
        args = _qkv(9, 13)
        assert_outputs_close(ei.interpret(folded, **args), ei.interpret(one_pass, **args, M0=M0), 1e-12)
        assert_outputs_close(ei.interpret(folded, **args), ei.interpret(ei.variants.load("softmax"), **args), 1e-12)


@pytest.mark.parametrize("old,new,why", [
    ("RD[b,h,m1+1,p]    = SLD[b,h,m1,p] + SPD[b,h,m1,p]",
     "RD[b,h,m1+1,p]    = RD[b,h,m1,p] * RD[b,h,m1,p] + SLD[b,h,m1,p]", "RD is not linear in RD"),
    ("SPD[b,h,m1,p]     = RD[b,h,m1,p] * PRM[b,h,m1,p]",
     "SPD[b,h,m1,p]     = RD[b,h,m1,p] * PRM[b,h,m1,p] * 0.5", "RD's factor .* does not telescope"),
    ("init RD[b,h,0,p] = 0", "init RD[b,h,0,p] = 1", "RD starts at 1, not 0"),
    ("init RM[b,h,0,p] = -inf", "init RM[b,h,0,p] = 0", "RM is a running max but starts at 0, not -inf"),
    ("SLN[b,h,m1,m0,p]  = exp(BQK[b,h,m1,m0,p] - RM[b,h,m1+1,p])",
     "SLN[b,h,m1,m0,p]  = exp(BQK[b,h,m1,m0,p] - RM[b,h,m1+1,p]) + 1", "RD's addend .* still depends"),
])
def test_a_recurrence_of_another_shape_is_refused_naming_its_einsum(old, new, why):
    assert old in ONE_PASS
    c = ei.parse(ONE_PASS.replace(old, new), "one_pass.ein")
    with pytest.raises(ei.LoweringError, match=r"one_pass\.ein:\d+:\d+: " + why) as err:
        fold_recurrences(c)
    assert "write the multi-pass form" in str(err.value)
    with pytest.raises(ei.LoweringError, match=why):
        ei.compile(c, backend="cpu")


def test_a_split_sum_that_reads_no_key_tensor_does_not_fold():
    """Past M the last tile's points are present when nothing over M is read: dropping them
    would change the sum, so the fold is refused, naming the Einsum."""
    c = ei.parse("""dims B H P M E F
split M -> M1 x M0
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
init RC[b,h,p,0] = 0
LC[b,h,p,m1]   = 1.0 where m1 * M0 + m0 <= p
RC[b,h,p,m1+1] = LC[b,h,p,m1] + RC[b,h,p,m1]
C[b,h,p]       = RC[b,h,p,M1]
output C
""", "count.ein")
    with pytest.raises(ei.LoweringError, match=r"count\.ein:\d+:\d+: RC ranges over m1, m0 without reading"):
        fold_recurrences(c)
