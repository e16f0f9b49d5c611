"""Op, byte and present-point counts, exact and symbolic where possible; in closed form at any
size (cost_model/lattice.py), checked against brute force."""
import subprocess
import sys

import pytest
import sympy
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import einsum_ir as ei
from einsum_ir.cost_model import lattice, predicates as pr
from einsum_ir.cost_model.counts import parts_of
from einsum_ir.printer import print_expr

N, B, H, E, F = sympy.symbols("N B H E F", positive=True, integer=True)


def _brute(pred: str, params: str = "", **sizes) -> int:
    c = ei.parse(f"dims P M\n{params}\nS[p,m] = 1 where {pred}\noutput S")
    return int(ei.interpret(c, **sizes).sum())


def test_causal_count_is_n_n_plus_1_over_2_symbolically():
    r = ei.counts(ei.variants.load("softmax_causal"), {"P": N, "M": N})
    S = r.einsum("S")
    b, h, e = (ei.variants.load("softmax_causal").ranks[x].extent for x in "BHE")
    assert sympy.simplify(S.points - b * h * e * N * (N + 1) / 2) == 0
    assert sympy.simplify(S.macs - b * h * e * N * (N + 1) / 2) == 0
    # The absence propagates: the exp and the second contraction see the same N(N+1)/2 points.
    assert sympy.simplify(r.einsum("SN").sfu_ops - b * h * N * (N + 1) / 2) == 0


def test_causal_count_numeric_at_large_n():
    r = ei.counts(ei.variants.load("softmax_causal"), dict(B=1, H=1, P=131072, M=131072, E=1, F=1))
    assert r.einsum("S").points == 131072 * 131073 // 2


def test_window_count_matches_brute_force():
    c = ei.variants.load("softmax_window")
    for p, m, w in [(37, 37, 5), (20, 33, 7), (16, 16, 40)]:
        got = ei.counts(c, dict(B=1, H=1, P=p, M=m, E=1, F=1, W=w)).einsum("S").points
        assert got == _brute("m <= p and p - m < W", "param W: int", P=p, M=m, W=w)


def test_sinks_or_window_count_matches_brute_force():
    c = ei.variants.load("sinks_window")
    got = ei.counts(c, dict(B=1, H=1, P=50, M=50, E=1, F=1, W=6, NS=3)).einsum("S").points
    assert got == _brute("m <= p and (m < NS or p - m < W)", "param W: int\nparam NS: int", P=50, M=50, W=6, NS=3)


def test_dense_softmax_counts():
    r = ei.counts(ei.variants.load("softmax"), dict(B=2, H=3, P=64, M=32, E=16, F=8))
    assert r.macs == 2 * 3 * 64 * 32 * (16 + 8)
    assert r.sfu_ops == 2 * 3 * 64 * 32  # one exp per score
    assert r.compulsory_bytes == 2 * (2 * 3 * 64 * 16 + 2 * 3 * 32 * 16 + 2 * 3 * 32 * 8 + 2 * 3 * 64 * 8)
    assert r.footprints["S"] == 4 * 2 * 3 * 64 * 32


def test_symbolic_dense_counts():
    c = ei.variants.load("softmax")
    r = ei.counts(c, {})
    b, h, p, m, e, f = (c.ranks[x].extent for x in "BHPMEF")
    assert sympy.expand(r.macs - b * h * p * m * (e + f)) == 0


def test_tensor_predicate_is_an_upper_bound_unless_given():
    c = ei.variants.load("moba")
    shapes = dict(B=1, H=1, P=64, M=64, E=4, F=4, PB=4, MB=4, BS=16)
    r = ei.counts(c, shapes)
    assert r.einsum("S").points == 64 * 65 // 2 * 4 and r.notes
    sel = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    sel[0, 0, :, 0] = True  # every query block attends only to key block 0
    exact = ei.counts(c, {**shapes, "Sel": sel}).einsum("S").points
    mask = (torch.arange(64).view(1, -1) <= torch.arange(64).view(-1, 1)) & (torch.arange(64).view(1, -1) < 16)
    assert exact == int(mask.sum()) * 4 and not ei.counts(c, {**shapes, "Sel": sel}).notes


