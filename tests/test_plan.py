"""Kernel plans: stages, Einsum classes, online maxima, and block skipping derived from predicates
(checked exhaustively against the predicate on small grids of tiles)."""
import math

import pytest
import torch

import einsum_ir as ei
from einsum_ir.lowering import build_plan
from einsum_ir.lowering.strategy import key_loop_plan
from einsum_ir.lowering.keyranges import key_loop
from einsum_ir.lowering.symbolic import block, evaluate, query_hi, query_lo, symbol


def kinds(name):
    plan = build_plan(ei.variants.load(name))
    return plan, {t: k for s in plan.stages for t, k in s.kinds.items()}


def test_softmax_classes_and_online_rescale():
    plan, k = kinds("softmax")
    (s,) = plan.stages
    assert (s.stream, s.query, s.grid, s.features) == (("m",), ("p",), ("b", "h"), ("e", "f"))
    assert k == {"S": "stream", "GM": "carried", "SN": "stream", "SD": "carried", "O_num": "carried",
                 "O": "epilogue"}
    assert s.online == ("GM",)
    # base-2 scores: the running max rescales by exp2 of its change
    assert str(s.rescale["SD"]) == "2**(G_GM - G_GM_new)" and s.rescale["O_num"] == s.rescale["SD"]
    assert plan.rewrites == ("division deferral", "base-2 scores") and plan.strategy
    print(plan.summary())


def test_gqa_packs_the_group_into_the_query_tile():
    from einsum_ir.codegen.tiles import choose_tiles

    plan, _ = kinds("softmax_gqa")
    s = plan.stages[0]
    assert s.grid == ("b", "g") and s.query == ("r", "p")  # K/V indexed by g only
    tiles = choose_tiles(s, {"B": 1, "G": 2, "R": 4, "P": 4096, "M": 4096, "E": 64, "F": 64}, "gpu")
    assert (tiles["BLOCK_Q_r"], tiles["BLOCK_Q_p"]) == (4, 32)


def test_agent_attention_is_two_stages_with_a_materialized_intermediate():
    plan, k = kinds("agent_attention")
    a, b = plan.stages
    assert (a.stream, a.query) == (("m",), ("n",)) and (b.stream, b.query) == (("n",), ("p",))
    assert plan.intermediates == ("AV",) and "AV" in a.stores and "AV" in b.loads


def test_moh_sums_heads_atomically_in_the_epilogue():
    plan, k = kinds("moh")
    assert plan.stages[0].atomic == {"O"} and k["OH"] == "epilogue"


def test_prologue_and_key_side_classes():
    c = ei.parse("""dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
QS[b,h,p,e] = Q[b,h,p,e] * 2
KN[b,h,m,e] = K[b,h,m,e] * K[b,h,m,e]
S[b,h,p,m] = QS[b,h,p,e] * KN[b,h,m,e]
A[b,h,p,m] = sigmoid(S[b,h,p,m])
O[b,h,p,f] = A[b,h,p,m] * V[b,h,m,f]
output O
""")
    plan = build_plan(c)
    assert plan.stages[0].kinds == {"QS": "prologue", "KN": "key_side", "S": "stream", "A": "stream",
                                    "O": "carried"}


def test_the_key_loop_says_why_it_does_not_stream_linear_states():
    with pytest.raises(ei.LoweringError, match="no query-key score contraction"):
        key_loop_plan(ei.variants.load("linear_elu"))


def test_a_max_not_under_exp_has_no_online_form():
    c = ei.parse("""dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e]
GM[b,h,p] = max[m] S[b,h,p,m]
SN[b,h,p,m] = sigmoid(S[b,h,p,m] - GM[b,h,p])
O[b,h,p,f] = SN[b,h,p,m] * V[b,h,m,f]
output O
""")
    with pytest.raises(ei.LoweringError, match="online rewrite does not apply"):
        build_plan(c)


# --------------------------------------------------------------------------- key segments


def _segments(kl, tiled: bool, env: dict):
    """[(masked, [(var, lo, hi)])] with the segment bounds evaluated for one query tile."""
    defs = kl.key_defs + (kl.tile_defs if tiled else ())
    values = evaluate(defs, {symbol(k): v for k, v in env.items()}, lambda s: env[s.name])
    segs = kl.tile_segments if tiled else kl.key_segments
    return [(seg.masked, [(v, int(lo.xreplace(values)), int(hi.xreplace(values))) for v, lo, hi in seg.box])
            for seg in segs]


