"""The backward of union forms (docs/backward.md, "Union forms"): a union's derivative by its
operands' presence, carried into the backward as counts of points the training forward saves.

var_sink (a union of the causal softmax and a share present only in rows that saw a sink and
another image token) is checked against torch autograd through its independent plain-PyTorch
formula (einsum_ir.variants.formulas), not the interpreter: in fp64 on the CPU path, in fp32
on Triton (the GPU when there is one, else Triton's interpreter on CPU tensors), with rows of
no sink, rows of sinks and no other image token, a batch whose image tokens are all sinks, a
batch of no sink, and a head with Rho = 0."""
from __future__ import annotations

import pytest
import torch

import einsum_ir as ei
from einsum_ir.codegen.autograd import Training, run_backward, training_forward
from einsum_ir.codegen.kernel import ReferenceKernel
from einsum_ir.ir import Access, Call, Index, Num, walk
from einsum_ir.lowering.grad import diff
from einsum_ir.variants.formulas import FORMULAS
from support import KERNEL_DEVICE, make_inputs, on_kernel_device

# (P, M): P = M; P < M; P > M (the last rows see every key)
SHAPES = [(11, 11), (7, 13), (14, 9)]


def var_sink_args(P: int, M: int, dtype=torch.float64, seed: int = 0) -> dict:
    """Three sequences: 0 has image tokens 1..7 with sinks 1 and 5 (row 0 sees no sink, row 1
    sinks only); 1 has image tokens that are all sinks (no row has another image token); 2 has
    image tokens and no sink. Head 1 has Rho = 0 (not image-centric)."""
    g = torch.Generator().manual_seed(seed)
    B, H, E, F = 3, 3, 6, 5
    img = torch.zeros(B, M, dtype=torch.bool)
    sink = torch.zeros(B, M, dtype=torch.bool)
    img[0, 1:8] = True
    sink[0, [1, 5]] = True
    img[1, [2, 4]] = sink[1, [2, 4]] = True
    img[2, 0:6] = True
    return dict(Q=torch.randn(B, H, P, E, generator=g, dtype=dtype),
                K=torch.randn(B, H, M, E, generator=g, dtype=dtype),
                V=torch.randn(B, H, M, F, generator=g, dtype=dtype),
                Rho=torch.tensor([0.6, 0.0, 0.9], dtype=dtype), Sink=sink, Img=img)


def _grads(run, args: dict) -> tuple[dict, torch.Tensor]:
    """Gradients of every floating input through `run` for a fixed random output gradient."""
    leaves = {k: v.detach().clone().requires_grad_(True) if v.is_floating_point() else v for k, v in args.items()}
    out = run(**leaves)
    seed = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    names = [k for k, v in leaves.items() if v.requires_grad]
    found = torch.autograd.grad(out, [leaves[n] for n in names], seed.to(out.device, out.dtype), allow_unused=True)
    return {n: torch.zeros_like(leaves[n]) if d is None else d for n, d in zip(names, found)}, out


def _assert_close(got: dict, want: dict, tol: float) -> None:
    assert got.keys() == want.keys()
    for n, w in want.items():
        g = got[n].detach().double().cpu()
        assert not g.isnan().any(), f"NaN in d{n}"
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(g, w.double().cpu(), atol=tol * scale, rtol=tol, msg=lambda m: f"d{n}: {m}")


def test_the_cases_are_there():
    """The inputs hold every case the docstring names, so the checks below exercise them."""
    args = var_sink_args(11, 11)
    p, m = torch.arange(11)[:, None], torch.arange(11)[None, :]
    seen = m <= p
    sinks = (seen & args["Sink"][:, None, :]).any(-1)
    others = (seen & (args["Img"] & ~args["Sink"])[:, None, :]).any(-1)
    assert (~sinks[0]).any() and (sinks[0] & ~others[0]).any() and (sinks[0] & others[0]).any()
    assert sinks[1].any() and not others[1].any() and not sinks[2].any() and others[2].any()
    assert (args["Rho"] == 0).any()


