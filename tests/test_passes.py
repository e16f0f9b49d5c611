"""FuseMax pass counts (DESIGN section 5) read from the cascade alone."""
import pytest

import einsum_ir as ei

SOFTMAX = ei.variants.source("softmax")


def test_cascade4_has_three_passes_with_two_boundaries():
    r = ei.passes(ei.variants.load("softmax"))
    assert r.count == 3
    assert [(b.producer, b.consumer) for b in r.boundaries] == [("GM", "SN"), ("SD", "A")]
    assert [b.after for b in r.boundaries] == [2, 3]
    assert "GM" in r.explanation and "pass 3" in r.explanation


def test_deferred_division_merges_passes_2_and_3():
    one_einsum = SOFTMAX.replace("A[b,h,p,m]  = SN[b,h,p,m] / SD[b,h,p]\n", "").replace(
        "O[b,h,p,f]  = A[b,h,p,m] * V[b,h,m,f]", "O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]")
    r = ei.passes(ei.parse(one_einsum))
    assert r.count == 2
    assert any("deferred" in n for n in r.notes)
    two_einsums = SOFTMAX.replace("A[b,h,p,m]  = SN[b,h,p,m] / SD[b,h,p]\n", "SNV[b,h,p,f] = SN[b,h,p,m] * V[b,h,m,f]\n").replace(
        "O[b,h,p,f]  = A[b,h,p,m] * V[b,h,m,f]", "O[b,h,p,f]  = SNV[b,h,p,f] / SD[b,h,p]")
    assert ei.passes(ei.parse(two_einsums)).count == 2


def test_division_inside_a_nonlinear_function_is_not_deferred():
    text = SOFTMAX.replace("A[b,h,p,m]  = SN[b,h,p,m] / SD[b,h,p]\n", "").replace(
        "O[b,h,p,f]  = A[b,h,p,m] * V[b,h,m,f]", "O[b,h,p,f]  = exp(SN[b,h,p,m] / SD[b,h,p]) * V[b,h,m,f]")
    assert ei.passes(ei.parse(text)).count == 3


def test_cascade5_is_one_pass():
    r = ei.passes(ei.variants.load("softmax_1pass"))
    assert r.count == 1 and not r.boundaries
    assert r.assignment["AV"] == 0  # the epilogue reads the final step: in no traversal of M
    assert r.assignment["RNV"] == 1


def test_noncausal_linear_attention_is_one_pass():
    c = ei.parse("""dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
FQ[b,h,p,e] = elu(Q[b,h,p,e]) + 1
FK[b,h,m,e] = elu(K[b,h,m,e]) + 1
KV[b,h,e,f] = FK[b,h,m,e] * V[b,h,m,f]
Z[b,h,e]    = FK[b,h,m,e]
N[b,h,p,f]  = FQ[b,h,p,e] * KV[b,h,e,f]
D[b,h,p]    = FQ[b,h,p,e] * Z[b,h,e]
O[b,h,p,f]  = N[b,h,p,f] / D[b,h,p]
output O""")
    r = ei.passes(c)
    assert r.count == 1
    assert r.assignment["FQ"] == 0  # no traversal of M


def test_passes_over_another_rank():
    # Over P every Einsum is a single traversal: no reduction over P is read back.
    assert ei.passes(ei.variants.load("softmax"), rank="P").count == 1


@pytest.mark.parametrize("name", ei.variants.names())
def test_every_catalog_variant_gets_an_answer(name):
    r = ei.passes(ei.variants.load(name))
    assert 1 <= r.count <= 4
    # every step up has a boundary (two parallel chains, differential attention's, give two each)
    assert {b.after for b in r.boundaries} == set(range(2, r.count + 1))
    assert str(r).startswith("Passes over")


def test_multi_dimensional_key_layout_counts_all_key_ranks():
    r = ei.passes(ei.variants.load("nbhd_2d"))
    assert r.ranks == ("MX", "MY") and r.count == 2
