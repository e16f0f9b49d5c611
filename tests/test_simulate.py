"""Tile simulator: classes against brute force, speedup bounds, scale."""
import time

import pytest
import numpy as np
import torch

import einsum_ir as ei
from einsum_ir.cost_model.simulate import FULL, PARTIAL, SKIPPED, plot_tile_map

ONE_D = """dims B H P M E F
param scale = 1/sqrt(E)
{params}
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale where {pred}
GM[b,h,p]   = max[m] S[b,h,p,m]
SN[b,h,p,m] = exp(S[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m]
O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]
output O"""


def _mask_1d(pred, params, **sizes):
    """Brute force through the reference interpreter's predicate semantics."""
    decl = "\n".join(f"param {p}: int" for p in params)
    c = ei.parse(f"dims P M\n{decl}\nS[p,m] = 1 where {pred}\noutput S")
    return ei.interpret(c, **sizes).bool()


def _classes(mask, qt, kt):
    """Per (Q tile, KV tile): FULL / PARTIAL / SKIPPED, by enumerating every point."""
    P, M = mask.shape
    out = torch.empty(-(-P // qt), -(-M // kt), dtype=torch.int8)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            block = mask[i * qt:(i + 1) * qt, j * kt:(j + 1) * kt]
            out[i, j] = FULL if block.all() else SKIPPED if not block.any() else PARTIAL
    return out


CASES = [
    ("m <= p", [], dict(P=100, M=100), 16, 8),
    ("m <= p + M - P", [], dict(P=50, M=90), 8, 16),  # bottom-right causal
    ("m <= p and p - m < W", ["W"], dict(P=97, M=97, W=20), 16, 16),
    ("m <= p and (m < NS or p - m < W)", ["NS", "W"], dict(P=80, M=80, NS=4, W=9), 8, 8),
    ("nbhd(p, m, M, W, S)", ["W", "S"], dict(P=120, M=120, W=21, S=1), 16, 8),
    ("nbhd(p, m, M, W, S)", ["W", "S"], dict(P=120, M=120, W=32, S=16), 16, 16),
    ("nbhd(p, m, M, W, S, D)", ["W", "S", "D"], dict(P=96, M=96, W=10, S=2, D=3), 8, 8),  # dilation
    ("p // 8 == m // 8 or m < 4", [], dict(P=64, M=64), 8, 4),
]


@pytest.mark.parametrize("pred,params,sizes,qt,kt", CASES)
def test_tile_classes_match_brute_force(pred, params, sizes, qt, kt):
    decl = "\n".join(f"param {p}: int" for p in params)
    c = ei.parse(ONE_D.format(params=decl, pred=pred))
    shapes = dict(B=1, H=2, E=8, F=8, **sizes)
    r = ei.simulate(c, shapes, q_tile={"P": qt}, kv_tile={"M": kt})
    mask = _mask_1d(pred, params, **sizes)
    assert torch.equal(r.classes, _classes(mask, qt, kt))
    assert r.present == mask.sum().item()


def test_2d_neighborhood_classes_match_brute_force():
    from einsum_ir.variants.formulas import gna_window

    c = ei.variants.load("nbhd_2d")
    L, W, S = (24, 20), (7, 9), (2, 3)
    r = ei.simulate(c, dict(B=1, H=1, E=4, F=4, PX=L[0], PY=L[1], MX=L[0], MY=L[1], WX=W[0], WY=W[1], SX=S[0], SY=S[1]),
                    q_tile={"PX": 4, "PY": 8}, kv_tile={"MX": 8, "MY": 4})
    ax = [gna_window(n, w, s) for n, w, s in zip(L, W, S)]
    mask = (ax[0][:, None, :, None] & ax[1][None, :, None, :])  # px, py, mx, my
    want = torch.empty(r.classes.shape, dtype=torch.int8)
    for qx in range(6):
        for qy in range(3):
            for kx in range(3):
                for ky in range(5):
                    blk = mask[qx * 4:(qx + 1) * 4, qy * 8:(qy + 1) * 8, kx * 8:(kx + 1) * 8, ky * 4:(ky + 1) * 4]
                    want[qx * 3 + qy, kx * 5 + ky] = FULL if blk.all() else SKIPPED if not blk.any() else PARTIAL
    assert torch.equal(r.classes, want)


def _nbhd1d(window, stride, n=4096):
    c = ei.variants.load("nbhd_1d")
    return ei.simulate(c, dict(B=1, H=4, P=n, M=n, E=64, F=64, W=window, ST=stride), q_tile={"P": 64}, kv_tile={"M": 64})


def test_blocked_attention_is_perfectly_block_sparse():
    r = _nbhd1d(512, 512)  # stride == window, tile-aligned: blocked attention
    assert r.tile_speedup == pytest.approx(r.flop_speedup) == pytest.approx(8.0)
    assert int((r.classes == PARTIAL).sum()) == 0


def test_sliding_window_tile_speedup_is_below_flop_speedup():
    r = _nbhd1d(410, 1)  # ~90% sparse sliding window
    assert r.flop_speedup == pytest.approx(4096 / 410)
    assert r.tile_speedup < r.flop_speedup
    assert 1.0 < r.estimated_speedup < r.flop_speedup


def test_causal_speedups():
    r = ei.simulate(ei.variants.load("softmax_causal"), dict(B=1, H=64, P=2048, M=2048, E=64, F=64))
    assert r.tile_speedup == 1.0  # the last Q tile visits every KV tile
    assert r.flop_speedup == pytest.approx(2048 * 2048 / (2048 * 2049 / 2))
    assert 1.0 < r.estimated_speedup < 2.0  # many waves: the short CTAs fill in around the long ones
    one_wave = ei.simulate(ei.variants.load("softmax_causal"), dict(B=1, H=2, P=2048, M=2048, E=64, F=64))
    assert one_wave.estimated_speedup == pytest.approx(1.0)  # 32 CTAs, one wave: the longest decides
    assert r.visits(0) == {"full": [], "partial": [0, 1], "skipped": list(range(2, 32))}


def test_3d_layout_scales():
    c = ei.load("examples/specs/nbhd_3d.ein")
    shapes = dict(B=1, H=16, PT=30, PX=48, PY=80, MT=30, MX=48, MY=80, E=128, F=128,
                  WT=18, WX=24, WY=24, ST=1, SX=1, SY=1)
    start = time.perf_counter()
    r = ei.simulate(c, shapes, q_tile={"PT": 4, "PX": 8, "PY": 8}, kv_tile={"MT": 2, "MX": 8, "MY": 8})
    assert time.perf_counter() - start < 2.0
    assert r.classes.shape == (8 * 6 * 10, 15 * 6 * 10)
    assert r.flop_speedup == pytest.approx(30 * 48 * 80 / (18 * 24 * 24))
    assert r.tile_speedup < r.flop_speedup


def test_tensor_mask_needs_data():
    from einsum_ir.errors import TensorValuesNeeded

    with pytest.raises(TensorValuesNeeded, match="shapes={'Sel': tensor}") as err:
        ei.simulate(ei.variants.load("moba"), dict(B=1, H=1, P=64, M=64, E=4, F=4, PB=4, MB=4, BS=16))
    assert err.value.tensor == "Sel"


def test_plot_tile_map(tmp_path):
    pytest.importorskip("matplotlib")
    r = _nbhd1d(256, 1, n=1024)
    plot_tile_map(r, tmp_path / "map.png")
    assert (tmp_path / "map.png").stat().st_size > 1000


def test_tensor_driven_block_mask_matches_brute_force():
    c = ei.variants.load("moba")
    g = torch.Generator().manual_seed(0)
    sel = torch.rand(1, 2, 8, 8, generator=g) < 0.4
    shapes = dict(B=1, H=2, P=128, M=128, E=4, F=4, PB=8, MB=8, BS=16, Sel=sel)
    r = ei.simulate(c, shapes, q_tile={"P": 32}, kv_tile={"M": 16})
    p, m = torch.arange(128).view(-1, 1), torch.arange(128).view(1, -1)
    for h in range(2):  # the mask reads h: each head's Q tiles are rows of their own
        mask = sel[0, h][p // 16, m // 16] & (m <= p)
        assert torch.equal(r.classes[h * 4:(h + 1) * 4], _classes(mask, 32, 16))


def test_large_block_diagonal_is_counted_by_segments_not_points():
    from einsum_ir.cost_model import predicates as pr

    c = ei.parse(ONE_D.format(params="", pred="p // 128 == m // 128 or m < 64"))
    n = 1 << 14  # 2.7e8 points: beyond what the dense fallback may enumerate
    env = pr.Env({"p": np.arange(4).reshape(-1, 1)}, {"M": n}, {}, {})
    assert pr.breakpoints(pr.conjuncts(c.einsums[0].where), "m", n, env) is not None
    start = time.perf_counter()
    r = ei.counts(c, dict(B=1, H=1, P=n, M=n, E=1, F=1))
    assert time.perf_counter() - start < 3.0
    blocks = n // 128
    assert r.einsum("S").points == blocks * 128 * 128 + n * 64 - 128 * 64  # the first block overlaps m < 64


def test_cli_simulate_with_plot(capsys, tmp_path):
    import argparse

    from einsum_ir.cost_model.cli import add_commands

    parser = argparse.ArgumentParser(prog="einsum-ir")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["simulate", "nbhd_2d", "--shapes", "B=1,H=1,PX=64,PY=64,MX=64,MY=64,E=32,F=32",
                              "--params", "WX=16,WY=16,SX=16,SY=16", "--q-tile", "PX=16,PY=16",
                              "--kv-tile", "MX=16,MY=8", "--plot", str(tmp_path / "m.png")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "tile_speedup               16.000" in out and "flop_speedup               16.000" in out
    assert (tmp_path / "m.png").exists()
