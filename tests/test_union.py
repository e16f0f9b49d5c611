"""Union forms (docs/spec.md, "Unions"): `union_sum`, `union_max`, `union_min`, whose absent
operands act as the identity, and the validation that rejects the intersecting `+ - max min`
where it would silently drop the points one operand has. A softmax over several masked key
sets is checked against a dense masked-softmax formula written here in plain PyTorch."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import einsum_ir as ei
from einsum_ir.errors import SpecError
from einsum_ir.printer import print_expr

FILL = 1000.0  # a fill no union of the test values takes: it marks an absent output element

TRUTH = """dims P
input X[p], Y[p], Z[p], MX[p]: bool, MY[p]: bool, MZ[p]: bool
A[p] = X[p] where MX[p]
B[p] = Y[p] where MY[p]
C[p] = Z[p] where MZ[p]
U[p] = {call}
output U fill 1000.0
"""


def _truth_args():
    """Every presence pattern of three operands, one point each."""
    rows = list(itertools.product([True, False], repeat=3))
    mx, my, mz = (torch.tensor([r[k] for r in rows]) for k in range(3))
    x, y, z = torch.tensor([1.5] * 8), torch.tensor([-2.0] * 8), torch.tensor([4.0] * 8)
    return dict(X=x, Y=y, Z=z, MX=mx, MY=my, MZ=mz), rows


@pytest.mark.parametrize("form,combine", [("union_sum", sum), ("union_max", max), ("union_min", min)])
def test_presence_truth_table_of_two_and_three_operands(form, combine):
    args, rows = _truth_args()
    values = (1.5, -2.0, 4.0)
    for arity in (2, 3):
        names = ["A[p]", "B[p]", "C[p]"][:arity]
        c = ei.parse(TRUTH.format(call=f"{form}({', '.join(names)})"))
        got = ei.interpret(c, **args)
        for k, present in enumerate(rows):
            seen = [v for v, here in zip(values[:arity], present[:arity]) if here]
            want = combine(seen) if seen else FILL  # absent only where every operand is
            assert got[k].item() == want, (form, arity, present)


def test_a_union_of_an_operand_present_everywhere_is_present_everywhere():
    c = ei.parse(TRUTH.format(call="union_max(A[p], 0.5)"))
    args, rows = _truth_args()
    got = ei.interpret(c, **args)
    assert got.tolist() == [1.5 if r[0] else 0.5 for r in rows]


def test_union_sum_of_a_negation_subtracts():
    c = ei.parse(TRUTH.format(call="union_sum(A[p], -B[p])"))
    args, rows = _truth_args()
    got = ei.interpret(c, **args)
    want = [(1.5 if a else 0) + (2.0 if b else 0) if a or b else FILL for a, b, _ in rows]
    assert got.tolist() == want


@pytest.mark.parametrize("op", ["A[p] + B[p]", "A[p] - B[p]", "max(A[p], B[p])", "min(A[p], B[p])"])
def test_the_intersecting_form_of_different_predicates_is_rejected(op):
    with pytest.raises(SpecError) as err:
        ei.parse(TRUTH.format(call=op), file="t.ein")
    text = str(err.value)
    assert text.startswith("t.ein:6:") and "in U," in text and "union_" in text
    assert "MX[p]" in text and "MY[p]" in text  # both operands' presence
    want = {"+": "union_sum(A[p], B[p])", "-": "union_sum(A[p], -B[p])", "max": "union_max(A[p], B[p])",
            "min": "union_min(A[p], B[p])"}
    assert next(v for k, v in want.items() if k in op) in text


def test_union_forms_print_back_and_check_their_arity():
    c = ei.parse(TRUTH.format(call="union_sum(A[p], union_max(B[p], C[p]), -A[p])"))
    assert "union_sum(A[p], union_max(B[p], C[p]), -A[p])" in str(c)
    assert ei.parse(str(c)) == c
    with pytest.raises(SpecError, match=r"union_max\(\.\.\.\) takes 2 to 16 arguments, got 1"):
        ei.parse(TRUTH.format(call="union_max(A[p])"))
    with pytest.raises(SpecError, match=r"<spec>:2:\d+: error: param s uses union_sum\(\.\.\.\).* write '\+' instead"):
        ei.parse("dims P\nparam s = union_sum(1.0, 2.0)\ninput X[p]\nY[p] = X[p] * s\noutput Y\n")


# ---------------------------------------------------------------------------- two key sets

TWO_SETS = """dims B H P M E F
param scale = 1/sqrt(E)
param W: int
param NS: int
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S0[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] * scale where m <= p and p - m < W
S1[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] * scale where m < NS
G0[b,h,p] = max[m] S0[b,h,p,m]
G1[b,h,p] = max[m] S1[b,h,p,m]
GM[b,h,p] = {max}(G0[b,h,p], G1[b,h,p])
E0[b,h,p,m] = exp(S0[b,h,p,m] - GM[b,h,p])
E1[b,h,p,m] = exp(S1[b,h,p,m] - GM[b,h,p])
D0[b,h,p] = E0[b,h,p,m]
D1[b,h,p] = E1[b,h,p,m]
N0[b,h,p,f] = E0[b,h,p,m] * V[b,h,m,f]
N1[b,h,p,f] = E1[b,h,p,m] * V[b,h,m,f]
O[b,h,p,f] = {num} / {den}
output O
"""
UNION_TWO_SETS = TWO_SETS.format(max="union_max", num="union_sum(N0[b,h,p,f], N1[b,h,p,f])",
                                 den="union_sum(D0[b,h,p], D1[b,h,p])")


def dense_union_softmax(q, k, v, masks: list[torch.Tensor], scale: float,
                        sharpness: list[float] | None = None) -> torch.Tensor:
    """Softmax over the multiset union of key sets (a key in two sets counts twice): one
    maximum over every present score, each set's terms summed; a row of no key is 0. Set i's
    scores are scaled by sharpness[i] when given."""
    base = (q @ k.transpose(-1, -2)) * scale
    s = [base * (sharpness[i] if sharpness else 1.0) for i in range(len(masks))]
    gm = torch.stack([x.masked_fill(~m, -math.inf) for x, m in zip(s, masks)]).amax(0).amax(-1, keepdim=True)
    gm = torch.where(torch.isfinite(gm), gm, torch.zeros_like(gm))
    w = [torch.exp(x - gm) * m for x, m in zip(s, masks)]
    num = sum(x @ v for x in w)
    den = sum(x.sum(-1, keepdim=True) for x in w)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))


def _qkv(P, M, E=8, F=4, seed=0, B=1, H=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, P, E, generator=g), torch.randn(B, H, M, E, generator=g),
            torch.randn(B, H, M, F, generator=g))


def _window_and_sinks(P, M, W, NS):
    p, m = torch.arange(P)[:, None], torch.arange(M)[None, :]
    return [(m <= p) & (p - m < W), (m < NS).expand(P, M)]


def test_two_set_softmax_matches_the_dense_formula_with_rows_of_one_set():
    c = ei.parse(UNION_TWO_SETS)
    P, M = 20, 24
    q, k, v = _qkv(P, M)
    # W = 0: the window is empty everywhere, rows see the sinks only; NS = 0: the window only
    for W, NS in [(4, 2), (0, 3), (5, 0), (0, 0), (30, 30)]:
        got = ei.interpret(c, Q=q, K=k, V=v, W=W, NS=NS)
        want = dense_union_softmax(q, k, v, _window_and_sinks(P, M, W, NS), 8 ** -0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"W={W} NS={NS}")
        if W > 0 and NS == 0 or W == 0 and NS > 0:  # one set empty: every row still has its softmax
            assert got.abs().sum(-1).min() > 0


def test_the_old_intersecting_two_set_form_is_rejected_with_the_fix():
    old = TWO_SETS.format(max="union_max", num="(N0[b,h,p,f] + N1[b,h,p,f])", den="(D0[b,h,p] + D1[b,h,p])")
    with pytest.raises(SpecError) as err:
        ei.parse(old, file="pyramid.ein")
    text = str(err.value)
    assert text.startswith("pyramid.ein:17:") and "in O," in text
    assert "union_sum(N0[b,h,p,f], N1[b,h,p,f])" in text
    with pytest.raises(SpecError, match=r"in GM, 'max' .* union_max\(G0\[b,h,p\], G1\[b,h,p\]\)"):
        ei.parse(TWO_SETS.format(max="max", num="union_sum(N0[b,h,p,f], N1[b,h,p,f])",
                                 den="union_sum(D0[b,h,p], D1[b,h,p])"))


def test_a_masked_reduction_plus_a_dense_one_is_rejected():
    """The pooled keys unmasked, the full-resolution ones masked: `N0 + N1` would zero the rows
    whose full-resolution set is empty even though N1 is present there."""
    spec = UNION_TWO_SETS.replace(" where m < NS", "").replace("param NS: int\n", "")
    ei.parse(spec)  # the union form is fine
    bad = spec.replace("union_sum(N0[b,h,p,f], N1[b,h,p,f])", "(N0[b,h,p,f] + N1[b,h,p,f])")
    with pytest.raises(SpecError, match=r"in O, '\+' .*N0\[b,h,p,f\] is absent where some m has m <= p"):
        ei.parse(bad)


def test_intersections_that_mean_what_they_say_are_accepted():
    """The catalog's own forms: S - GM, GM + log(SD), a bias on masked scores, recurrences,
    a constant clamp of a masked maximum."""
    for name in ei.variants.names():
        ei.variants.load(name)
    ei.parse("""dims P M E
