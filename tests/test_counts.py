"""Op, byte and present-point counts, exact and symbolic where possible."""
import sympy
import torch

import einsum_ir as ei

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