def test_counts_table_prints():
    text = str(ei.counts(ei.variants.load("softmax_1pass"), dict(B=1, H=2, P=128, M=128, E=64, F=64)))
    assert "total" in text and "compulsory" in text


# --------------------------------------------------------------------------- closed form (issue 15)

ONE_COMPONENT = "dims P M\n{params}\nS[p,m] = 1 where {pred}\noutput S"
affine = st.one_of(
    st.integers(-5, 5).map(lambda c: f"m <= p + {c}" if c >= 0 else f"m <= p - {-c}"),
    st.integers(1, 9).map(lambda w: f"p - m < {w}"),
    st.integers(0, 9).map(lambda n: f"m < {n}"),
    st.tuples(st.integers(1, 3), st.integers(-4, 4)).map(lambda ab: f"{ab[0]} * m >= p + {ab[1]}"),
    st.tuples(st.integers(1, 6), st.integers(1, 6)).map(lambda d: f"p // {d[0]} == m // {d[1]}"),
    st.tuples(st.integers(2, 5), st.integers(0, 4)).map(lambda d: f"(p + m) % {d[0]} != {d[1] % d[0]}"),
    st.tuples(st.integers(1, 9), st.integers(1, 4)).map(lambda ws: f"nbhd(p, m, M, {max(ws)}, {min(ws)})"),
    st.tuples(st.integers(1, 7), st.integers(1, 3)).map(lambda ws: f"nbhd(p, m, M, {max(ws)}, 1, {ws[1]})"),
    st.integers(0, 9).map(lambda n: f"min(p, m) < {n}"),
    st.integers(0, 9).map(lambda n: f"max(p - 3, m // 2) >= {n}"),
)
clauses = st.recursive(affine, lambda inner: st.one_of(
    st.tuples(inner, inner).map(lambda ab: f"({ab[0]}) and ({ab[1]})"),
    st.tuples(inner, inner).map(lambda ab: f"({ab[0]}) or ({ab[1]})"),
    inner.map(lambda a: f"not ({a})")), max_leaves=3)


def _closed_form(c, sizes: dict) -> int:
    """The lattice count of the cascade's one predicate over p and m, component by component."""
    total, free = 1, {"p", "m"}
    for comp in pr.components(c.einsums[0].where, parts_of(c)):
        total *= lattice.count(comp.clauses, comp.vars, {v: sizes[v.upper()] for v in comp.vars}, sizes, parts_of(c))
        free -= set(comp.vars)
    for v in free:
        total *= sizes[v.upper()]
    return total


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pred=clauses, p=st.integers(0, 40), m=st.integers(0, 40))
def test_closed_form_counts_match_brute_force(pred, p, m):
    if "nbhd" in pred:
        p = m  # a neighborhood is over one sequence
    c = ei.parse(ONE_COMPONENT.format(params="", pred=pred))
    want = int(ei.interpret(c, P=p, M=m).sum()) if p and m else 0
    assert _closed_form(c, {"P": p, "M": m}) == want, pred


@pytest.mark.parametrize("variant, params", [("softmax_window", {"W": 7}), ("sinks_window", {"W": 5, "NS": 3}),
                                             ("nbhd_1d", {"W": 9, "ST": 4}), ("softmax_causal_bottom_right", {})])
def test_catalog_counts_match_brute_force(variant, params):
    c = ei.variants.load(variant)
    brute = ei.parse(ONE_COMPONENT.format(params="\n".join(f"param {k}: int" for k in params),
                                          pred=print_expr(c.einsum("S").where)))
    for p, m in [(37, 41), (40, 40), (1, 13)]:
        p = m if variant == "nbhd_1d" else p
        want = int(ei.interpret(brute, P=p, M=m, **params).sum())
        assert ei.counts(c, {"B": 1, "H": 1, "P": p, "M": m, "E": 1, "F": 1, **params}).einsum("S").points == want


