"""Independent plain-PyTorch formulas for every catalog variant: the test oracle.

Each formula takes the same keyword arguments as `ei.interpret` on that variant (tensors by
input name, runtime params, tile sizes, which it ignores) and returns what the cascade
returns: one tensor, or a tuple in `output` order. The formulas are written the way a
PyTorch user would write the variant (dense boolean masks, `scaled_dot_product_attention`,
`logsumexp`, cumulative sums), never through einsum_ir, so agreement is evidence and not an
echo. Rows with no visible key follow the catalog's fill semantics: 0 for outputs, -inf for
a log-sum-exp.

`example_args(name, size)` builds the interpreter's keyword arguments at a few small shape
sets: "small" (P = M), "rect" (P < M, sizes not powers of two) and "tall" (P > M, which
leaves fully masked rows for bottom-right causal, windowed and block-sparse variants).
`self_check(name)` runs the interpreter against the formula and returns the max abs error.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as tfn
from torch import Tensor

SIZES: dict[str, dict[str, int]] = {
    "small": dict(B=1, H=2, P=8, M=8, E=8, F=4),
    "rect": dict(B=2, H=3, P=5, M=11, E=6, F=5),
    "tall": dict(B=1, H=2, P=13, M=6, E=4, F=3),
}

# ------------------------------------------------------------------------------- helpers


def _scores(q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """q[..., p, e] k[..., m, e] -> [..., p, m], scaled by 1/sqrt(e) unless told otherwise."""
    s = q @ k.transpose(-1, -2)
    return s * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)


def _softmax_rows(s: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Row softmax of `s` over its last dim, restricted to `mask`, and the row log-sum-exp.

    A row with no visible key has probabilities 0 (so its output is 0) and LSE -inf.
    """
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    alive = torch.isfinite(lse)[..., None]
    probs = torch.where(alive, torch.exp(s - lse[..., None]), torch.zeros((), dtype=s.dtype))
    return probs, lse


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    probs, _ = _softmax_rows(_scores(q, k), mask)
    return probs @ v


def _positions(p: int, m: int) -> tuple[Tensor, Tensor]:
    """Query and key positions as a [p, 1] and a [1, m] grid."""
    return torch.arange(p)[:, None], torch.arange(m)[None, :]


def _causal(p: int, m: int, offset: int = 0) -> Tensor:
    """Key j visible to query i when j <= i + offset (offset M - P: bottom-right aligned)."""
    return torch.ones(p, m, dtype=torch.bool).tril(diagonal=offset)


