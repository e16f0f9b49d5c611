"""A new attention variant from its paper, in a few lines: length-scaled Softplus attention.

Gao & Spratling, 2025, "Softplus Attention with Re-weighting Boosts Length Extrapolation in
Large Language Models" (arXiv 2501.13428): replace softmax's exp by Softplus, normalize by the
l1 norm, and scale the scores by log(E) * log(M) / sqrt(E). Softplus is positive, so no max
shift is needed: the cascade is one pass plus a deferred division, where softmax needs three.

    python examples/custom_variant.py
"""
import math

import torch

import einsum_ir as ei
from einsum_ir.codegen.torch_op import run

SPEC = """
# Length-scaled Softplus attention (Gao & Spratling, 2025)
dims B H P M E F
param lscale = log(E) * log(M) / sqrt(E)
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e]
A[b,h,p,m]  = softplus(S[b,h,p,m] * lscale)
AD[b,h,p]   = A[b,h,p,m]
AV[b,h,p,f] = A[b,h,p,m] * V[b,h,m,f]
O[b,h,p,f]  = AV[b,h,p,f] / AD[b,h,p]
output O
"""
softplus = ei.parse(SPEC)
softmax = ei.variants.load("softmax")
print(f"passes over M: softplus {ei.passes(softplus).count}, softmax {ei.passes(softmax).count}")
print(ei.passes(softplus).explanation)

# The same formula in plain PyTorch, to check the cascade against.
q, k, v = (torch.randn(2, 4, 32, 16, dtype=torch.float64) for _ in range(3))
e, m = q.shape[-1], k.shape[-2]
weights = torch.nn.functional.softplus(q @ k.transpose(-1, -2) * math.log(e) * math.log(m) / math.sqrt(e))
expected = (weights / weights.sum(-1, keepdim=True)) @ v
out = ei.compile(softplus)(Q=q, K=k, V=v)
print(f"max |cascade - PyTorch| = {(out - expected).abs().max():.2e}")

# In a model: the cascade as a torch custom op, differentiable and torch.compile-friendly.
q.requires_grad_()
run(softplus, Q=q, K=k, V=v).sum().backward()
print(f"gradient through the custom op: |dQ| = {q.grad.norm():.3f}")
