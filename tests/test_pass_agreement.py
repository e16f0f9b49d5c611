"""One analysis (issue 14, item 5): the passes `ei.passes` counts are the passes the lowered
plan runs. A key-loop plan runs one traversal of the key rank per stage that streams it; the
pass analysis of the cascade's 1-pass form (lowering.online.online, which starts from the key
loop's own rewrites, lowering.online.prepare) must count the same. Checked on every catalog
cascade with a key loop and on generated ones (the union fuzzer's and the differential
fuzzer's cascades)."""
import pytest

import einsum_ir as ei
from einsum_ir.errors import LoweringError
from einsum_ir.lowering.chunked_scan import ScanPlan
from einsum_ir.lowering.online import online
from einsum_ir.lowering.strategy import choose, key_loop_plan
from test_differential import MAPS, TEMPLATE, _draw, masked_cases, map_cases
from test_union import fuzz_cases, union_spec


def _check(c) -> None:
    try:
        plan = key_loop_plan(c)
    except LoweringError as err:
        chosen, _ = choose(c)
        assert chosen is None or isinstance(chosen, ScanPlan), err
        pytest.skip(f"no key loop: {err}")
    ranks = {s.stream for s in plan.stages}
    for stream in ranks:
        rank = ",".join(v.upper() for v in stream)
        if len(stream) > 1:  # the 1-pass form partitions one key rank
            with pytest.raises(LoweringError, match=f"no rank {rank} to partition"):
                online(c, rank, rank + "0")
            assert plan.passes(rank) == 1
            continue
        assert plan.passes(rank) == ei.passes(online(c, rank, rank + "0"), rank=rank).count, plan.summary()


@pytest.mark.parametrize("name", ei.variants.names())
def test_catalog_plans_run_the_passes_the_analysis_counts(name):
    _check(ei.variants.load(name))


def _backward(name: str) -> list:
    try:
        return list(ei.grad(ei.variants.load(name)).backward)
    except LoweringError:
        return []


@pytest.mark.parametrize("name", [n for n in ei.variants.names() if _backward(n)])
def test_catalog_backward_plans_run_the_passes_the_analysis_counts(name):
    for b in _backward(name):  # streams the queries under a key tile: passes over P
        _check(b)


@pytest.mark.parametrize("case", [([t for t, _ in preds], nested) for preds, nested, _, _ in fuzz_cases(12, seed=5)],
                         ids=lambda case: " | ".join(case[0]))
def test_fuzzed_unions_run_the_passes_the_analysis_counts(case):
    _check(ei.parse(union_spec(*case)))


@pytest.mark.parametrize("case", _draw(masked_cases, 10, 11) + _draw(map_cases, 10, 12), ids=str)
def test_fuzzed_masks_and_maps_run_the_passes_the_analysis_counts(case):
    if case[0] == "masked":
        text = TEMPLATE.format(predicate=case[1])
    else:
        _, predicate, score, weight, normalizer, _ = case
        text = MAPS.format(predicate=predicate, score=score, weight=weight, normalizer=normalizer)
    _check(ei.parse(text))


def test_a_sum_of_normalized_terms_is_deferred_term_by_term():
    r = ei.passes(ei.variants.load("diff_attn"))  # O = (E1/D1 - lam*E2/D2) * V
    assert r.count == 2 and r.assignment["O"] == 2
    assert [(b.producer, b.consumer) for b in r.boundaries] == [("G1", "E1"), ("G2", "E2")]
    assert key_loop_plan(ei.variants.load("diff_attn")).passes("M") == 1


def test_a_division_inside_a_term_that_varies_along_the_rank_is_not_deferred():
    text = ei.variants.source("diff_attn").replace("lam * E2[b,h,p,m] / D2[b,h,p]", "exp(E2[b,h,p,m] / D2[b,h,p])")
    r = ei.passes(ei.parse(text))
    assert r.count == 3 and r.boundaries[-1].producer == "D2"


def test_an_epilogue_einsum_is_outside_every_pass():
    r = ei.passes(ei.variants.load("softmax_lse"))
    assert r.assignment["LSE"] == 0 and r.count == 2
    assert "outside (no traversal of M): LSE" in str(r)