def gna_window(length: int, window: int, stride: int) -> Tensor:
    """[L, L] mask of the GNA neighborhood (DESIGN section 5), one query at a time."""
    left = window // 2
    right = window // 2 + window % 2 - 1
    mask = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        leader = min((i // stride) * stride + stride // 2, length - 1)
        start = max(leader - left, 0)
        if leader + right >= length:
            start += length - right - leader - 1
        mask[i, start:start + window] = True
    return mask


# ------------------------------------------------------------------------------- formulas


def softmax(Q: Tensor, K: Tensor, V: Tensor, **_: object) -> Tensor:
    return tfn.scaled_dot_product_attention(Q, K, V)


def softmax_causal(Q: Tensor, K: Tensor, V: Tensor, **_: object) -> Tensor:
    return _attend(Q, K, V, _causal(Q.shape[-2], K.shape[-2]))


def softmax_causal_bottom_right(Q: Tensor, K: Tensor, V: Tensor, **_: object) -> Tensor:
    p, m = Q.shape[-2], K.shape[-2]
    return _attend(Q, K, V, _causal(p, m, offset=m - p))


def softmax_window(Q: Tensor, K: Tensor, V: Tensor, W: int, **_: object) -> Tensor:
    i, j = _positions(Q.shape[-2], K.shape[-2])
    return _attend(Q, K, V, (j <= i) & (i - j < W))


def softmax_gqa(Q: Tensor, K: Tensor, V: Tensor, **_: object) -> Tensor:
    # Q[b,g,r,p,e]: broadcasting K[b,g,1,m,e] over the R query heads of each group.
    return tfn.scaled_dot_product_attention(Q, K[:, :, None], V[:, :, None])


def softmax_lse(Q: Tensor, K: Tensor, V: Tensor, **_: object) -> tuple[Tensor, Tensor]:
    probs, lse = _softmax_rows(_scores(Q, K))
    return probs @ V, lse


def alibi(Q: Tensor, K: Tensor, V: Tensor, Slope: Tensor, **_: object) -> Tensor:
    p, m = Q.shape[-2], K.shape[-2]
    i, j = _positions(p, m)
    s = _scores(Q, K) - Slope[:, None, None] * (i - j).to(Q.dtype)
    probs, _ = _softmax_rows(s, _causal(p, m))
    return probs @ V


def bias_tensor(Q: Tensor, K: Tensor, V: Tensor, Bias: Tensor, **_: object) -> Tensor:
    return tfn.scaled_dot_product_attention(Q, K, V, attn_mask=Bias)


def flashbias_lowrank(Q: Tensor, K: Tensor, V: Tensor, U: Tensor, W: Tensor, **_: object) -> Tensor:
    return tfn.scaled_dot_product_attention(Q, K, V, attn_mask=U @ W.transpose(-1, -2))


def softcap(Q: Tensor, K: Tensor, V: Tensor, cap: float, **_: object) -> Tensor:
    probs = torch.softmax(cap * torch.tanh(_scores(Q, K) / cap), dim=-1)
    return probs @ V


def softplus_l1(Q: Tensor, K: Tensor, V: Tensor, **_: object) -> Tensor:
    e, m = Q.shape[-1], K.shape[-2]
    a = tfn.softplus(_scores(Q, K, scale=math.log(e) * math.log(m) / math.sqrt(e)))
    return tfn.normalize(a, p=1.0, dim=-1) @ V


def sigmoid_bias(Q: Tensor, K: Tensor, V: Tensor, **_: object) -> Tensor:
    return torch.sigmoid(_scores(Q, K) - math.log(K.shape[-2])) @ V


def _elu1(x: Tensor) -> Tensor:
    return tfn.elu(x) + 1


def linear_elu(Q: Tensor, K: Tensor, V: Tensor, **_: object) -> Tensor:
    fq, fk = _elu1(Q), _elu1(K)
    kv = fk.transpose(-1, -2) @ V                      # [b,h,e,f]
    z = fk.sum(dim=-2)                                 # [b,h,e]
    return (fq @ kv) / (fq * z[..., None, :]).sum(dim=-1, keepdim=True)


def linear_elu_causal(Q: Tensor, K: Tensor, V: Tensor, **_: object) -> Tensor:
    # The recurrent (RNN) form: prefix sums of phi(K) V^T and phi(K); query p reads prefix p
    # (queries past the last key read the full sum).
    fq, fk = _elu1(Q), _elu1(K)
    p, m = Q.shape[-2], K.shape[-2]
    state = torch.cumsum(fk[..., :, :, None] * V[..., :, None, :], dim=-3)   # [b,h,m,e,f]
    zsum = torch.cumsum(fk, dim=-2)                                          # [b,h,m,e]
    at = torch.clamp(torch.arange(p), max=m - 1)
    num = torch.einsum("bhpe,bhpef->bhpf", fq, state[:, :, at])
    den = (fq * zsum[:, :, at]).sum(dim=-1, keepdim=True)
    return num / den


def lightning_causal(Q: Tensor, K: Tensor, V: Tensor, Lam: Tensor, **_: object) -> Tensor:
    p, m = Q.shape[-2], K.shape[-2]
    i, j = _positions(p, m)
    dist = (i - j).clamp(min=0).to(Q.dtype)
    decay = torch.where(j <= i, Lam[:, None, None] ** dist, torch.zeros((), dtype=Q.dtype))
    return ((Q @ K.transpose(-1, -2)) * decay) @ V


def _decay_matrix(rate: Tensor, p: int, m: int) -> Tensor:
    """[h, p, m]: exp(-rate[h] * (i - j)) for key j <= query i, else 0 (a per-head decay)."""
    i, j = _positions(p, m)
    dist = (i - j).clamp(min=0).to(rate.dtype)
    return torch.where(j <= i, torch.exp(-rate[:, None, None] * dist), torch.zeros((), dtype=rate.dtype))


def retnet(Q: Tensor, K: Tensor, V: Tensor, Lam: Tensor, **_: object) -> Tensor:
    # The paper's parallel form with its three normalizations (Sun et al. 2023, section 2.2).
    d = _decay_matrix(-torch.log(Lam), Q.shape[-2], K.shape[-2])
    d = d / d.sum(dim=-1, keepdim=True).sqrt()
    r = _scores(Q, K) * d
    return (r / r.sum(dim=-1, keepdim=True).abs().clamp(min=1.0)) @ V


def lightning2(Q: Tensor, K: Tensor, V: Tensor, Slope: Tensor, block: int = 3,
               **_: object) -> Tensor:
    # Lightning Attention-2's tiled algorithm (Qin et al. 2024, as in the authors' kernel),
    # lambda = exp(-Slope): for the block starting at s, intra = ((q k^T) * lambda^(i-j), j <= i) v
    # and inter = lambda^(p-s) q kv, where kv = sum_{m<s} lambda^(s-m) k_m^T v_m. A top-left
    # causal layout with P != M is the same sequence padded with zeros to max(P, M).
    p, m = Q.shape[-2], K.shape[-2]
    n = max(p, m)
    q = tfn.pad(Q, (0, 0, 0, n - p))
    k, v = tfn.pad(K, (0, 0, 0, n - m)), tfn.pad(V, (0, 0, 0, n - m))
    s = Slope[:, None, None]
    kv = torch.zeros(*K.shape[:-2], K.shape[-1], V.shape[-1], dtype=Q.dtype)
    out = []
    for lo in range(0, n, block):
        qb, kb, vb = q[..., lo:lo + block, :], k[..., lo:lo + block, :], v[..., lo:lo + block, :]
        at = torch.arange(qb.shape[-2], dtype=Q.dtype)[:, None]   # offset in the block
        intra = ((qb @ kb.transpose(-1, -2)) * _decay_matrix(Slope, len(at), len(at))) @ vb
        out.append(intra + torch.exp(-s * at) * (qb @ kv))         # kv holds keys < lo
        kv = torch.exp(-s * len(at)) * kv + (torch.exp(-s * (len(at) - at)) * kb).transpose(-1, -2) @ vb
    return torch.cat(out, dim=-2)[..., :p, :]


def gla_scalar(Q: Tensor, K: Tensor, V: Tensor, G: Tensor, **_: object) -> Tensor:
    # The recurrent form (GLA with one gate per head and step; Mamba-2's scalar SSM): the
    # state decays by the step's gate alpha_t = exp(G[t] - G[t-1]) and adds k_t^T v_t, and
    # query t reads it. One sequence, so P = M.
    alpha = torch.exp(torch.diff(G, dim=-1, prepend=torch.zeros_like(G[..., :1])))
    state = torch.zeros(*K.shape[:-2], K.shape[-1], V.shape[-1], dtype=Q.dtype)
    out = []
    for t in range(Q.shape[-2]):
        state = alpha[..., t, None, None] * state + K[..., t, :, None] * V[..., t, None, :]
        out.append((Q[..., t, None, :] @ state)[..., 0, :])
    return torch.stack(out, dim=-2)


def agent_attention(Q: Tensor, K: Tensor, V: Tensor, A: Tensor, **_: object) -> Tensor:
    agent_v = tfn.scaled_dot_product_attention(A, K, V)       # agents aggregate K, V
    return tfn.scaled_dot_product_attention(Q, A, agent_v)    # queries read the agents


def flowformer(Q: Tensor, K: Tensor, V: Tensor, **_: object) -> Tensor:
    # Follows the authors' reference Flow_Attention.forward (thuml/Flowformer), non-causal.
    eps = 1e-6
    q, k = torch.sigmoid(Q), torch.sigmoid(K)
    n_q, n_k = Q.shape[-2], K.shape[-2]
    sink_incoming = 1.0 / torch.einsum("bhpe,bhe->bhp", q + eps, k.sum(dim=2) + eps)
    source_outgoing = 1.0 / torch.einsum("bhme,bhe->bhm", k + eps, q.sum(dim=2) + eps)
    conserved_sink = torch.einsum("bhpe,bhe->bhp", q + eps,
                                  (k * source_outgoing[..., None]).sum(dim=2) + eps)
    conserved_source = torch.einsum("bhme,bhe->bhm", k + eps,
                                    (q * sink_incoming[..., None]).sum(dim=2) + eps)
    conserved_source = torch.clamp(conserved_source, min=-1.0, max=1.0)
    sink_allocation = torch.sigmoid(conserved_sink * (n_q / n_k))
    source_competition = torch.softmax(conserved_source, dim=-1) * n_k
    kv = k.transpose(-1, -2) @ (V * source_competition[..., None])
    return ((q * sink_incoming[..., None]) @ kv) * sink_allocation[..., None]


def moh(Q: Tensor, K: Tensor, V: Tensor, Gate: Tensor, **_: object) -> Tensor:
    heads = tfn.scaled_dot_product_attention(Q, K, V)        # [b,h,p,f]
    return (Gate[..., None] * heads).sum(dim=1)


def moba(Q: Tensor, K: Tensor, V: Tensor, Sel: Tensor, BS: int, **_: object) -> Tensor:
    p, m = Q.shape[-2], K.shape[-2]
    blocks = Sel.repeat_interleave(BS, dim=-2).repeat_interleave(BS, dim=-1)[..., :p, :m]
    return _attend(Q, K, V, blocks & _causal(p, m))


def sinks_window(Q: Tensor, K: Tensor, V: Tensor, NS: int, W: int, **_: object) -> Tensor:
    i, j = _positions(Q.shape[-2], K.shape[-2])
    return _attend(Q, K, V, (j <= i) & ((j < NS) | (i - j < W)))


def nbhd_1d(Q: Tensor, K: Tensor, V: Tensor, W: int, ST: int, **_: object) -> Tensor:
    return _attend(Q, K, V, gna_window(K.shape[-2], W, ST))


def nbhd_2d(Q: Tensor, K: Tensor, V: Tensor, WX: int, WY: int, SX: int, SY: int,
            **_: object) -> Tensor:
    b, h, px, py, e = Q.shape
    mx, my = K.shape[2], K.shape[3]
    mask = (gna_window(mx, WX, SX)[:, None, :, None] & gna_window(my, WY, SY)[None, :, None, :])
    out = _attend(Q.reshape(b, h, px * py, e), K.reshape(b, h, mx * my, e),
                  V.reshape(b, h, mx * my, -1), mask.reshape(px * py, mx * my))
    return out.reshape(b, h, px, py, -1)


FORMULAS: dict[str, Callable[..., Tensor | tuple[Tensor, ...]]] = {
    "softmax": softmax,
    "softmax_deferred": softmax,
    "softmax_1pass": softmax,
    "softmax_causal": softmax_causal,
    "softmax_causal_bottom_right": softmax_causal_bottom_right,
    "softmax_window": softmax_window,
    "softmax_gqa": softmax_gqa,
    "softmax_lse": softmax_lse,
    "alibi": alibi,
    "bias_tensor": bias_tensor,
    "flashbias_lowrank": flashbias_lowrank,
    "softcap": softcap,
    "softplus_l1": softplus_l1,
    "sigmoid_bias": sigmoid_bias,
    "linear_elu": linear_elu,
    "linear_elu_causal": linear_elu_causal,
    "lightning_causal": lightning_causal,
    "lightning2": lightning2,
    "retnet": retnet,
    "gla_scalar": gla_scalar,
    "agent_attention": agent_attention,
    "flowformer": flowformer,
    "moh": moh,
    "moba": moba,
    "sinks_window": sinks_window,
    "nbhd_1d": nbhd_1d,
    "nbhd_2d": nbhd_2d,
}

# ------------------------------------------------------------------------------- examples

# Runtime params per variant and size. Windows are chosen so that "tall" (P > M) leaves
# queries with no visible key where the variant allows it.
_PARAMS: dict[str, dict[str, dict[str, int | float]]] = {
    "softmax_window": {"small": {"W": 3}, "rect": {"W": 4}, "tall": {"W": 3}},
    "softcap": {"small": {"cap": 1.5}, "rect": {"cap": 1.0}, "tall": {"cap": 2.0}},
    "moba": {"small": {"BS": 4}, "rect": {"BS": 3}, "tall": {"BS": 4}},
    "sinks_window": {"small": {"NS": 1, "W": 3}, "rect": {"NS": 2, "W": 3}, "tall": {"NS": 2, "W": 2}},
    "nbhd_1d": {"small": {"W": 3, "ST": 1}, "rect": {"W": 5, "ST": 2}, "tall": {"W": 4, "ST": 4}},
    "nbhd_2d": {"small": {"WX": 3, "SX": 1, "WY": 3, "SY": 3},
                "rect": {"WX": 3, "SX": 2, "WY": 5, "SY": 5},
                "tall": {"WX": 4, "SX": 4, "WY": 3, "SY": 1}},
}

# nbhd_2d's grid (MX, MY) per size; queries sit on the same grid.
_GRID = {"small": (4, 4), "rect": (5, 7), "tall": (6, 3)}


def example_args(name: str, size: str = "small", seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> dict:
    """Keyword arguments for `ei.interpret(variants.load(name), **args)` and the formula.

    Deterministic for a (name, size, seed). Score magnitudes are O(1) so that exp, tanh and
    sigmoid all work in their interesting range.
    """
    if name not in FORMULAS:
        raise KeyError(f"no formula for variant {name!r}")
    if size not in SIZES:
        raise KeyError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    gen = torch.Generator().manual_seed(seed)
    dims = dict(SIZES[size])
    b, h, p, m, e, f = (dims[d] for d in "BHPMEF")

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    args: dict = dict(_PARAMS.get(name, {}).get(size, {}))
    if name == "softmax_gqa":
        r = 3 if size == "tall" else 2
        args.update(Q=randn(b, h, r, p, e), K=randn(b, h, m, e), V=randn(b, h, m, f))
        return args
    if name == "nbhd_2d":
        mx, my = _GRID[size]
        args.update(Q=randn(b, h, mx, my, e), K=randn(b, h, mx, my, e), V=randn(b, h, mx, my, f))
        return args
    if name in ("nbhd_1d", "gla_scalar"):
        p = m  # self-attention layout: one sequence of length M
    args.update(Q=randn(b, h, p, e), K=randn(b, h, m, e), V=randn(b, h, m, f))
    if name == "softmax_1pass":
        args["M0"] = 3  # a tile that does not divide M in any size
    elif name == "alibi":
        args["Slope"] = torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)]).to(dtype)
    elif name == "bias_tensor":
        args["Bias"] = randn(b, h, p, m)
    elif name == "flashbias_lowrank":
        args.update(U=randn(b, h, p, 2) * 0.7, W=randn(b, h, m, 2) * 0.7)
    elif name == "lightning_causal":
        args["Lam"] = (0.5 + 0.5 * torch.rand(h, generator=gen)).to(dtype)
    elif name == "retnet":
        # The paper's schedule, steepened so that a few positions already decay visibly.
        args["Lam"] = torch.tensor([1 - 2.0 ** (-1 - i) for i in range(h)]).to(dtype)
    elif name == "lightning2":
        # Decay rates of the ALiBi form 2^(-8(i+1)/H) the kernel is run with, with a steeper ratio.
        args["Slope"] = torch.tensor([2.0 ** (-1 - i) for i in range(h)]).to(dtype)
    elif name == "gla_scalar":
        # Cumulative log-gates: G[p] = sum_{t<=p} log sigmoid(x_t), non-increasing, gates mostly
        # near 0.8 (a visible decay over a few steps).
        steps = tfn.logsigmoid(1.5 + torch.randn(b, h, m, generator=gen))
        args["G"] = torch.cumsum(steps, dim=-1).to(dtype)
    elif name == "agent_attention":
        args["A"] = randn(b, h, 3, e)
    elif name == "moh":
        args["Gate"] = torch.rand(b, h, p, generator=gen).to(dtype)
    elif name == "moba":
        bs = int(args["BS"])
        pb, mb = -(-p // bs), -(-m // bs)
        sel = torch.rand(b, h, pb, mb, generator=gen) < 0.5
        own = torch.arange(pb)[:, None] == torch.arange(mb)[None, :]
        sel |= own  # MoBA always attends the query's own block ...
        sel[0, 0, -1, :] = False  # ... except here: a query block that selected nothing
        args["Sel"] = sel
    return args


# The per-head (or per-step) decay input of each decayed variant, and how a decay factor
# lambda per step is written there.
DECAY_INPUTS: dict[str, tuple[str, Callable[[float], float]]] = {
    "lightning_causal": ("Lam", lambda lam: lam),
    "retnet": ("Lam", lambda lam: lam),
    "lightning2": ("Slope", lambda lam: -math.log(lam)),
    "gla_scalar": ("G", math.log),
}


def with_decay(name: str, args: dict, lam: float) -> dict:
    """`args` with the decay of variant `name` set to `lam` per step, 0 < lam <= 1, every head."""
    key, value = DECAY_INPUTS[name]
    old = args[key]
    if key == "G":  # cumulative log-gates: G[p] = (p + 1) log lam
        steps = torch.arange(1, old.shape[-1] + 1, dtype=old.dtype)
        return {**args, key: (value(lam) * steps).expand(old.shape).contiguous()}
    return {**args, key: torch.full_like(old, value(lam))}


# ------------------------------------------------------------------------------- checking


def max_error(got: Tensor | tuple[Tensor, ...], want: Tensor | tuple[Tensor, ...]) -> float:
    """Max abs difference over all outputs; equal infinities count 0, any NaN counts inf."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    if len(got) != len(want):
        return math.inf
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return math.inf
        g, w = g.double(), w.double()
        if torch.isnan(g).any() or torch.isnan(w).any():
            return math.inf
        same = g == w  # covers matching +-inf
        diff = torch.where(same, torch.zeros((), dtype=g.dtype), (g - w).abs())
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst


def self_check(name: str, seed: int = 0, size: str = "small") -> float:
    """Max abs error of the reference interpreter against the plain-PyTorch formula."""
    from einsum_ir import variants  # lazy: this module must stay importable without the IR
    from einsum_ir.interpreter import interpret

    args = example_args(name, size=size, seed=seed)
    got = interpret(variants.load(name), **args)
    return max_error(got, FORMULAS[name](**args))
