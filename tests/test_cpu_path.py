"""The tiled CPU path (codegen/cpu_emit.py): every catalog variant the plan accepts runs as
generated tiled PyTorch and matches the reference interpreter, including fully masked rows;
memory stays O(N) (no P x M intermediate); whole key tiles are skipped from the predicates."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import einsum_ir as ei
from einsum_ir.codegen.cpu_emit import CpuKernel, compile_cpu
from einsum_ir.variants import formulas
from support import CAUSAL_SOFTMAX_LSE, NOT_FUSED, assert_outputs_close

NOT_LOWERED = NOT_FUSED  # name -> why (the linear forms lower as chunked scans)
LOWERED = [n for n in ei.variants.names() if n not in NOT_LOWERED]
SIZES = ["small", "rect", "tall"]


def test_catalog_split_is_complete():
    assert set(LOWERED) | set(NOT_LOWERED) == set(ei.variants.names())
    for name, why in NOT_LOWERED.items():
        with pytest.raises(ei.LoweringError, match=why):
            compile_cpu(ei.variants.load(name))


# Tiny tiles so that every size has several query and key tiles, ragged last tiles, full and
# partial tiles; (1, 1) puts every point in its own tile.
@pytest.mark.parametrize("tiles", [(4, 3), (1, 1)], ids=["q4s3", "q1s1"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", LOWERED)
def test_matches_interpreter(name, size, tiles):
    c = ei.variants.load(name)
    kern = compile_cpu(c, block_q=tiles[0], block_s=tiles[1])
    args = formulas.example_args(name, size)
    assert_outputs_close(kern(**args), ei.interpret(c, **args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["softmax_causal_bottom_right", "softmax_window", "moba", "softmax_lse"])
def test_fully_masked_rows_take_the_fill(name):
    c = ei.variants.load(name)
    args = formulas.example_args(name, "tall")
    if name == "softmax_lse":  # no predicate: mask nothing; check the LSE output is finite
        out, lse = compile_cpu(c, 4, 3)(**args)
        assert torch.isfinite(lse).all()
        return
    ref = ei.interpret(c, **args)
    out = compile_cpu(c, 4, 3)(**args)
    empty = (ref == 0).all(-1)
    assert empty.any(), "the example has no fully masked row"
    assert (out[empty] == 0).all() and not torch.isnan(out).any()


def test_lse_fill_is_minus_inf_on_empty_rows():
    text = ei.variants.source("softmax_lse").replace(
        "S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale", "S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale where m <= p + M - P")
    c = ei.parse(text)
    q, k, v = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 3)
    out, lse = compile_cpu(c, 2, 2)(Q=q, K=k, V=v)
    ref_out, ref_lse = ei.interpret(c, Q=q, K=k, V=v)
    assert torch.isinf(lse[:, :, :4]).all() and (lse[:, :, :4] < 0).all()
    assert_outputs_close((out, lse), (ref_out, ref_lse), atol=1e-5, rtol=1e-5)


def test_float64_and_bf16_inputs():
    c = ei.variants.load("softmax_causal")
    args = formulas.example_args("softmax_causal", "rect", dtype=torch.float64)
    out = compile_cpu(c, 2, 3)(**args)
    assert out.dtype == torch.float64
    assert_outputs_close(out, ei.interpret(c, **args), atol=1e-12, rtol=1e-12)
    args = formulas.example_args("softmax_causal", "rect", dtype=torch.bfloat16)
    out = compile_cpu(c, 2, 3)(**args)
    assert out.dtype == torch.bfloat16
    assert_outputs_close(out, ei.interpret(c, **args), atol=1e-2, rtol=1e-2)


class _Largest(TorchDispatchMode):
    """Records the largest tensor any torch op produces (elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", ["softmax", "softmax_causal", "softplus_l1", "alibi"])
def test_memory_is_linear_in_sequence_length(name):
    B, H, N, D = 1, 2, 1024, 16
    c = ei.variants.load(name)
    g = torch.Generator().manual_seed(0)
    args = {"Q": torch.randn(B, H, N, D, generator=g), "K": torch.randn(B, H, N, D, generator=g),
            "V": torch.randn(B, H, N, D, generator=g)}
    if name == "alibi":
        args["Slope"] = torch.rand(H, generator=g)
    kern = compile_cpu(c, block_q=128, block_s=64)
    with _Largest() as mode:
        out = kern(**args)
    # the biggest temporary is one score tile (B*H*128*64), far below one P x M matrix
    assert mode.largest <= max(B * H * 128 * 64, B * H * N * D)
    assert mode.largest * 16 <= B * H * N * N
    assert_outputs_close(out, ei.interpret(c, **args), atol=1e-4, rtol=1e-4)
    # and the interpreter, for contrast, does build the P x M scores
    with _Largest() as ref:
        ei.interpret(c, **args)
    assert ref.largest >= B * H * N * N


def _tiles(name, N, block, **params):
    c = ei.variants.load(name)
    kern = compile_cpu(c, block_q=block, block_s=block)
    x = torch.randn(1, 1, N, 8)
    kern(Q=x, K=x, V=x, **params)
    return kern.last_stats


def test_causal_skips_tiles_above_the_diagonal():
    n = 16  # tiles per side
    dense = _tiles("softmax", 32 * n, 32)
    causal = _tiles("softmax_causal", 32 * n, 32)
    assert dense == {"full": n * n, "partial": 0, "empty": 0}
    # the keys every query of a tile sees run unmasked (up to and including the tile's first
    # query: at most one tile more than the lower triangle), one masked tile per diagonal,
    # nothing above it visited
    assert causal["partial"] == n and causal["empty"] == 0
    assert n * (n - 1) // 2 <= causal["full"] <= n * (n + 1) // 2


def test_window_visits_a_band():
    n, W = 16, 64
    st = _tiles("softmax_window", 32 * n, 32, W=W)
    visited = st["full"] + st["partial"]
    assert visited <= n * (W // 32 + 2)
    assert st["empty"] == 0


def test_block_sparse_mask_skips_empty_tiles():
    c = ei.variants.load("moba")
    N, BS = 64, 8
    sel = torch.zeros(1, 1, N // BS, N // BS, dtype=torch.bool)
    sel[..., torch.arange(N // BS), torch.arange(N // BS)] = True  # own block only
    x = torch.randn(1, 1, N, 4)
    kern = compile_cpu(c, block_q=BS, block_s=BS)
    out = kern(Q=x, K=x, V=x, Sel=sel, BS=BS)
    st = kern.last_stats
    # causal bounds leave the lower triangle; the selection empties all but the diagonal
    assert st["full"] + st["partial"] + st["empty"] == (N // BS) * (N // BS + 1) // 2
    assert st["partial"] == N // BS and st["full"] == 0  # the diagonal tiles, each a triangle
    assert_outputs_close(out, ei.interpret(c, Q=x, K=x, V=x, Sel=sel, BS=BS), atol=1e-5, rtol=1e-5)


def test_source_is_readable_python():
    kern = compile_cpu(ei.variants.load("softmax_causal"))
    src = kern.source({"B": 1, "H": 8, "P": 2048, "M": 2048, "E": 64, "F": 64})
    assert "BLOCK_Q=" in src.splitlines()[0]
    assert "S[b,h,p,m]" in src  # the cascade in the header comment
    assert "def stage0(" in src and "for k_lo_m, k_hi_m, _masked in _key_tiles(" in src
    # the first key tile's values start the accumulators: no fill, no rescale of zeros
    assert "GM = SD = O_num = None" in src and "GM_new = S.amax(3) if GM is None else torch.maximum(GM" in src
    assert "alpha = None if GM is None else torch.exp2((GM - GM_use))" in src
    assert "SD = SN.sum(3) if SD is None else SD.mul_(alpha).add_(SN.sum(3))" in src
    assert "if GM is None:  # no key tile" in src  # rows no tile visits are filled after the loop
    # a score tile takes -inf where it is absent once (a bias of the mask's shape), then becomes
    # its exponential in place, in a buffer the key tiles share
    assert ".add_(S_bias)" in src and "S.sub_(" in src and ".exp2_()" in src and "out=_scratch(" in src
    compile(src, "<test>", "exec")
    assert isinstance(kern, CpuKernel) and kern.backend == "cpu"


def test_bind_errors_name_the_problem():
    kern = compile_cpu(ei.variants.load("softmax_window"))
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ei.BindError, match="missing param W"):
        kern(Q=q, K=q, V=q)
    with pytest.raises(ei.BindError, match="rank M"):
        kern(Q=q, K=torch.randn(1, 1, 5, 2), V=q, W=2)


def test_same_numbers_as_formula_at_moderate_size():
    name = "softmax_window"
    c = ei.variants.load(name)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 300, 16, generator=g) for _ in range(3))
    out = compile_cpu(c, 64, 48)(Q=q, K=k, V=v, W=37)
    ref = formulas.FORMULAS[name](Q=q, K=k, V=v, W=37)
    assert math.isfinite(float(out.abs().max()))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_a_new_variant_needs_no_new_python():
    # dilated causal attention: a predicate the skipping plan cannot bound (`%`) -> every visited
    # tile is masked, and tiles with no present point are skipped at run time
    c = ei.parse("""
dims B H P M E F
param scale = 1/sqrt(E)
param D: int
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale where m <= p and (p - m) % D == 0
GM[b,h,p]   = max[m] S[b,h,p,m]
SN[b,h,p,m] = exp(S[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m]
O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]
output O
""")
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 3, 37, 8, generator=g), torch.randn(2, 3, 29, 8, generator=g), torch.randn(2, 3, 29, 5, generator=g)
    kern = compile_cpu(c, 8, 4)
    assert_outputs_close(kern(Q=q, K=k, V=v, D=3), ei.interpret(c, Q=q, K=k, V=v, D=3), atol=1e-5, rtol=1e-5)
    assert kern.last_stats["full"] == 0
    kern = compile_cpu(c, 1, 1)  # one point per tile: two thirds of the visited tiles are empty
    assert_outputs_close(kern(Q=q, K=k, V=v, D=3), ei.interpret(c, Q=q, K=k, V=v, D=3), atol=1e-5, rtol=1e-5)
    assert kern.last_stats["empty"] > kern.last_stats["partial"] // 2


# --------------------------------------------------------------------------- signs of carried terms
# Carried sums whose terms have mixed signs, or are all negative: the division deferral gives one
# numerator per term, scalars (-1 included) fold into the matrix products, and the online
# rescale must apply to each numerator whatever its sign.

SIGNED_HEAD = """dims B H P M E F
param scale = 1/sqrt(E)
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f], U[b,h,m,f]
S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale where m <= p
"""
SIGNED_SOFTMAX = SIGNED_HEAD + """GM[b,h,p]   = max[m] S[b,h,p,m]
SN[b,h,p,m] = exp(S[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m]
"""
SIGNED = {
    "sn_v_minus_sn_u": SIGNED_SOFTMAX + "O[b,h,p,f] = (SN[b,h,p,m] * V[b,h,m,f] - SN[b,h,p,m] * U[b,h,m,f]) "
                                        "/ SD[b,h,p]\noutput O\n",
    "normalized_terms_minus": SIGNED_SOFTMAX + "O[b,h,p,f] = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p] - "
                                               "SN[b,h,p,m] * U[b,h,m,f] / SD[b,h,p]\noutput O\n",
    "all_negative": SIGNED_SOFTMAX + "O[b,h,p,f] = -(SN[b,h,p,m] * V[b,h,m,f]) / SD[b,h,p]\noutput O\n",
    "all_negative_two_terms": SIGNED_SOFTMAX + "O[b,h,p,f] = (-(SN[b,h,p,m] * V[b,h,m,f]) - SN[b,h,p,m] * U[b,h,m,f]) "
                                               "/ SD[b,h,p]\noutput O\n",
    "mixed_sign_denominator": SIGNED_SOFTMAX.replace("SD[b,h,p]   = SN[b,h,p,m]",
                                                     "SD[b,h,p]   = 2 * SN[b,h,p,m] - SN[b,h,p,m] * 0.5")
                              + "O[b,h,p,f] = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]\noutput O\n",
    # a row sum of a difference of maps, and a difference of weighted values, with no max at all
    "row_sum_a_minus_c": SIGNED_HEAD + """A[b,h,p,m] = sigmoid(S[b,h,p,m])
C[b,h,p,m] = softplus(S[b,h,p,m])
X[b,h,p]   = A[b,h,p,m] - C[b,h,p,m]
O[b,h,p,f] = A[b,h,p,m] * V[b,h,m,f] - C[b,h,p,m] * U[b,h,m,f]
output O, X
""",
    "row_sum_all_negative": SIGNED_HEAD + """A[b,h,p,m] = sigmoid(S[b,h,p,m])
C[b,h,p,m] = softplus(S[b,h,p,m])
X[b,h,p]   = -A[b,h,p,m] - C[b,h,p,m]
O[b,h,p,f] = -(A[b,h,p,m] * V[b,h,m,f])
output O, X
""",
}
# carried sums each cascade must keep (so the terms are summed in the key loop, not after it)
SIGNED_CARRIED = {"sn_v_minus_sn_u": {"SD", "O_num0", "O_num1"}, "normalized_terms_minus": {"SD", "O_num0", "O_num1"},
                  "all_negative": {"SD", "O_num"}, "mixed_sign_denominator": {"SD", "O_num"},
                  "all_negative_two_terms": {"SD", "O_num0", "O_num1"},
                  "row_sum_a_minus_c": {"X", "O"}, "row_sum_all_negative": {"X", "O"}}


def _signed_args(dtype, P=21, M=17):
    g = torch.Generator().manual_seed(5)
    return {n: torch.randn(2, 2, P if n == "Q" else M, 8 if n in "QK" else 5, generator=g).to(dtype) for n in "QKVU"}


@pytest.mark.parametrize("tiles", [(4, 3), (1, 1), None], ids=["q4s3", "q1s1", "default"])
@pytest.mark.parametrize("name", SIGNED)
def test_carried_sums_of_mixed_and_negative_terms_match_interpreter(name, tiles):
    c = ei.parse(SIGNED[name])
    kern = compile_cpu(c) if tiles is None else compile_cpu(c, *tiles)
    assert isinstance(kern, CpuKernel)  # the fused CPU path (compile_cpu raises where it has none)
    carried = {e.name for e in kern.plan.stages[0].of_kind("carried")}
    assert SIGNED_CARRIED[name] <= carried, carried
    args = _signed_args(torch.float32)
    assert_outputs_close(kern(**args), ei.interpret(c, **args), atol=1e-5, rtol=1e-5)
    if tiles != (1, 1):  # one point per tile: no tile is partly present
        assert kern.last_stats["partial"] > 0  # the causal diagonal ran masked


@pytest.mark.parametrize("name", SIGNED)
def test_gradients_of_mixed_and_negative_terms_match_autograd(name):
    """The fused CPU backward of the same cascades, in fp64, against autograd through the interpreter.
    `mixed_sign_denominator` once lost its fused backward (a factor of 1.0 was not taken for 1);
    `row_sum_all_negative` once multiplied a broadcast row gradient in place."""
    c = ei.parse(SIGNED[name])
    args = _signed_args(torch.float64, P=11, M=9)
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    outs = compile_cpu(c, 4, 3)(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert all(type(o.grad_fn).__name__ == "_FusedBackward" for o in outs)
    seeds = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
             for i, o in enumerate(outs)]
    got = torch.autograd.grad(outs, list(leaves.values()), seeds, allow_unused=True)
    ref = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    want_outs = ei.interpret(c, **ref)
    want = torch.autograd.grad(want_outs if isinstance(want_outs, tuple) else (want_outs,), list(ref.values()), seeds,
                               allow_unused=True)
    for k, gk, wk in zip(leaves, got, want):  # an input nothing reads (U in all_negative): zero
        gk, wk = (torch.zeros_like(args[k]) if t is None else t for t in (gk, wk))
        torch.testing.assert_close(gk, wk, atol=1e-10, rtol=1e-9, msg=lambda t: f"{name}, d{k}: {t}")


def test_cpu_backward_of_a_row_sum_output():
    """An output that sums a map of the scores over the keys: its gradient reaches every key as a
    broadcast row, a view that must not be updated in place."""
    c = ei.parse("""dims B H P M E
input Q[b,h,p,e], K[b,h,m,e]
S[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e]
A[b,h,p,m] = sigmoid(S[b,h,p,m])
X[b,h,p]   = A[b,h,p,m]
output X
""")
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(2))
    dq, dk = torch.autograd.grad(compile_cpu(c)(Q=q, K=k).sum(), [q, k])
    rq, rk = torch.autograd.grad(ei.interpret(c, Q=q, K=k).sum(), [q, k])
    torch.testing.assert_close((dq, dk), (rq, rk))


def test_a_guarded_copy_of_an_input_is_never_updated_in_place():
    """`B2 = Bias where m <= p` is a view of the input's tile; the score built from it must not
    add into it (that once changed the caller's Bias)."""
    c = ei.parse("""dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e], Bias[b,h,p,m], V[b,h,m,f]
S0[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e]
B2[b,h,p,m] = Bias[b,h,p,m] where m <= p
S[b,h,p,m]  = B2[b,h,p,m] + S0[b,h,p,m]
A[b,h,p,m]  = sigmoid(S[b,h,p,m])
O[b,h,p,f]  = A[b,h,p,m] * V[b,h,m,f]
output O
""")
    g = torch.Generator().manual_seed(0)
    args = {d.name: torch.randn([9 if i in "pm" else 2 if i in "bh" else 4 for i in d.indices], generator=g,
                                dtype=torch.float64) for d in c.inputs}
    kept = {n: t.clone() for n, t in args.items()}
    out = compile_cpu(c, 4, 3)(**args)
    for n in args:
        assert torch.equal(args[n], kept[n]), f"{n} was changed"
    torch.testing.assert_close(out, ei.interpret(c, **kept))


def test_the_key_tile_shrinks_with_small_outputs_unless_one_is_asked_for():
    """A score tile holds at most a quarter of the outputs' elements (or 2**16, down to 128
    keys), so the tile does not set the peak memory of a short sequence; an explicit BLOCK_S is
    kept."""
    from einsum_ir.codegen.cpu_emit import DEFAULT_BLOCK_S, MIN_BLOCK_S

    c = ei.variants.load("softmax_causal")
    shapes = lambda n: dict(B=1, H=8, P=n, M=n, E=64, F=64)  # noqa: E731
    kern = compile_cpu(c)
    tiles = [kern.key_tile(shapes(n)) for n in (64, 2048, 4096, 8192, 65536)]
    assert tiles == [MIN_BLOCK_S, 256, 512, DEFAULT_BLOCK_S, DEFAULT_BLOCK_S]
    assert compile_cpu(c, block_s=96).key_tile(shapes(8192)) == 96


def test_a_decode_step_takes_larger_key_tiles_unless_it_copies_pages():
    """A decode step's score tile has a few query rows (GQA's 4 heads of one query), so its
    floor of 2**16 elements gives 256 keys per tile for 64 (batch, head) programs, not the
    128 of the outputs' rule; a paged cache's tile copies B x G x E floats per key, which caps
    the copy at 2**20 elements (128 keys at B=8, G=8, E=128), and a single sequence's copy is
    small (the score tile's 640)."""
    from einsum_ir.codegen.cpu_emit import DEFAULT_BLOCK_S

    decode = dict(G=8, R=4, P=1, M=4096, E=128, F=128)
    gqa = compile_cpu(ei.variants.load("softmax_gqa"))
    assert gqa.key_tile(gqa.spelled.args(dict(B=8, **decode))) == 256
    paged = compile_cpu(ei.variants.load("paged_decode"))
    pages = dict(N=2048, T=16, J=256)
    assert paged.key_tile(paged.spelled.args(dict(B=8, **decode, **pages))) == 128
    assert paged.key_tile(paged.spelled.args(dict(B=1, **decode, **pages))) == DEFAULT_BLOCK_S


# causal softmax beside VS, a sum over the keys whose full-tile term is constant along the queries
CONSTANT_ALONG_QUERIES = CAUSAL_SOFTMAX_LSE.replace(
    "LSE[b,h,p]  = GM[b,h,p] + log(SD[b,h,p])\noutput O, LSE fill -inf",
    "VS[b,h,p,f] = V[b,h,m,f] where m <= p\noutput O, VS")


@pytest.mark.parametrize("block_s", [3, 64])
def test_the_first_key_tile_starts_each_accumulator_in_its_own_shape(block_s):
    """The first key tile's values start the accumulators. A full tile's VS term does not vary
    along the query rows, so its first value is broadcast into a full accumulator; the outputs
    match the interpreter over one key tile and over many."""
    c = ei.parse(CONSTANT_ALONG_QUERIES)
    kern = compile_cpu(c, block_q=4, block_s=block_s)
    src = kern.source()
    assert "VS = torch.full((B, H, _n_p, F), 0.0, dtype=DT).add_((V_j.sum(2))[:, :, None]) if VS is None" in src
    assert "SD = SN.sum(3) if SD is None" in src
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 2, 10, 8, generator=g) for _ in range(3))
    for got, want in zip(kern(Q=q, K=k, V=v), ei.interpret(c, Q=q, K=k, V=v)):
        assert_outputs_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_sum_whose_terms_count_different_points_is_refused_not_miscounted():
    """Deferring SD out of O's sum would split it into sum_m SN*V and sum_m 1 (VS's term is
    constant along m): the second counts every key where the sum has m <= p. The division
    stays undeferred, so the plan refuses the cascade (the interpreter still runs it)."""
    c = ei.parse(CONSTANT_ALONG_QUERIES.replace("O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]",
                                                "O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p] + VS[b,h,p,f]"))
    with pytest.raises(ei.LoweringError, match="the division could not be deferred"):
        compile_cpu(c)