def test_counts_at_a_trillion_tokens_are_exact_and_closed_form():
    n = 10 ** 12
    r = ei.counts(ei.variants.load("softmax_causal"), dict(B=1, H=16, P=n, M=n, E=128, F=128))
    assert r.einsum("S").points == 16 * 128 * n * (n + 1) // 2  # beyond int64: Python integers
    w = 4096
    r = ei.counts(ei.variants.load("softmax_window"), dict(B=1, H=1, P=n, M=n, E=1, F=1, W=w))
    assert r.einsum("S").points == w * n - w * (w - 1) // 2


def test_block_masks_count_by_residues():
    n = 10 ** 9  # 1e18 points; the old row-by-row count needed a row per query
    c = ei.parse(ONE_COMPONENT.format(params="", pred="p // 128 == m // 128 or m < 64"))
    assert _closed_form(c, {"P": n, "M": n}) == (n // 128) * 128 * 128 + n * 64 - 128 * 64


def test_counting_imports_no_torch():
    code = ("import sys, einsum_ir as ei\n"
            "r = ei.counts(ei.variants.load('nbhd_2d'), dict(B=1, H=1, PX=10**6, PY=10**6, MX=10**6, MY=10**6,"
            " E=64, F=64, WX=81, WY=81, SX=16, SY=16))\n"
            "assert r.einsum('S').points > 0\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("shape, message", [
    ("P=-5", "P=-5: a dim size is an integer >= 0 that fits in int64"),
    ("P=1e20", "P=100000000000000000000: a dim size is an integer >= 0 that fits in int64"),
    ("P=2.5", "P=2.5: a dim takes an integer"),
    ("P=nan", "P=nan: a dim takes a finite number"),
    ("P=abc", "--shapes P=abc: 'abc' is not a number"),
])
def test_bad_sizes_are_one_line_errors(shape, message, capsys):
    from einsum_ir.cli import main

    assert main(["analyze", "softmax_causal", "--shapes", f"B=1,H=2,P=64,M=64,E=16,F=16,{shape}"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().startswith(f"einsum-ir: error: {message}") and captured.out == ""


def test_analyze_at_a_trillion_tokens(capsys):
    from einsum_ir.cli import main

    assert main(["analyze", "softmax_causal", "--shapes", "B=1,H=16,P=1e12,M=1e12,E=128,F=128"]) == 0
    out = capsys.readouterr().out
    assert "S       1024.000Y" in out and "Roofline on" in out  # 16 * 128 * 1e12 * (1e12 + 1) / 2 points


def test_an_empty_head_dim_counts_no_nan():
    r = ei.counts(ei.variants.load("softmax_causal"), dict(B=1, H=2, P=64, M=64, E=0, F=16))
    assert all(sympy.sympify(x).is_finite for e in r.einsums for x in (e.points, e.vector_ops, e.sfu_ops))


BLOCK_MASKED = """dims H P M PB MB
param BS: int
param W: int
input Sel[h,pb,mb]: bool
S[h,p,m] = 1 where {pred}
output S
"""


@pytest.mark.parametrize("pred", [
    "Sel[h,p // BS,m // BS] and m <= p",
    "Sel[h,p // BS,(m + 3) // BS] and m <= p and p - m < W",
    "Sel[h,(p + 5) // BS,m // 7] and not (m > p + 2 or m < p - W)",
    "Sel[h,p // BS,m % 3] and m <= p",
    "Sel[h,p // BS,m // BS] and nbhd(p, m, P, W)",
    "Sel[h,p // BS,m // BS] and 2*m <= 3*p - 1 and m != p",
    "Sel[h,p // BS,m // BS] and (p // 5) * 5 <= m",
    "not Sel[h,p // BS,m // BS] and m >= p",
])
@pytest.mark.parametrize("P, M, BS, W", [(100, 100, 16, 9), (37, 53, 8, 5), (64, 64, 64, 64), (70, 33, 7, 1)])
def test_block_masks_are_counted_box_by_box_exactly(pred, P, M, BS, W, monkeypatch):
    """A tensor read through block indices is counted per box of blocks, the index arithmetic
    beside it in closed form per class of boxes: never row by row; against the interpreter."""
    import numpy as np

    c = ei.parse(BLOCK_MASKED.format(pred=pred))
    pb, mb = -(-(P + 5) // BS) + 1, max(-(-(M + 3) // BS), -(-M // 7), 3) + 1
    sel = np.random.default_rng(P + M + BS).random((2, pb, mb)) < 0.5
    want = int(ei.interpret(c, Sel=torch.from_numpy(sel), P=P, M=M, BS=BS, W=W).sum())
    monkeypatch.setattr(pr, "cumulative", lambda *a: pytest.fail("counted row by row"))
    assert ei.counts(c, dict(H=2, P=P, M=M, PB=pb, MB=mb, BS=BS, W=W, Sel=sel)).einsum("S").points == want


def test_a_block_mask_at_a_million_tokens_is_counted_without_torch():
    """moba's Sel[b,h,p // BS,m // BS] and m <= p: 2 x 244^2 boxes, where rows would be 2e6 x 245
    segments; exact (full blocks below the diagonal, the diagonal blocks' triangles). The time is the
    process's CPU time, so a loaded machine running other tests beside it does not fail it."""
    code = ("import sys, time, numpy as np, einsum_ir as ei\n"
            "n, bs = 10**6, 4096\n"
            "nb = -(-n // bs)\n"
            "sel = np.random.default_rng(0).random((1, 2, nb, nb)) < 0.3\n"
            "start = time.process_time()\n"
            "r = ei.counts(ei.variants.load('moba'), dict(B=1, H=2, P=n, M=n, E=1, F=1, PB=nb, MB=nb, BS=bs, Sel=sel))\n"
            "took = time.process_time() - start\n"
            "size = lambda i: min(bs, n - i * bs)\n"
            "want = sum(int(sel[0, h, i, j]) * (size(i) * size(j) if j < i else size(i) * (size(i) + 1) // 2)\n"
            "           for h in range(2) for i in range(nb) for j in range(i + 1))\n"
            "print(r.einsum('S').points == want, 'torch' in sys.modules, took < 5)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False", "True"]


def test_a_tensor_of_the_wrong_shape_is_refused():
    import numpy as np

    c = ei.variants.load("moba")
    with pytest.raises(ValueError, match=r"tensor Sel\[b,h,pb,mb\] has shape \(1, 2, 4, 3\), but the shapes give "
                                         r"\(1, 2, 4, 4\)"):
        ei.counts(c, dict(B=1, H=2, P=256, M=256, E=8, F=8, PB=4, MB=4, BS=64, Sel=np.ones((1, 2, 4, 3), bool)))


@pytest.mark.parametrize("value, message", [
    (1e30, "param W=1e+30: an int param takes an integer that fits in int64"),
    (2 ** 63, "param W=9223372036854775808: an int param takes an integer that fits in int64"),
    (2.5, "param W=2.5: declared int, so it takes an integer"),
    (float("nan"), "param W=nan: an int param takes a finite number"),
])
def test_counts_check_runtime_params_as_every_backend_binds_them(value, message):
    c = ei.variants.load("softmax_window")
    with pytest.raises(ei.BindError, match="^" + message.replace("+", r"\+").replace(".", r"\.")):
        ei.counts(c, dict(B=1, H=2, P=64, M=64, E=16, F=16, W=value))
