"""Quickstart: write a variant, see what it costs, simulate its sparsity, compile it, run it.

    python examples/quickstart.py

Runs on CPU in a few seconds; on a CUDA machine `ei.compile` runs the generated Triton kernel.
"""
import torch

import einsum_ir as ei

# 1. A spec: sliding-window causal softmax attention (DESIGN section 3). W is given at call time.
SPEC = """
dims B H P M E F
param scale = 1/sqrt(E)
param W: int
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale where m <= p and p - m < W
GM[b,h,p]   = max[m] S[b,h,p,m]
SN[b,h,p,m] = exp(S[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m]
O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]
output O
"""
cascade = ei.parse(SPEC)
print(cascade)  # back to spec text

# 2. Analyze: FuseMax passes over the keys, then a roofline bound at a real size.
shapes = {"B": 1, "H": 32, "P": 8192, "M": 8192, "E": 128, "F": 128, "W": 1024}
passes = ei.passes(cascade, rank="M")
print(f"passes over M: {passes.count}")
print(ei.roofline(cascade, shapes, device="h100"))

# 3. Simulate: how much of the key loop the window lets a tiled kernel skip.
sim = ei.simulate(cascade, shapes, device="h100", q_tile={"P": 128}, kv_tile={"M": 64})
print(f"tile speedup {sim.tile_speedup:.2f}x, FLOP speedup {sim.flop_speedup:.2f}x, "
      f"estimated {sim.estimated_speedup:.2f}x")

# 4. Compile and run at a small size; compare with the reference interpreter.
kernel = ei.compile(cascade)
q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
out = kernel(Q=q, K=k, V=v, W=16)
ref = ei.interpret(cascade, Q=q, K=k, V=v, W=16)
print(f"output {tuple(out.shape)}, max |kernel - interpreter| = {(out - ref).abs().max():.2e}")