def test_var_sink_has_a_backward_saving_a_count_per_set_of_points():
    g = ei.grad(ei.variants.load("var_sink"))
    assert set(g.grads) == {"Q", "K", "V", "Rho"}
    counts = [n for n in g.saved if g.forward.einsum(n).expr == Num(1.0)]
    assert len(counts) == 2  # rows that saw a sink; rows that saw another image token
    fills = {o.name: o.fill for o in g.forward.outputs}
    assert all(fills[n] == 0.0 for n in counts)  # a row that saw no point counts 0
    for b in g.cascades:
        assert not any(isinstance(n, Call) and n.fn == "union_sum" for e in b.einsums for n in walk(e.expr))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "P%d_M%d" % s)
def test_the_derived_backward_cascades_match_autograd_through_the_formula(shape):
    """The cascades alone, run by the interpreter: the derivation is exact."""
    c = ei.variants.load("var_sink")
    args = var_sink_args(*shape)
    t = Training(c, lambda cascade, fp32: ReferenceKernel(cascade))
    outputs, saved = training_forward(t, args)
    seed = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = run_backward(t, args, outputs, saved, (seed,))
    want, out = _grads(FORMULAS["var_sink"], args)
    torch.testing.assert_close(outputs[0], out.detach(), atol=1e-12, rtol=1e-12)
    _assert_close(got, want, 1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "P%d_M%d" % s)
def test_cpu_backward_of_var_sink_matches_autograd_through_the_formula_in_fp64(shape):
    c = ei.variants.load("var_sink")
    args = var_sink_args(*shape)
    got, out = _grads(ei.compile(c, backend="cpu"), args)
    assert type(out.grad_fn).__name__ == "_FusedBackward"  # the derived kernels, not a recomputation
    want, _ = _grads(FORMULAS["var_sink"], args)
    _assert_close(got, want, 1e-10)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "P%d_M%d" % s)
def test_triton_backward_of_var_sink_matches_autograd_through_the_formula(shape):
    pytest.importorskip("triton")
    c = ei.variants.load("var_sink")
    args = on_kernel_device(var_sink_args(*shape, dtype=torch.float32))
    got, out = _grads(ei.compile(c, backend="triton"), args)
    assert type(out.grad_fn).__name__ == "_FusedBackward"
    want, _ = _grads(FORMULAS["var_sink"], {k: v.cpu().double() if v.is_floating_point() else v.cpu()
                                            for k, v in args.items()})
    _assert_close(got, want, 3e-2 if KERNEL_DEVICE == "cuda" else 2e-4)  # TF32 dots on a GPU


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("shape", [(12, 12, 8, 8), (9, 21, 8, 6), (21, 10, 6, 5)], ids=lambda s: "P%d_M%d_E%d_F%d" % s)
def test_var_sink_backward_with_random_sink_and_image_flags(shape, backend):
    """tests/test_grad.py's shapes and inputs (random flags: ragged tiles, rows of every kind)."""
    if backend == "triton":
        pytest.importorskip("triton")
    c = ei.variants.load("var_sink")
    P, M, E, F = shape
    dtype = torch.float64 if backend == "cpu" else torch.float32
    args = make_inputs("var_sink", c, P=P, M=M, E=E, F=F, dtype=dtype)
    want, _ = _grads(FORMULAS["var_sink"], {k: v.double() if v.is_floating_point() else v for k, v in args.items()})
    got, _ = _grads(ei.compile(c, backend=backend), args if backend == "cpu" else on_kernel_device(args))
    _assert_close(got, want, 1e-10 if backend == "cpu" else 3e-2 if KERNEL_DEVICE == "cuda" else 2e-4)


# A union of two unnormalized sums over key sets a row may miss, known only after the loop; a
# row that sees neither set takes the fill.
LATE_SUMS = """dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S0[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] where m <= p - 6
S1[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] where m >= p + 3 and p != 4
N0[b,h,p,f] = S0[b,h,p,m] * V[b,h,m,f]
N1[b,h,p,f] = S1[b,h,p,m] * V[b,h,m,f]
O[b,h,p,f]  = union_sum(N0[b,h,p,f], N1[b,h,p,f])
output O fill -1.0
"""