input Q[p,e], K[m,e], Bias[p,m]
S[p,m] = Q[p,e] * K[m,e] where m <= p
T[p,m] = S[p,m] + Bias[p,m]
GM[p] = max[m] T[p,m]
C[p] = max(GM[p], 0.0)
SN[p,m] = exp(T[p,m] - GM[p])
SD[p] = SN[p,m]
LSE[p] = GM[p] + log(SD[p])
output LSE
""")


# ---------------------------------------------------------------------------- fuzzing

PREDICATES = [  # (spec text, dense mask of (p, m) index tensors); a few constants each
    ("m <= p", lambda p, m: m <= p),
    ("m <= p and p - m < 5", lambda p, m: (m <= p) & (p - m < 5)),
    ("p - m < 3 and m - p < 3", lambda p, m: (p - m < 3) & (m - p < 3)),
    ("m < 2", lambda p, m: m < 2),
    ("m // 8 == p // 8", lambda p, m: m // 8 == p // 8),
    ("m >= p + 4", lambda p, m: m >= p + 4),
    ("m % 5 == 0 and m <= p", lambda p, m: (m % 5 == 0) & (m <= p)),
    ("m >= 100", lambda p, m: m >= 100),  # empty at these shapes: a set that never contributes
]


def union_spec(preds: list[str], nested: bool = False, sharpness: list[float] | None = None) -> str:
    """One softmax over the union of len(preds) masked key sets over one key rank; with
    `sharpness`, set i's scores are scaled by sharpness[i] (one contraction per set)."""
    lines = ["dims B H P M E F", "param scale = 1/sqrt(E)", "input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]"]
    n = len(preds)
    for i, pred in enumerate(preds):
        factor = f" * {sharpness[i]!r}" if sharpness else ""
        lines.append(f"S{i}[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] * scale{factor} where {pred}")
        lines.append(f"G{i}[b,h,p] = max[m] S{i}[b,h,p,m]")

    def union(form: str, reads: list[str]) -> str:
        if nested and len(reads) > 2:  # union forms nest: ((a u b) u c)
            return f"{form}({union(form, reads[:-1])}, {reads[-1]})"
        return f"{form}({', '.join(reads)})"

    lines.append(f"GM[b,h,p] = {union('union_max', [f'G{i}[b,h,p]' for i in range(n)])}")
    for i in range(n):
        lines.append(f"E{i}[b,h,p,m] = exp(S{i}[b,h,p,m] - GM[b,h,p])")
        lines.append(f"D{i}[b,h,p] = E{i}[b,h,p,m]")
        lines.append(f"N{i}[b,h,p,f] = E{i}[b,h,p,m] * V[b,h,m,f]")
    num = union("union_sum", [f"N{i}[b,h,p,f]" for i in range(n)])
    den = union("union_sum", [f"D{i}[b,h,p]" for i in range(n)])
    lines += [f"O[b,h,p,f] = {num} / {den}", "output O"]
    return "\n".join(lines) + "\n"


