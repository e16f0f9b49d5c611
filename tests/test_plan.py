"""Kernel plans: stages, Einsum classes, online maxima, and block skipping derived from predicates
(checked exhaustively against the predicate on small grids of tiles)."""
import math

import pytest
import torch

import einsum_ir as ei
from einsum_ir.functions import nbhd_window_start
from einsum_ir.lowering.masks import skip_plan
from einsum_ir.lowering.plan import build_plan


def kinds(name):
    plan = build_plan(ei.variants.load(name))
    return plan, {t: k for s in plan.stages for t, k in s.kind.items()}


def test_softmax_classes_and_online_rescale():
    plan, k = kinds("softmax")
    (s,) = plan.stages
    assert (s.stream, s.query, s.grid, s.features) == (("m",), ("p",), ("b", "h"), ("e", "f"))
    assert k == {"S": "stream", "GM": "carried", "SN": "stream", "SD": "carried", "O_num": "carried",
                 "O": "epilogue"}
    assert s.online == ["GM"]
    assert str(s.rescale["SD"]) == "exp(G_GM - G_GM_new)" and s.rescale["O_num"] == s.rescale["SD"]
    print(plan.summary())


def test_gqa_packs_the_group_into_the_query_tile():
    from einsum_ir.codegen.kernel import choose_tiles

    plan, _ = kinds("softmax_gqa")
    s = plan.stages[0]
    assert s.grid == ("b", "g") and s.query == ("r", "p")  # K/V indexed by g only
    tiles = choose_tiles(s, {"B": 1, "G": 2, "R": 4, "P": 4096, "M": 4096, "E": 64, "F": 64}, "gpu")
    assert (tiles["BLOCK_Q_r"], tiles["BLOCK_Q_p"]) == (4, 32)


def test_agent_attention_is_two_stages_with_a_materialized_intermediate():
    plan, k = kinds("agent_attention")
    a, b = plan.stages
    assert (a.stream, a.query) == (("m",), ("n",)) and (b.stream, b.query) == (("n",), ("p",))
    assert plan.intermediates == ["AV"] and "AV" in a.stores and "AV" in b.loads


def test_moh_sums_heads_atomically_in_the_epilogue():
    plan, k = kinds("moh")
    assert plan.stages[0].grid_reduce == {"O"} and k["OH"] == "epilogue"


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
    assert plan.stages[0].kind == {"QS": "prologue", "KN": "key_side", "S": "stream", "A": "stream",
                                   "O": "carried"}


@pytest.mark.parametrize("name,reason", [
    ("linear_elu", "no query-key score contraction"),
    ("softmax_1pass", "recurrences"),
])
def test_lowering_errors_say_why(name, reason):
    with pytest.raises(ei.LoweringError, match=reason):
        build_plan(ei.variants.load(name))


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


# --------------------------------------------------------------------------- block skipping


class _TL:
    maximum = staticmethod(max)
    minimum = staticmethod(min)

    @staticmethod
    def where(c, a, b):
        return a if c else b

    @staticmethod
    def cdiv(a, b):
        return -(-a // b)


def _start(q, L, w, s):
    return int(nbhd_window_start(torch.tensor(q), L, w, s))


def _check(pred_text, params, P=37, M=41, BQ=8, BK=8):
    """Every tile with a present point is visited; a tile called full is fully present."""
    c = ei.parse(f"""dims P M E
param W: int
param NS: int
param ST: int
input Q[p,e], K[m,e]
S[p,m] = Q[p,e] * K[m,e] where {pred_text}
output S
""")
    pred = c.einsums[0].where
    plan = skip_plan(pred, "p", "m")
    truth = ei.interpret(ei.parse(f"""dims P M
param W: int
param NS: int
param ST: int
input X[p,m]
T[p,m] = X[p,m] where {pred_text}
output T
"""), X=torch.ones(P, M), **params) != 0
    env = {"tl": _TL, "_nbhd_start": _start, "KEYS_m": M, "M": M, "P": P, **params}
    visited_total = 0
    for qt in range(math.ceil(P / BQ)):
        q_lo, q_hi = qt * BQ, min(qt * BQ + BQ, P) - 1
        env.update(q_lo_p=q_lo, q_hi_p=q_hi)
        tiles = set()
        for box in plan.ranges or [{}]:
            lo, hi = box.get("m", ("0", "KEYS_m"))
            lo_v, hi_v = max(eval(lo, env), 0), min(eval(hi, env), M)
            tiles |= set(range(lo_v // BK, max(-(-hi_v // BK), lo_v // BK)))
        for kt in range(math.ceil(M / BK)):
            k_lo, k_hi = kt * BK, kt * BK + BK - 1
            block = truth[q_lo:q_hi + 1, k_lo:k_hi + 1]
            if block.any():
                assert kt in tiles, (pred_text, qt, kt)
            full = plan.full == "True" or (plan.full != "False" and eval(plan.full, {**env, "k_lo_m": k_lo, "k_hi_m": k_hi}))
            if full and k_hi < M:
                assert block.all(), (pred_text, qt, kt)
        visited_total += len(tiles)
    return plan, visited_total


@pytest.mark.parametrize("pred,params", [
    ("m <= p", {}),
    ("m <= p and p - m < W", {"W": 11}),
    ("m <= p + M - P", {}),
    ("m <= p and (m < NS or p - m < W)", {"NS": 3, "W": 9}),
    ("nbhd(p, m, M, W, ST)", {"W": 9, "ST": 3}),
    ("nbhd(p, m, M, W, ST)", {"W": 16, "ST": 16}),
    ("m >= p - 2 and m <= p + 2", {}),
    ("2 * m <= p", {}),
])
def test_skipping_is_exact_and_saves_tiles(pred, params):
    params = {"W": 1, "NS": 1, "ST": 1, **params}
    plan, visited = _check(pred, params)
    assert plan.ranges, "an affine predicate must bound the key loop"
    assert visited < math.ceil(37 / 8) * math.ceil(41 / 8)


def test_sinks_window_gives_two_ranges():
    plan = skip_plan(ei.variants.load("sinks_window").einsums[0].where, "p", "m")
    assert len(plan.ranges) == 2 and plan.full != "False"


def test_2d_neighborhood_bounds_each_key_rank():
    plan = build_plan(ei.variants.load("nbhd_2d"))
    sk = plan.stages[0].skip
    assert len(sk.ranges) == 1 and set(sk.ranges[0]) == {"mx", "my"}
    assert not sk.tensor_test and "_nbhd_start(q_hi_px" in sk.full


def test_tensor_masks_use_an_in_kernel_block_test():
    plan = build_plan(ei.variants.load("moba"))
    sk = plan.stages[0].skip
    assert sk.tensor_test and sk.block_list and sk.full == "False"
    assert len(sk.ranges) == 1  # the causal part still bounds the tiles the list kernel scans


def test_dense_stage_masks_only_the_last_tile():
    sk = build_plan(ei.variants.load("softmax")).stages[0].skip
    assert sk.ranges == [] and sk.full == "True"
