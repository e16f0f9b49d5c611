"""Call-time arguments (docs/spec.md, "Calling a cascade"): runtime params by their declared type,
derived params finite, dtypes promoted as in torch, tensors only, and empty ranks: every backend binds
through einsum_ir.params, so every backend accepts and rejects the same calls, and gives the
same results where a rank is empty."""
import math

import numpy as np
import pytest
import torch

import einsum_ir as ei
from support import CAUSAL_SOFTMAX_LSE, KERNEL_DEVICE, make_inputs, on_kernel_device

BACKENDS = ["reference", "cpu", "triton"]


def _run(backend: str, c, args: dict):
    if backend == "triton":
        pytest.importorskip("triton")
        out = ei.compile(c, backend="triton")(**on_kernel_device(args))
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()
    return ei.interpret(c, **args) if backend == "reference" else ei.compile(c, backend="cpu")(**args)


@pytest.mark.parametrize("value, message", [
    (2.5, "param W=2.5: declared int, so it takes an integer"),
    ("8", "param W (int) takes a number, got str '8'"),
    ("abc", "param W (int) takes a number, got str 'abc'"),
    (None, "param W (int) takes a number, got NoneType"),
    (math.nan, "param W=nan"),
    (1e30, "param W=1e+30"),
    (True, "param W (int) takes a number, got bool"),
    (torch.tensor([4, 5]), "param W (int) takes one number, got a tensor of shape (2,)"),
])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_runtime_params_are_checked_by_their_declared_type(backend, value, message):
    c = ei.variants.load("softmax_window")
    with pytest.raises(ei.BindError, match="^" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("+", r"\+").replace(".", r"\.")):
        _run(backend, c, make_inputs("softmax_window", c, extra={"W": value}))


@pytest.mark.parametrize("value", [8, 8.0, np.int64(8), torch.tensor(8)])
def test_integer_values_of_any_type_are_accepted(value):
    c = ei.variants.load("softmax_window")
    args = make_inputs("softmax_window", c)
    torch.testing.assert_close(ei.interpret(c, **{**args, "W": value}), ei.interpret(c, **{**args, "W": 8}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_of_zero_or_less_masks_every_key_on_every_backend(backend):
    """The sign rule: `p - m < W` is integer arithmetic, so W <= 0 holds for no key: every row
    is absent and takes the fill (O = 0, LSE = -inf), never NaN."""
    c = ei.parse(CAUSAL_SOFTMAX_LSE.replace("param scale", "param W: int\nparam scale")
                 .replace("where m <= p", "where m <= p and p - m < W"))
    for w in (0, -3):
        o, lse = _run(backend, c, make_inputs("x", c, P=9, M=11, extra={"W": w}))
        assert torch.equal(o, torch.zeros_like(o)) and bool(torch.isneginf(lse).all())


@pytest.mark.parametrize("w, st, problem", [(0, 1, "the window is 0; it must be at least 1"),
                                            (9, 0, "the stride is 0"), (3, 5, "the stride is 5")])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_neighborhood_arguments_follow_gna(backend, w, st, problem):
    c = ei.variants.load("nbhd_1d")
    with pytest.raises(ei.BindError, match=r"nbhd_1d.ein:\d+:\d+: nbhd\(p, m, M, W, ST\): " + problem):
        _run(backend, c, make_inputs("nbhd_1d", c, P=12, M=12, extra={"W": w, "ST": st}))


@pytest.mark.parametrize("expr, value", [("1/(E - 4)", "inf"), ("sqrt(E - 10)", "nan"), ("log(E - 4)", "-inf")])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_non_finite_derived_params_are_located_bind_errors(backend, expr, value):
    c = ei.parse(CAUSAL_SOFTMAX_LSE.replace("param scale = 1/sqrt(E)", f"param scale = {expr}"), file="s.ein")
    with pytest.raises(ei.BindError, match=rf"^s.ein:2:7: param scale = .* is {value} with E=4"):
        _run(backend, c, make_inputs("x", c, E=4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_floating_dtypes_promote_as_in_torch_on_every_backend(backend):
    """fp16 Q with fp32 K and V gives an fp32 result (torch.promote_types), equal to the
    interpreter's on the same values, not a silent fp16."""
    c = ei.variants.load("softmax")
    args = make_inputs("softmax", c)
    args["Q"] = args["Q"].half()
    out = _run(backend, c, args)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ei.interpret(c, **{**args, "Q": args["Q"].float()}), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("value, hint", [([[1.0]], "got list; pass torch.tensor"),
                                         (np.zeros((1, 2, 5, 4)), "got ndarray; pass torch.from_numpy")])
def test_lists_and_arrays_are_bind_errors(value, hint):
    c = ei.variants.load("softmax")
    args = make_inputs("softmax", c)
    with pytest.raises(ei.BindError, match=f"input Q must be a torch.Tensor, {hint}"):
        ei.interpret(c, **{**args, "Q": value})


ZERO_SCALE = CAUSAL_SOFTMAX_LSE.replace("param scale = 1/sqrt(E)\n", "").replace(" * scale", "")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("empty", ["P", "M", "B", "E", "F"])
def test_empty_ranks_give_the_same_outputs_on_every_backend(backend, empty):
    """A reduction over an empty rank has no point, so like one over no present point it is
    absent: M=0 or E=0 gives O = 0 and LSE = -inf (the fills); an output with an empty rank is
    empty."""
    c = ei.parse(ZERO_SCALE)
    sizes = {"P": 9, "M": 11, "E": 4, "F": 3, "B": 1, empty: 0}
    o, lse = _run(backend, c, make_inputs("x", c, **sizes))
    assert o.shape == (sizes["B"], 2, sizes["P"], sizes["F"]) and lse.shape == (sizes["B"], 2, sizes["P"])
    if empty in ("M", "E"):
        assert torch.equal(o, torch.zeros_like(o)) and bool(torch.isneginf(lse).all())
    if empty == "F":  # O is empty; LSE does not read F
        ref = ei.interpret(c, **make_inputs("x", c, **{**sizes, "F": 1}))[1]
        torch.testing.assert_close(lse, ref)


def test_a_recurrence_over_no_step_is_absent():
    c = ei.variants.load("softmax_1pass")
    out = ei.interpret(c, **make_inputs("softmax_1pass", c, M=0))
    assert torch.equal(out, torch.zeros_like(out))


def test_the_scale_of_an_empty_head_dim_is_a_bind_error():
    """1/sqrt(E) at E=0 is inf: the derived-param rule, on every backend alike."""
    c = ei.variants.load("softmax_causal")
    with pytest.raises(ei.BindError, match=r"param scale = 1 / sqrt\(E\) is inf with E=0"):
        ei.interpret(c, **make_inputs("softmax_causal", c, E=0))


@pytest.mark.parametrize("size", [-1, 2.5, "8"])
def test_extents_given_by_name_are_checked(size):
    c = ei.parse("dims P M\ninput X[p]\nY[p,m] = X[p] * m\noutput Y\n")
    with pytest.raises(ei.BindError, match="rank M=.*: an extent is an integer >= 0"):
        ei.interpret(c, X=torch.ones(3), M=size)


def test_kernels_of_an_empty_call_keep_their_dtypes_on_the_kernel_device():
    c = ei.parse(ZERO_SCALE)
    args = on_kernel_device(make_inputs("x", c, M=0, dtype=torch.float16))
    o, lse = ei.compile(c)(**args)
    assert o.dtype == lse.dtype == torch.float16 and o.device.type == KERNEL_DEVICE