def fuzz_cases(count: int, seed: int):
    rng = random.Random(seed)
    for _ in range(count):
        chosen = rng.sample(range(len(PREDICATES)), rng.choice([2, 2, 3]))
        yield [PREDICATES[k] for k in chosen], rng.choice([False, True]), rng.randrange(1, 30), rng.randrange(1, 30)


@pytest.mark.parametrize("case", list(range(24)))
def test_fuzzed_unions_of_masked_key_sets_match_the_dense_formula(case):
    preds, nested, P, M = list(fuzz_cases(24, seed=14))[case]
    c = ei.parse(union_spec([t for t, _ in preds], nested))
    q, k, v = _qkv(P, M, seed=case)
    p, m = torch.arange(P)[:, None], torch.arange(M)[None, :]
    want = dense_union_softmax(q, k, v, [f(p, m).expand(P, M) for _, f in preds], 8 ** -0.5)
    torch.testing.assert_close(ei.interpret(c, Q=q, K=k, V=v), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- kernels

from support import TOLERANCE, assert_outputs_close, on_kernel_device  # noqa: E402


def _stage_of(c):
    from einsum_ir.lowering.strategy import build_plan

    plan = build_plan(c)
    assert len(plan.stages) == 1, "one fused kernel"
    return plan, plan.stages[0]


def test_two_set_softmax_lowers_to_one_kernel_with_one_running_max_and_denominator():
    c = ei.parse(UNION_TWO_SETS)
    plan, stage = _stage_of(c)
    carried = [e for e in stage.einsums if stage.kinds[e.name] == "carried"]
    assert [e.reduce for e in carried].count("max") == 1 and stage.online == ("GM",)
    sums = [e for e in carried if e.reduce == "sum"]
    assert len(sums) == 2 and {len(e.lhs_vars) for e in sums} == {3, 4}  # one denominator, one numerator
    assert all(str(stage.rescale[e.name]) != "1" for e in sums)  # both rescaled by the one running max
    assert "unions of reductions as reductions of unions" in plan.rewrites
    assert "union_" not in str(plan.cascade)  # the kernel sees plain IR: sentinels under `A or B`
    assert "where m <= p and p - m < W or m < NS" in str(plan.cascade)
    # one score contraction for both sets, and the loop bounds of the union of the two sets:
    # the sinks' tiles, then the window's, with full tiles needing no mask
    assert sum(1 for e in stage.einsums if e.reduced == ["e"]) == 1
    assert stage.loop.exact and any(not seg.masked for seg in stage.loop.tile_segments)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_two_set_softmax_kernels_match_the_formula_with_rows_of_one_set(backend):
    c = ei.parse(UNION_TWO_SETS)
    kern = ei.compile(c, backend=backend)
    P, M = 37, 45  # ragged tiles
    q, k, v = _qkv(P, M, E=16, F=8, seed=3)
    for W, NS in [(6, 3), (0, 4), (9, 0), (0, 0)]:
        want = dense_union_softmax(q, k, v, _window_and_sinks(P, M, W, NS), 16 ** -0.5)
        args = dict(Q=q, K=k, V=v, W=W, NS=NS)
        got = kern(**(on_kernel_device(args) if backend == "triton" else args))
        assert_outputs_close(got.cpu(), want, atol=TOLERANCE if backend == "triton" else 1e-5,
                             rtol=TOLERANCE if backend == "triton" else 1e-5)


@pytest.mark.parametrize("case", list(range(8)))
def test_fuzzed_unions_on_the_cpu_and_triton_kernels(case):
    """Odd cases give each set its own score scale: one contraction per set, each selected."""
    preds, nested, P, M = list(fuzz_cases(8, seed=41))[case]
    sharp = [1.0 + 0.5 * i for i in range(len(preds))] if case % 2 else None
    c = ei.parse(union_spec([t for t, _ in preds], nested, sharp))
    q, k, v = _qkv(P + 20, M + 20, E=16, F=8, seed=case)
    p, m = torch.arange(P + 20)[:, None], torch.arange(M + 20)[None, :]
    want = dense_union_softmax(q, k, v, [f(p, m).expand(P + 20, M + 20) for _, f in preds], 16 ** -0.5, sharp)
    _stage_of(c)
    assert_outputs_close(ei.compile(c, backend="cpu")(Q=q, K=k, V=v), want, atol=1e-5, rtol=1e-5)
    got = ei.compile(c, backend="triton")(**on_kernel_device(dict(Q=q, K=k, V=v)))
    assert_outputs_close(got.cpu(), want, atol=TOLERANCE, rtol=TOLERANCE)


def test_a_union_of_final_sums_is_evaluated_by_their_presence_after_the_loop():
    """A union of two linear (unnormalized) sums, each present where its set saw a key: after
    the key loop each sum's presence is known (a row saw a point of its set), and the kernels
    take the union there, keeping the rows that one set misses (p >= 9 see no key m >= p + 3)."""
    spec = """dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S0[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] where m <= p
S1[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] where m >= p + 3
N0[b,h,p,f] = S0[b,h,p,m] * V[b,h,m,f]
N1[b,h,p,f] = S1[b,h,p,m] * V[b,h,m,f]
O[b,h,p,f] = union_sum(N0[b,h,p,f], N1[b,h,p,f])
output O fill -1.0
"""
    c = ei.parse(spec)
    q, k, v = _qkv(19, 12, seed=5)
    s = q @ k.transpose(-1, -2)
    p, m = torch.arange(19)[:, None], torch.arange(12)[None, :]
    want = (s * (m <= p)) @ v + (s * (m >= p + 3)) @ v  # every row sees a key of the first set
    torch.testing.assert_close(ei.interpret(c, Q=q, K=k, V=v), want, atol=1e-5, rtol=1e-5)
    for backend in ("cpu", "triton"):
        kern = ei.compile(c, backend=backend)
        assert len(kern.plan.stages) == 1
        args = dict(Q=q, K=k, V=v) if backend == "cpu" else on_kernel_device(dict(Q=q, K=k, V=v))
        torch.testing.assert_close(kern(**args).cpu(), want, atol=1e-4, rtol=1e-4)


def late_union_spec(preds: list[str]) -> str:
    """A union of unnormalized sums, one per masked key set: each is present where its set saw
    a key, which a key loop knows only after the loop."""
    lines = ["dims B H P M E F", "input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]"]
    for i, pred in enumerate(preds):
        lines.append(f"S{i}[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] where {pred}")
        lines.append(f"N{i}[b,h,p,f] = S{i}[b,h,p,m] * V[b,h,m,f]")
    reads = ", ".join(f"N{i}[b,h,p,f]" for i in range(len(preds)))
    return "\n".join(lines + [f"O[b,h,p,f] = union_sum({reads})", "output O fill -1.0"]) + "\n"


@pytest.mark.parametrize("case", list(range(6)))
def test_fuzzed_unions_known_after_the_loop_on_the_interpreter_and_both_kernels(case):
    """Rows that see no key of some set take the others' sums; rows of no key at all, the fill."""
    preds, _, P, M = list(fuzz_cases(6, seed=77))[case]
    c = ei.parse(late_union_spec([t for t, _ in preds]))
    q, k, v = _qkv(P, M, E=16, F=8, seed=case)
    p, m = torch.arange(P)[:, None], torch.arange(M)[None, :]
    masks = [f(p, m).expand(P, M) for _, f in preds]
    s = q @ k.transpose(-1, -2)
    want = sum((s * mask) @ v for mask in masks)
    seen = torch.stack(masks).any(0).any(-1)[None, None, :, None]
    want = torch.where(seen, want, torch.full_like(want, -1.0))
    torch.testing.assert_close(ei.interpret(c, Q=q, K=k, V=v), want, atol=1e-4, rtol=1e-4)
    for backend in ("cpu", "triton"):
        args = dict(Q=q, K=k, V=v)
        got = ei.compile(c, backend=backend)(**(on_kernel_device(args) if backend == "triton" else args))
        assert_outputs_close(got.cpu(), want, atol=1e-3, rtol=1e-3)


def test_a_sum_over_a_union_known_late_is_the_union_of_the_sums():
    """`O = sum_m union_sum(AK, AR) * V` with AR present only in rows that saw a sink (var_sink):
    the sum distributes over the union, which then reads final values after the loop."""
    from einsum_ir.lowering.unions import hoist_unions

    c = hoist_unions(ei.variants.load("var_sink"))
    o = c.einsum("O")
    assert not o.reduced and print_expr(o.expr) == "union_sum(O_u0[b,h,p,f], O_u1[b,h,p,f])"
    assert print_expr(c.einsum("O_u1").expr) == "AR[b,h,p,m] * V[b,h,m,f]"


def test_the_fused_backward_of_a_two_set_softmax_matches_autograd_through_the_interpreter():
    c = ei.parse(UNION_TWO_SETS)
    assert len(ei.grad(c).backward) == 1  # derived from the union-free lowered cascade
    q, k, v = _qkv(37, 45, E=16, F=8, seed=3)
    kern = ei.compile(c, backend="cpu")

    def grads(run):
        leaves = [t.clone().double().requires_grad_() for t in (q, k, v)]
        run(*leaves).sum().backward()
        return [t.grad for t in leaves]

    for W, NS in [(6, 3), (0, 4), (9, 0)]:  # rows of both sets, of the sinks only, of the window only
        got = grads(lambda Q, K, V: kern(Q=Q, K=K, V=V, W=W, NS=NS))
        want = grads(lambda Q, K, V: ei.interpret(c, Q=Q, K=K, V=V, W=W, NS=NS))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


# the second set over 4x pooled keys before the window: a rank of its own, N
PYRAMID = (TWO_SETS.format(max="union_max", num="union_sum(N0[b,h,p,f], N1[b,h,p,f])",
                           den="union_sum(D0[b,h,p], D1[b,h,p])")
           .replace("dims B H P M E F", "dims B H P M N E F").replace("param NS: int\n", "")
           .replace("V[b,h,m,f]\n", "V[b,h,m,f], KP[b,h,n,e], VP[b,h,n,f]\n", 1)
           .replace("K[b,h,m,e] * scale where m < NS", "KP[b,h,n,e] * scale where n * 4 + 3 < p - W")
           .replace("S1[b,h,p,m]", "S1[b,h,p,n]").replace("E1[b,h,p,m]", "E1[b,h,p,n]")
           .replace("G1[b,h,p] = max[m]", "G1[b,h,p] = max[n]").replace("E1[b,h,p,n] * V[b,h,m,f]", "E1[b,h,p,n] * VP[b,h,n,f]"))


def test_pyramid_keys_at_two_resolutions_interpret_exactly_and_the_kernels_say_why_not():
    """Full-resolution keys in a window plus 4x pooled keys before it (pyramid sparse attention):
    two key ranks, so no single key loop; the interpreter is exact, the kernels refuse, located."""
    c = ei.parse(PYRAMID)
    P, M, N, W = 40, 40, 10, 6
    q, k, v = _qkv(P, M, seed=7)
    kp, vp = k.reshape(1, 2, N, 4, 8).mean(3), v.reshape(1, 2, N, 4, 4).mean(3)
    p = torch.arange(P)[:, None]
    m0 = (torch.arange(M)[None] <= p) & (p - torch.arange(M)[None] < W)
    m1 = torch.arange(N)[None] * 4 + 3 < p - W
    s0, s1 = (q @ k.transpose(-1, -2)) * 8 ** -0.5, (q @ kp.transpose(-1, -2)) * 8 ** -0.5
    gm = torch.maximum(s0.masked_fill(~m0, -math.inf).amax(-1), s1.masked_fill(~m1, -math.inf).amax(-1))[..., None]
    w0, w1 = torch.exp(s0 - gm) * m0, torch.exp(s1 - gm) * m1
    want = (w0 @ v + w1 @ vp) / (w0.sum(-1, keepdim=True) + w1.sum(-1, keepdim=True))
    args = dict(Q=q, K=k, V=v, KP=kp, VP=vp, W=W)
    torch.testing.assert_close(ei.interpret(c, **args), want, atol=1e-5, rtol=1e-5)
    assert m1[:W + 4].sum() == 0  # the first rows see no pooled key: the union keeps their window
    with pytest.raises(ei.LoweringError, match=r"<spec>:9:\d+: GM: union_max.* different ranks \(m, n\)"):
        ei.compile(c, backend="cpu")
    torch.testing.assert_close(ei.compile(c)(**args), want, atol=1e-5, rtol=1e-5)


def test_partial_states_of_a_two_set_softmax_merge_to_the_whole():
    """Split-KV over the union: each key range's state (one max, one denominator, one
    numerator) merges exactly, also when a range sees only one set or none."""
    c = ei.parse(UNION_TWO_SETS)
    q, k, v = _qkv(37, 45, E=16, F=8, seed=3)
    kern = ei.compile(c, backend="cpu")
    for W, NS in [(6, 3), (0, 4), (9, 0)]:
        args = dict(Q=q, K=k, V=v, W=W, NS=NS)
        states = [kern.partial(keys=r, **args) for r in [(0, 4), (4, 20), (20, 45)]]
        torch.testing.assert_close(ei.merge(c, states).finalize(), ei.interpret(c, **args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_masked_set_and_an_unmasked_one(backend):
    """A window plus every key at half the sharpness: the union is present everywhere and the
    window's rows keep both sets' terms (the intersecting `+` is rejected, above)."""
    spec = union_spec(["m <= p and p - m < 5", "m <= p"], sharpness=[1.0, 0.5])
    c = ei.parse(spec.replace("scale * 0.5 where m <= p", "scale * 0.5"))
    P, M = 30, 41
    q, k, v = _qkv(P, M, E=16, F=8, seed=2)
    p, m = torch.arange(P)[:, None], torch.arange(M)[None, :]
    want = dense_union_softmax(q, k, v, [(m <= p) & (p - m < 5), torch.ones(P, M, dtype=torch.bool)], 0.25,
                               [1.0, 0.5])
    args = dict(Q=q, K=k, V=v)
    got = ei.compile(c, backend=backend)(**(on_kernel_device(args) if backend == "triton" else args))
    assert_outputs_close(got.cpu(), want, atol=1e-5 if backend != "triton" else TOLERANCE,
                         rtol=1e-5 if backend != "triton" else TOLERANCE)