def _check(pred_text, params, P=37, M=41, BQ=8, BK=8):
    """Every present point lies in exactly one visited tile; a tile (or key) in a full segment is
    present for every query of the tile and inside the keys' extent."""
    c = ei.parse(f"""dims P M E
param W: int
param NS: int
param ST: int
input Q[p,e], K[m,e]
S[p,m] = Q[p,e] * K[m,e] where {pred_text}
output S
""")
    kl = key_loop(c.einsums[0].where, ("p",), ("m",), c.dims)
    truth = ei.interpret(ei.parse(f"""dims P M
param W: int
param NS: int
param ST: int
input X[p,m]
T[p,m] = X[p,m] where {pred_text}
output T
"""), X=torch.ones(P, M), **params) != 0
    visited_total = 0
    for qt in range(math.ceil(P / BQ)):
        q_lo, q_hi = qt * BQ, min(qt * BQ + BQ, P) - 1
        env = {"M": M, "P": P, "BLOCK_S": BK, "q_lo_p": q_lo, "q_hi_p": q_hi, **params}
        rows = truth[q_lo:q_hi + 1]
        for tiled, unit in ((True, BK), (False, 1)):
            seen = torch.zeros(M, dtype=torch.int64)
            for masked, [(_, lo, hi)] in _segments(kl, tiled, env):
                keys = slice(lo * unit, min(hi * unit, M)) if hi > lo else slice(0, 0)
                seen[keys] += 1
                if not masked:
                    assert hi * unit <= M and bool(rows[:, keys].all()), (pred_text, qt, tiled)
                    assert tiled or True
            present = rows.any(0)
            assert bool((seen[present] == 1).all()), (pred_text, qt, tiled)  # visited, once
            assert int(seen.max()) <= 1, (pred_text, qt, tiled)
            if tiled:
                visited_total += int(seen.sum()) // BK
    return kl, visited_total


@pytest.mark.parametrize("pred,params", [
    ("m <= p", {}),
    ("m <= p and p - m < W", {"W": 11}),
    ("m <= p + M - P", {}),
    ("m <= p and (m < NS or p - m < W)", {"NS": 3, "W": 9}),
    ("m <= p and (m < NS or p - m < W)", {"NS": 20, "W": 4}),
    ("nbhd(p, m, M, W, ST)", {"W": 9, "ST": 3}),
    ("nbhd(p, m, M, W, ST)", {"W": 16, "ST": 16}),
    ("m >= p - 2 and m <= p + 2", {}),
    ("2 * m <= p", {}),
    ("m < NS or m > p + W", {"NS": 5, "W": 3}),
])
def test_segments_cover_every_present_point_once(pred, params):
    params = {"W": 1, "NS": 1, "ST": 1, **params}
    kl, visited = _check(pred, params)
    assert any(not s.masked for s in kl.tile_segments), "a bounded predicate has a full interior"
    assert visited < math.ceil(37 / 8) * math.ceil(41 / 8)


def test_sinks_window_visits_two_ranges_in_order():
    kl = build_plan(ei.variants.load("sinks_window")).stages[0].loop
    assert [s.masked for s in kl.tile_segments] == [False, True, True, False, True]


def test_2d_neighborhood_segments_are_a_full_box_and_its_rim():
    kl = build_plan(ei.variants.load("nbhd_2d")).stages[0].loop
    assert [s.masked for s in kl.tile_segments] == [False, True, True, True, True]
    assert all({v for v, _, _ in s.box} == {"mx", "my"} for s in kl.tile_segments)
    assert not kl.block_list and kl.exact


def test_tensor_masks_use_a_block_list():
    kl = build_plan(ei.variants.load("moba")).stages[0].loop
    assert kl.block_list and not kl.exact and len(kl.tile_segments) == 1  # the causal part bounds the scan
    assert kl.heavy_last


def test_dense_stage_masks_only_the_last_tile():
    kl = build_plan(ei.variants.load("softmax")).stages[0].loop
    assert [s.masked for s in kl.tile_segments] == [False, True] and not kl.heavy_last


