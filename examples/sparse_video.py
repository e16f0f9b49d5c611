"""Neighborhood attention on images and video: simulate the speedup its sparsity can buy at
real sizes, then run it at a small size.

Generalized Neighborhood Attention (Hassani et al., 2025) keeps, per axis, the keys in a window
around each query (with a stride). The specs (the catalog's nbhd_2d, examples/specs/nbhd_3d.ein)
state the window as `nbhd(...)` predicates, so the simulator reads the sparsity straight from them.

    python examples/sparse_video.py
"""
from pathlib import Path

import torch

import einsum_ir as ei
from einsum_ir.variants.formulas import gna_window

SPECS = Path(__file__).parent / "specs"

# Simulate: a 128 x 128 image with 32 x 32 windows; a 16 x 32 x 32 video with 8 x 16 x 16.
image = ei.variants.load("nbhd_2d")
shapes = {"B": 1, "H": 16, "PX": 128, "PY": 128, "MX": 128, "MY": 128, "E": 128, "F": 128,
          "WX": 32, "WY": 32, "SX": 8, "SY": 8}
r = ei.simulate(image, shapes, device="h100", q_tile={"PX": 16, "PY": 8}, kv_tile={"MX": 16, "MY": 4})
print(f"2-D: tile speedup {r.tile_speedup:.2f}x, FLOP speedup {r.flop_speedup:.2f}x, "
      f"estimated {r.estimated_speedup:.2f}x")

video = ei.load(SPECS / "nbhd_3d.ein")
shapes = {"B": 1, "H": 16, "PT": 16, "PX": 32, "PY": 32, "MT": 16, "MX": 32, "MY": 32, "E": 128,
          "F": 128, "WT": 8, "WX": 16, "WY": 16, "ST": 4, "SX": 8, "SY": 8}
r = ei.simulate(video, shapes, device="h100", q_tile={"PT": 2, "PX": 8, "PY": 8},
                kv_tile={"MT": 2, "MX": 4, "MY": 8})
print(f"3-D: tile speedup {r.tile_speedup:.2f}x, FLOP speedup {r.flop_speedup:.2f}x, "
      f"estimated {r.estimated_speedup:.2f}x")

# Run the 3-D cascade on a 4 x 6 x 6 video and check it against dense attention with the mask.
t, x, y, e = 4, 6, 6, 8
window, stride = {"WT": 3, "WX": 3, "WY": 3}, {"ST": 1, "SX": 2, "SY": 1}
q, k, v = (torch.randn(1, 2, t, x, y, e) for _ in range(3))
out = ei.compile(video)(Q=q, K=k, V=v, **window, **stride)

axes = [(t, "T"), (x, "X"), (y, "Y")]
keep = torch.ones(t * x * y, t * x * y, dtype=torch.bool)
grids = torch.meshgrid(*(torch.arange(n) for n, _ in axes), indexing="ij")
for (n, name), pos in zip(axes, grids):
    pos = pos.reshape(-1)
    keep &= gna_window(n, window["W" + name], stride["S" + name])[pos[:, None], pos[None, :]]
dense = torch.nn.functional.scaled_dot_product_attention(
    q.reshape(1, 2, -1, e), k.reshape(1, 2, -1, e), v.reshape(1, 2, -1, e), attn_mask=keep)
print(f"3-D run: output {tuple(out.shape)}, {keep.float().mean():.0%} of the pairs attended, "
      f"max |cascade - masked SDPA| = {(out.reshape(dense.shape) - dense).abs().max():.2e}")
