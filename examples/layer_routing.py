"""Layer routing: each layer of a model picks one of two catalog kernels, full causal attention
or a sliding window, so the sparse layers cost less and the full ones keep long-range reads.

Two ways to pick. MASFormer (Zhang et al., 2023, "Efficient Long-Range Transformers: You Need to
Attend More, but Not Necessarily at Every Layer") fixes the choice per layer: full attention in
a few layers, a window in the rest. Flux Attention (2025, "Flux Attention: Context-Aware Hybrid
Attention for Efficient LLMs Inference") decides per input: a small router reads the layer's
input and sends the whole layer to full or sparse attention. The routing is a choice between
kernels, not one kernel: both are compiled once and called per layer; nothing in the cascades
changes. (Per-head spans inside one layer are the catalog's masformer_heads.)

    python examples/layer_routing.py
"""
import torch

import einsum_ir as ei

B, H, P, E, LAYERS, WINDOW = 1, 2, 48, 16, 4, 8
full = ei.variants.load("softmax_causal")
window = ei.variants.load("softmax_window")
kernels = {"full": ei.compile(full), "window": ei.compile(window)}

# What a window layer saves at a long context, read from the predicates (no run needed).
shapes = {"B": 1, "H": 16, "P": 16384, "M": 16384, "E": 128, "F": 128, "W": 1024}
r = ei.simulate(window, shapes, device="h100", q_tile={"P": 128}, kv_tile={"M": 64})
print(f"window layer at 16k tokens, W=1024: FLOP speedup {r.flop_speedup:.1f}x over dense, "
      f"tile speedup {r.tile_speedup:.1f}x")

gen = torch.Generator().manual_seed(0)
proj = [torch.randn(3, E, E, generator=gen) / E ** 0.5 for _ in range(LAYERS)]
router = torch.randn(E, generator=gen)  # the Flux-style router: one linear score per layer input


def reference(q, k, v, route):
    """Plain PyTorch: causal SDPA, restricted to the last WINDOW keys on window layers."""
    i, j = torch.arange(P)[:, None], torch.arange(P)[None, :]
    keep = (j <= i) & ((i - j < WINDOW) if route == "window" else True)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def run(x, choose):
    """A toy stack (projections, attention, residual): each layer's route comes from `choose`."""
    routes, worst = [], 0.0
    for layer, (wq, wk, wv) in enumerate(proj):
        q, k, v = x @ wq, x @ wk, x @ wv
        route = choose(layer, x)
        args = {"Q": q, "K": k, "V": v} | ({"W": WINDOW} if route == "window" else {})
        out = kernels[route](**args)
        worst = max(worst, (out - reference(q, k, v, route)).abs().max().item())
        x = x + out
        routes.append(route)
    return routes, worst


x0 = torch.randn(B, H, P, E, generator=gen)
static = lambda layer, x: "full" if layer in (0, LAYERS - 1) else "window"          # MASFormer
dynamic = lambda layer, x: "full" if float(x.mean(dim=(0, 1, 2)) @ router) > 0 else "window"  # Flux
for name, choose in (("static (MASFormer)", static), ("routed per input (Flux)", dynamic)):
    routes, err = run(x0, choose)
    print(f"{name}: layers routed {', '.join(routes)}; max |kernel - SDPA| = {err:.2e}")