def test_absent_points_hold_one_sentinel():
    for name, where, value in [("softmax_causal", "S", -math.inf), ("softcap", "S", -math.inf),
                               # scaled per row (lowering.underflow): -inf for the max and the weights
                               ("softplus_l1", "XA", -math.inf), ("lightning_causal", "D", 0.0)]:
        s = key_loop_plan(ei.variants.load(name)).stages[0]
        assert s.sentinels[where][0] == value, (name, s.sentinels)


def test_no_sentinel_when_absent_points_could_be_infinite():
    c = ei.parse("""dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] where m <= p
GM[b,h,p] = max[m] S[b,h,p,m]
SD[b,h,p] = S[b,h,p,m]
O[b,h,p] = GM[b,h,p] + SD[b,h,p]
output O
""")
    s = build_plan(c).stages[0]
    assert s.sentinels is None  # the max needs -inf where the sum needs 0: masks instead
    q, k = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 7, 4)
    args = dict(Q=q, K=k, V=torch.randn(1, 2, 7, 3))
    from einsum_ir.codegen.cpu_emit import compile_cpu
    torch.testing.assert_close(compile_cpu(c, 4, 3)(**args), ei.interpret(c, **args))


def test_derived_facts_are_computed_once_per_cascade():
    from unittest import mock

    import einsum_ir.graph as graph

    real, calls = graph.dependency_graph, []
    # a cascade no other test plans, so that no plan remembered in this process answers for it
    c = ei.variants.load("softmax_causal").replace(doc="planned once, here")
    with mock.patch.object(graph, "dependency_graph", lambda c: calls.append(c) or real(c)):
        plan = build_plan(c)
    assert len(calls) == 1 + len(plan.rewrites)  # the cascade as written, then once per rewrite


# --------------------------------------------------------------------------- stream choice and the backward


def test_forward_streams_the_keys_under_a_query_tile():
    (s,) = build_plan(ei.variants.load("softmax_causal")).stages
    assert s.stream == ("m",) and s.query == ("p",)
    assert s.kind("GM") == "carried" and s.kind("O_num") == "carried" and s.kind("O") == "epilogue"
    assert "tile_sum" not in s.kinds.values()  # only a backward adds into another program's tile


def test_backward_streams_the_queries_and_sums_dq_tile_by_tile():
    """dK and dV keep the keys, dQ the queries: the backward streams the side fewer outputs keep
    (p), so dK and dV are carried sums of a key-tile program and dQ a `tile_sum`."""
    g = ei.grad(ei.variants.load("softmax_causal"))
    (s,) = build_plan(g.backward[0]).stages
    assert s.stream == ("p",) and s.query == ("m",)
    assert s.kind(g.grads["Q"]) == "tile_sum"
    assert s.kind(g.grads["K"]) == "carried" and s.kind(g.grads["V"]) == "carried"
    assert [e.name for e in s.of_kind("tile_sum")] == ["dQ"]
    assert s.summed_across_programs == {"dQ"}  # added into by every key-tile program, from 0
    assert "tile_sum  dQ" in s.summary()


# A `where` on a carried reduction only: the scores are dense, the denominator (and in the second
# form the numerator too) sums the causal part. Nothing about the key loop can come from the
# scores' predicate (there is none); the carried sums must still drop m > p.
CARRIED_WHERE = """dims B H P M E F
param scale = 1/sqrt(E)
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale
GM[b,h,p]   = max[m] S[b,h,p,m]
SN[b,h,p,m] = exp(S[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m] where m <= p
O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]{o_where}
output O
"""


@pytest.mark.parametrize("tiles", [None, (4, 3), (1, 1)], ids=["default", "q4s3", "q1s1"])
@pytest.mark.parametrize("o_where", ["", " where m <= p"], ids=["sd_only", "sd_and_o"])
def test_a_where_on_a_carried_reduction_alone_still_masks(o_where, tiles):
    from einsum_ir.codegen.cpu_emit import compile_cpu

    c = ei.parse(CARRIED_WHERE.format(o_where=o_where))
    assert c.einsum("S").where is None and c.einsum("SD").where is not None
    g = torch.Generator().manual_seed(4)
    args = dict(Q=torch.randn(2, 2, 13, 4, generator=g), K=torch.randn(2, 2, 11, 4, generator=g),
                V=torch.randn(2, 2, 11, 3, generator=g))
    want = ei.interpret(c, **args)
    dense = ei.interpret(ei.parse(CARRIED_WHERE.format(o_where="").replace(" where m <= p", "")), **args)
    assert float((want - dense).abs().max()) > 1e-2  # the mask changes the answer
    kern = ei.compile(c, backend="cpu") if tiles is None else compile_cpu(c, *tiles)
    torch.testing.assert_close(kern(**args), want, atol=1e-5, rtol=1e-5)


