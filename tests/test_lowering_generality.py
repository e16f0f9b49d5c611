"""Lowering generality (issue 14, item 4), each case against the interpreter and an independent
formula on the CPU path and the Triton kernel: group predicates bound the key loop, index
`min`/`max` and tensor lookups read the same on both emitters, a term outside the contraction
is summed as the spec says, and a score is found whatever order its key tensor is stored in
(forward and derived backward)."""
import pytest
import torch

import einsum_ir as ei
from einsum_ir.lowering.strategy import key_loop_plan
from support import assert_outputs_close, on_kernel_device

pytest.importorskip("triton")

SOFTMAX = """dims B H P M E F
param scale = 1/sqrt(E)
param G: int
param W: int
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f], Len[b,h,p]: int32, X[b,h,m]
S0[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] * scale
S[b,h,p,m]  = S0[b,h,p,m] + {bias} where {predicate}
GM[b,h,p]   = max[m] S[b,h,p,m]
SN[b,h,p,m] = exp(S[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m]
O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]
output O
"""
P, M, H = 37, 41, 2


def _args(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(Q=torch.randn(1, H, P, 8, generator=g), K=torch.randn(1, H, M, 8, generator=g),
                V=torch.randn(1, H, M, 5, generator=g), X=torch.randn(1, H, M, generator=g),
                Len=torch.randint(0, M + 1, (1, H, P), generator=g, dtype=torch.int32), G=8, W=3)


def _dense(args: dict, mask: torch.Tensor, bias: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Softmax attention over the keys `mask` [H or 1, P, M] keeps; rows with none are 0."""
    s = torch.einsum("bhpe,bhme->bhpm", args["Q"].double(), args["K"].double()) * 8 ** -0.5 + bias
    s = s.masked_fill(~mask, -torch.inf)
    w = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhpm,bhmf->bhpf", w, args["V"].double()).float()


def _backends(c, args: dict, want: torch.Tensor) -> None:
    assert_outputs_close(ei.interpret(c, **args), want)
    assert_outputs_close(ei.compile(c, backend="cpu")(**args), want)
    assert_outputs_close(ei.compile(c, backend="triton")(**on_kernel_device(args)).cpu(), want)


p_, m_, h_ = torch.arange(P)[:, None], torch.arange(M)[None, :], torch.arange(H)[:, None, None]
GROUPS = [
    ("p // G == m // G", p_ // 8 == m_ // 8, True),
    ("m <= p and (p + W) // G == (m + W) // G", (m_ <= p_) & ((p_ + 3) // 8 == (m_ + 3) // 8), True),
    # LongLoRA's shift: the second half of the heads shifted by half a group (bounds |m - p| < G)
    ("m <= p and (p + (2*h // H) * (G // 2)) // G == (m + (2*h // H) * (G // 2)) // G",
     (m_ <= p_) & ((p_ + (2 * h_ // H) * 4) // 8 == (m_ + (2 * h_ // H) * 4) // 8), False),
]


@pytest.mark.parametrize("predicate, mask, interval", GROUPS, ids=[g[0] for g in GROUPS])
def test_group_predicates_give_loop_bounds_and_match_the_formula(predicate, mask, interval):
    c = ei.parse(SOFTMAX.format(bias="0", predicate=predicate))
    loop = key_loop_plan(c).stages[0].loop
    assert ("interval" in loop.describe()) == interval and "[opaque]" not in loop.describe()
    args = _args()
    _backends(c, args, _dense(args, mask.expand(H, P, M)[None]))


LOOKUPS = [
    ("X[b,h,max(m - W, 0)]", "m <= p"),
    ("X[b,h,min(m + W, M - 1)]", "m < Len[b,h,min(p + 1, P - 1)]"),
    ("0", "m < max(Len[b,h,max(p - W, 0)], 1)"),
    ("X[b,h,max(m, p) - p + m // 2]", "m <= max(p, W)"),
]


@pytest.mark.parametrize("bias, predicate", LOOKUPS, ids=[f"{b} | {w}" for b, w in LOOKUPS])
def test_index_min_max_and_tensor_lookups_agree_on_both_emitters(bias, predicate):
    c = ei.parse(SOFTMAX.format(bias=bias, predicate=predicate))
    args = _args(1)
    x, n, w = args["X"][0], args["Len"][0].long(), args["W"]
    p, m = torch.arange(P)[:, None], torch.arange(M)[None, :]
    terms = {"X[b,h,max(m - W, 0)]": lambda: x[:, (m - w).clamp(min=0).expand(P, M)],
             "X[b,h,min(m + W, M - 1)]": lambda: x[:, (m + w).clamp(max=M - 1).expand(P, M)],
             "X[b,h,max(m, p) - p + m // 2]": lambda: x[:, (torch.maximum(m, p) - p + m // 2).clamp(max=M - 1)],
             "0": lambda: torch.zeros(H, P, M)}
    masks = {"m <= p": (m <= p).expand(H, P, M),
             "m < Len[b,h,min(p + 1, P - 1)]": m < n[:, (p + 1).clamp(max=P - 1)],
             "m < max(Len[b,h,max(p - W, 0)], 1)": m < n[:, (p - w).clamp(min=0)].clamp(min=1),
             "m <= max(p, W)": (m <= torch.maximum(p, torch.tensor(w))).expand(H, P, M)}
    index = torch.maximum(m, p) - p + m // 2
    mask = masks[predicate] & (index < M) if "max(m, p)" in bias else masks[predicate]  # a read past X is absent
    _backends(c, args, _dense(args, mask[None], terms[bias]().double()[None]))


def test_a_term_outside_the_contraction_is_summed_over_the_contracted_rank_on_every_backend():
    # the reduction applies to the whole right side (docs/spec.md): sum_e (Q K scale + X) = Q.K scale + E X
    c = ei.parse(SOFTMAX.format(bias="X[b,h,m]", predicate="m <= p").replace(
        "S0[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] * scale\nS[b,h,p,m]  = S0[b,h,p,m]",
        "S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale"))
    assert len(c.einsums) == 5
    args = _args(2)
    _backends(c, args, _dense(args, (m_ <= p_).expand(H, P, M)[None], 8 * args["X"].double()[:, :, None, :]))


def test_a_map_over_three_tile_axes_summed_over_the_keys_is_summed_term_by_term():
    # VW spans (p, m, f), which no 2-D tile holds; its only reader sums it over m, so each term
    # becomes a contraction of its own (docs/lowering.md, "Rewrites")
    c = ei.parse(SOFTMAX.format(bias="0", predicate="m <= p").replace(
        "O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]",
        "VW[b,h,p,m,f] = SN[b,h,p,m] * V[b,h,m,f] - 0.5 * SN[b,h,p,m] * X[b,h,m] * V[b,h,m,f]\n"
        "O[b,h,p,f]  = VW[b,h,p,m,f] / SD[b,h,p]"))
    plan = key_loop_plan(c)
    assert "sums of terms summed term by term" in plan.rewrites
    assert "VW" not in plan.cascade.tensors
    args = _args(5)
    causal = (m_ <= p_).expand(H, P, M)[None]
    weight = 1 - 0.5 * args["X"].double()[:, :, :, None]
    want = _dense({**args, "V": (args["V"].double() * weight).float()}, causal)
    _backends(c, args, want)


@pytest.mark.parametrize("stored", ["K[b,h,e,m]", "K[e,b,m,h]"])
def test_score_detection_is_independent_of_the_key_storage_layout(stored):
    c = ei.parse(SOFTMAX.format(bias="0", predicate="m <= p").replace("K[b,h,m,e]", stored))
    plan = key_loop_plan(c)
    assert [(s.stream, s.query) for s in plan.stages] == [(("m",), ("p",))]
    args = _args(3)
    order = ["bhme".index(v) for v in stored[2:-1].split(",") for v in [v.strip()]]
    args["K"] = args["K"].permute(*order).contiguous()
    want = _dense({**args, "K": _args(3)["K"]}, (m_ <= p_).expand(H, P, M)[None])
    _backends(c, args, want)


def test_the_backward_of_a_transposed_key_layout_matches_autograd():
    c = ei.parse(SOFTMAX.format(bias="0", predicate="m <= p").replace("K[b,h,m,e]", "K[b,h,e,m]"))
    args = {k: v.double().requires_grad_() if k in "QKV" else v for k, v in _args(4).items()}
    args["K"] = args["K"].detach().transpose(-1, -2).contiguous().requires_grad_()
    grads, kern = [], ei.compile(c, backend="cpu")
    for run in (lambda a: ei.interpret(c, **a), lambda a: kern(**a)):
        out = run(args)
        grads.append(torch.autograd.grad(out.square().sum(), [args[n] for n in "QKV"]))
    for got, want in zip(*grads[::-1]):
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-6)


def test_score_sets_over_two_key_ranks_are_refused_naming_the_einsums_and_the_fix():
    text = """dims B H P M N E F
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f], K2[b,h,n,e], V2[b,h,n,f]
S0[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e]
S1[b,h,p,n] = Q[b,h,p,e] * K2[b,h,n,e]
G0[b,h,p] = max[m] S0[b,h,p,m]
G1[b,h,p] = max[n] S1[b,h,p,n]
GM[b,h,p] = max(G0[b,h,p], G1[b,h,p])
E0[b,h,p,m] = exp(S0[b,h,p,m] - GM[b,h,p])
E1[b,h,p,n] = exp(S1[b,h,p,n] - GM[b,h,p])
D0[b,h,p] = E0[b,h,p,m]
D1[b,h,p] = E1[b,h,p,n]
N0[b,h,p,f] = E0[b,h,p,m] * V[b,h,m,f]
N1[b,h,p,f] = E1[b,h,p,n] * V2[b,h,n,f]
O[b,h,p,f] = (N0[b,h,p,f] + N1[b,h,p,f]) / (D0[b,h,p] + D1[b,h,p])
output O
"""
    with pytest.raises(ei.LoweringError, match=r"two\.ein:7:1: GM: the key loops cannot be ordered: GM \(the loop "
                                               r"over n\) reads G0 \(the loop over m\).*stream the key sets as one rank"):
        key_loop_plan(ei.parse(text, file="two.ein"))