def _qkv(P: int, M: int, dtype=torch.float64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(Q=torch.randn(1, 2, P, 4, generator=g, dtype=dtype),
                K=torch.randn(1, 2, M, 4, generator=g, dtype=dtype),
                V=torch.randn(1, 2, M, 3, generator=g, dtype=dtype))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_a_union_of_final_sums_has_the_gradient_of_the_sums_each_row_saw(backend):
    """Rows 0..3 and 5 see only the second set, rows 6..8 both, the last rows only the first, row
    4 neither: each set's sum gets the output's gradient where it is present, nothing elsewhere."""
    if backend == "triton":
        pytest.importorskip("triton")
    c = ei.parse(LATE_SUMS)
    args = _qkv(14, 12)
    q, k, v = args["Q"], args["K"], args["V"]
    p, m = torch.arange(14)[:, None], torch.arange(12)[None, :]
    masks = [m <= p - 6, (m >= p + 3) & (p != 4)]

    def formula(Q, K, V):
        s = Q @ K.transpose(-1, -2)
        out = sum((s * mask) @ V for mask in masks)
        seen = (masks[0] | masks[1]).any(-1)[None, None, :, None]
        return torch.where(seen, out, torch.full_like(out, -1.0))

    seen = [mask.any(-1) for mask in masks]
    assert (seen[0] & seen[1]).any() and (seen[0] & ~seen[1]).any() and (~seen[0] & seen[1]).any()
    assert (~seen[0] & ~seen[1]).any()  # a row of no key: the fill, no gradient
    want, _ = _grads(formula, dict(Q=q, K=k, V=v))
    run = dict(Q=q, K=k, V=v) if backend == "cpu" else on_kernel_device({n: t.float() for n, t in args.items()})
    got, _ = _grads(ei.compile(c, backend=backend), run)
    _assert_close(got, want, 1e-10 if backend == "cpu" else 1e-4)


# A union_max of two row maxima over key sets a row may miss, read by a nonlinear output: the
# backward recomputes the union from the saved maxima by their presence.
LATE_MAX = """dims B H P M E
input Q[b,h,p,e], K[b,h,m,e]
S0[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] where m <= p
S1[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] where m >= p + 3
G0[b,h,p]   = max[m] S0[b,h,p,m]
G1[b,h,p]   = max[m] S1[b,h,p,m]
MX[b,h,p]   = union_max(G0[b,h,p], G1[b,h,p])
Y[b,h,p]    = MX[b,h,p] * MX[b,h,p]
output Y fill -1.0
"""


def test_a_union_max_routes_its_gradient_to_the_present_maximum_split_evenly_at_ties():
    """Through the derived cascades (interpreted) against autograd through the interpreter, whose
    torch.maximum splits a tie evenly too: rows 0..2 attain one key in both sets (K[5] = K[0])."""
    c = ei.parse(LATE_MAX)
    args = _qkv(13, 9)
    args.pop("V")
    args["K"][:, :, 5] = args["K"][:, :, 0]
    args["Q"][:, :, :3] = 3 * args["K"][:, :, 0:1]
    s = args["Q"] @ args["K"].transpose(-1, -2)
    assert all(s[0, 0, p, :p + 1].max() == s[0, 0, p, p + 3:].max() for p in range(3))  # the ties
    t = Training(c, lambda cascade, fp32: ReferenceKernel(cascade))
    outputs, saved = training_forward(t, args)
    seed = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = run_backward(t, args, outputs, saved, (seed,))
    want, _ = _grads(lambda **a: ei.interpret(c, **a), args)
    _assert_close(got, want, 1e-12)


def test_the_union_sum_rule_passes_a_derivative_on_where_the_operand_is_present():
    x, y = Access("X", (Index("p"),)), Access("Y", (Index("p"),))
    here = Access("H", (Index("p"),))
    u = Call("union_sum", (x, Call("exp", (y,))))
    assert diff(u, x, present=lambda a: here if a == x else None) == Call("where", (here, Num(1), Num(0.0)))
    assert diff(u, y, present=lambda a: None) == Call("exp", (y,))


def test_a_union_operand_absent_by_a_predicate_of_its_own_is_refused_with_what_to_write():
    spec = LATE_SUMS.replace("input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]",
                             "input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f], G[b,h,p]").replace(
        "O[b,h,p,f]  = union_sum(N0[b,h,p,f], N1[b,h,p,f])",
        "X[b,h,p,f]  = N1[b,h,p,f] where p < 3\nO[b,h,p,f]  = union_sum(N0[b,h,p,f], X[b,h,p,f] * G[b,h,p])")
    with pytest.raises(ei.LoweringError, match=r"u\.ein:8:\d+: X\[b,h,p,f\] \* G\[b,h,p\] is a union operand "
                                               r"present where p .*, a predicate of its own.*select instead, where\("):
        ei.grad(ei.parse(spec, file="u.ein"))