def test_an_opaque_predicate_on_both_token_ranks_masks_every_backward_tile():
    """nbhd_2d's backward streams (px, py) under a (mx, my) key tile; seen from a key, its
    predicate is opaque (docs/backward.md), so every visited tile is a masked one, and the
    gradients are still exact."""
    from einsum_ir.codegen.cpu_emit import compile_cpu
    from support import make_inputs

    c = ei.variants.load("nbhd_2d")
    (b,) = ei.grad(c).backward
    (s,) = build_plan(b).stages
    assert s.stream == ("px", "py") and s.query == ("mx", "my")
    assert "0 of them unmasked" in s.summary()
    assert all(seg.masked for seg in s.loop.tile_segments) and all(seg.masked for seg in s.loop.key_segments)
    args = make_inputs("nbhd_2d", c, dtype=torch.float64)
    leaves = {k: (v.clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    kern = compile_cpu(c, 4, 3)  # small tiles: many (query tile, key tile) pairs
    out = kern(**leaves)
    assert type(out.grad_fn).__name__ == "_FusedBackward"
    seed = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    names = [k for k, v in leaves.items() if isinstance(v, torch.Tensor)]
    got = torch.autograd.grad(out, [leaves[k] for k in names], seed)
    stats = kern.training.backward[0].last_stats  # the backward kernel's run
    assert stats["full"] == 0 and stats["partial"] > 1, stats
    ref = {k: (v.clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    want = torch.autograd.grad(ei.interpret(c, **ref), [ref[k] for k in names], seed)
    for k, gk, wk in zip(names, got, want):
        torch.testing.assert_close(gk, wk, atol=1e-10, rtol=1e-9, msg=lambda t: f"d{k}: {t}")


@pytest.mark.parametrize("pred,params", [
    ("p // W == m // W", {"W": 16}),
    ("m <= p and p // W == m // W", {"W": 16}),
    ("(p + ST) // W == (m + NS) // W", {"W": 16, "ST": 5, "NS": 2}),
    ("m // 16 == (p + 3) // 16 and m < p + NS", {"NS": 4}),
])
def test_group_predicates_bound_the_key_loop(pred, params):
    params = {"W": 1, "NS": 1, "ST": 1, **params}
    kl, visited = _check(pred, params)
    assert "interval" in kl.describe() and not kl.block_list
    assert any(not s.masked for s in kl.tile_segments), "a query tile inside one group sees full key tiles"
    assert visited <= math.ceil(37 / 8) * 3  # at most a group and a tile on either side per query tile


def test_a_group_shifted_per_head_bounds_the_block_list():
    c = ei.parse("""dims B H P M E F
param G: int
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] where (p + (2*h // H) * (G // 2)) // G == (m + (2*h // H) * (G // 2)) // G
O[b,h,p,f]  = S[b,h,p,m] * V[b,h,m,f]
output O
""")
    loop = key_loop_plan(c).stages[0].loop
    assert loop.block_list and loop.atoms == (("affine", "affine", "opaque"),)  # |m - p| < G, then per tile


@pytest.mark.parametrize("pred", ["m // W < NS", "m // W <= NS", "m // W > NS", "m // W >= NS", "NS > m // W",
                                  "p // W >= m // 4", "m // W < NS and m <= p"])
@pytest.mark.parametrize("params", [{"W": 4, "NS": 3}, {"W": 5, "NS": 0}, {"W": 1, "NS": 7}])
def test_a_quotient_of_the_key_bounds_the_key_loop(pred, params):
    """`m // W < NS` holds exactly where m < NS*W (floor(y) < x for an integer x is y < x): a
    paged cache's table extent `m // T < J` bounds the loop like any affine atom; a quotient
    compared with one over the query stays opaque (a block list)."""
    kl, _ = _check(pred, {"ST": 1, **params})
    if "p //" in pred:
        assert kl.block_list
    else:
        assert kl.exact and not kl.block_list
