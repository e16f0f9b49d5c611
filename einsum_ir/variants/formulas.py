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


def fox(Q: Tensor, K: Tensor, V: Tensor, G: Tensor, **_: object) -> Tensor:
    # Forget-gate weights prod_{m<t<=p} f_t as a bias log-space: G[p] - G[m] (P = M).
    s = _scores(Q, K) + (G[..., :, None] - G[..., None, :])
    probs, _ = _softmax_rows(s, _causal(Q.shape[-2], K.shape[-2]))
    return probs @ V


def symmetric(Q: Tensor, V: Tensor, **_: object) -> Tensor:
    return tfn.scaled_dot_product_attention(Q, Q, V)


def diff_attn(Q1: Tensor, K1: Tensor, Q2: Tensor, K2: Tensor, V: Tensor, lam: float,
              **_: object) -> Tensor:
    mask = _causal(Q1.shape[-2], K1.shape[-2])
    a1, _ = _softmax_rows(_scores(Q1, K1), mask)
    a2, _ = _softmax_rows(_scores(Q2, K2), mask)
    return (a1 - lam * a2) @ V


def masformer_heads(Q: Tensor, K: Tensor, V: Tensor, Wh: Tensor, **_: object) -> Tensor:
    i, j = _positions(Q.shape[-2], K.shape[-2])
    span = Wh.long()[:, None, None]                            # [h, 1, 1]
    return _attend(Q, K, V, (j <= i) & (i - j < span))


def shifted_sparse(Q: Tensor, K: Tensor, V: Tensor, GS: int, NS: int, **_: object) -> Tensor:
    # LongLoRA's S2-Attn: split the heads in two halves; the second half's groups start GS/2
    # earlier (no cyclic wrap). Plus SinkLoRA's global sink tokens, causal throughout.
    h, p, m = Q.shape[1], Q.shape[-2], K.shape[-2]
    i, j = _positions(p, m)
    masks = []
    for head in range(h):
        shift = GS // 2 if head >= h / 2 else 0
        same_group = torch.div(i + shift, GS, rounding_mode="floor") == torch.div(j + shift, GS, rounding_mode="floor")
        masks.append((j <= i) & ((j < NS) | same_group))
    return _attend(Q, K, V, torch.stack(masks))


def probe_cross(Q: Tensor, K: Tensor, V: Tensor, **_: object) -> Tensor:
    queries = Q.expand(K.shape[0], *Q.shape)                   # the same learned queries per image
    return tfn.scaled_dot_product_attention(queries, K, V)


def dma(Q: Tensor, K: Tensor, V: Tensor, Wdt: Tensor, A: Tensor, Keep: Tensor, **_: object) -> Tensor:
    dt = (V * Wdt[None, :, None, :]).sum(dim=-1)               # [b,h,m]
    z = torch.exp(A[None, :, None] * tfn.softplus(dt))
    s = _scores(Q, K) + z[:, :, None, :]
    mask = _causal(Q.shape[-2], K.shape[-2]) & Keep[:, :, None, :]
    probs, _ = _softmax_rows(s, mask)
    return probs @ V


def radial_widths(frames: int, frame_size: int) -> Tensor:
    """Band width per frame distance t: a whole frame at t = 0, then FS / 2^floor(log2 t)."""
    return torch.tensor([frame_size] + [frame_size >> int(math.log2(t)) for t in range(1, frames)],
                        dtype=torch.int32)


def radial(Q: Tensor, K: Tensor, V: Tensor, Wt: Tensor, FS: int, **_: object) -> Tensor:
    # The mask block by block: frame pair (a, b) holds a diagonal band of width Wt[|a - b|].
    p, m = Q.shape[-2], K.shape[-2]
    mask = torch.zeros(p, m, dtype=torch.bool)
    for a in range(0, p, FS):
        for b in range(0, m, FS):
            width = int(Wt[abs(a - b) // FS])
            rows, cols = torch.arange(a, min(a + FS, p)), torch.arange(b, min(b + FS, m))
            band = ((rows[:, None] - a) - (cols[None, :] - b)).abs() < width
            mask[a:a + FS, b:b + FS] = band
    return _attend(Q, K, V, mask)


def hip(Q: Tensor, K: Tensor, V: Tensor, Rank: Tensor, BQ: int, BK: int, TK: int, **_: object) -> Tensor:
    p, m = Q.shape[-2], K.shape[-2]
    chosen = (Rank < TK).repeat_interleave(BQ, dim=-2).repeat_interleave(BK, dim=-1)[..., :p, :m]
    return _attend(Q, K, V, chosen & _causal(p, m))


def vmoba(Q: Tensor, K: Tensor, V: Tensor, Sel: Tensor, BT: int, BY: int, BX: int, **_: object) -> Tensor:
    # Flatten the T x Y x X grid; token (t, y, x) lies in block (t // BT, y // BY, x // BX).
    b, h, nt, ny, nx, e = Q.shape
    t, y, x = torch.meshgrid(torch.arange(nt), torch.arange(ny), torch.arange(nx), indexing="ij")
    bt, by, bx = (t // BT).flatten(), (y // BY).flatten(), (x // BX).flatten()
    mask = Sel[:, :, bt, by, bx][:, :, :, bt, by, bx]            # [b, h, tokens, tokens]
    out = _attend(Q.reshape(b, h, -1, e), K.reshape(b, h, -1, e), V.reshape(b, h, nt * ny * nx, -1), mask)
    return out.reshape(b, h, nt, ny, nx, -1)


def var_sink(Q: Tensor, K: Tensor, V: Tensor, Rho: Tensor, Sink: Tensor, Img: Tensor, **_: object) -> Tensor:
    a, _ = _softmax_rows(_scores(Q, K), _causal(Q.shape[-2], K.shape[-2]))
    sink, other = Sink[:, None, None, :], (Img & ~Sink)[:, None, None, :]
    rho = Rho[None, :, None, None]
    budget = rho * (a * sink).sum(dim=-1, keepdim=True)          # taken from the sinks
    rest = (a * other).sum(dim=-1, keepdim=True)
    share = torch.where(rest > 0, budget / torch.where(rest > 0, rest, torch.ones(())), torch.zeros(()))
    new = torch.where(sink, (1 - rho) * a, a) + torch.where(other, share * a, torch.zeros(()))
    return new @ V


def psa(Q: Tensor, K: Tensor, V: Tensor, Lvl: Tensor, BS: int, **_: object) -> Tensor:
    # One softmax over the full-resolution keys of level-1 blocks and the pair-pooled keys of
    # level-2 blocks; a pooled key stands for two keys: log 2 added to its score.
    p, m = Q.shape[-2], K.shape[-2]
    pairs = m // 2
    kp = 0.5 * (K[..., 0:2 * pairs:2, :] + K[..., 1:2 * pairs:2, :])
    vp = 0.5 * (V[..., 0:2 * pairs:2, :] + V[..., 1:2 * pairs:2, :])
    level = Lvl.repeat_interleave(BS, dim=-2).repeat_interleave(BS, dim=-1)[..., :p, :m]
    s = torch.cat([_scores(Q, K), _scores(Q, kp) + math.log(2.0)], dim=-1)
    mask = torch.cat([level == 1, level[..., 0:2 * pairs:2] == 2], dim=-1)
    probs, _ = _softmax_rows(s, mask)
    return probs @ torch.cat([V, vp], dim=-2)


def landmark(Q: Tensor, K: Tensor, V: Tensor, L: int, **_: object) -> Tensor:
    # Query by query: one softmax over the own block's regular tokens (causal) and the earlier
    # blocks' landmarks; each landmark's probability is split over its block's regular tokens
    # by a softmax inside the block.
    s = _scores(Q, K)
    p, m = Q.shape[-2], K.shape[-2]
    out = torch.zeros(*Q.shape[:-1], V.shape[-1], dtype=Q.dtype)
    for i in range(p):
        own = [j for j in range(m) if j // L == i // L and j % L < L - 1 and j <= i]
        blocks = [g for g in range(i // L) if g * L + L - 1 < m]
        marks = [g * L + L - 1 for g in blocks]
        if not own and not marks:
            continue
        first = torch.softmax(s[..., i, own + marks], dim=-1)
        row = (first[..., None, :len(own)] @ V[..., own, :])[..., 0, :]
        for k, g in enumerate(blocks):
            members = list(range(g * L, g * L + L - 1))
            inner = torch.softmax(s[..., i, members], dim=-1)
            row = row + first[..., len(own) + k, None] * (inner[..., None, :] @ V[..., members, :])[..., 0, :]
        out[..., i, :] = row
    return out


def paged_tables(batch: int, slots: int, pages: int, page_size: int, gen: torch.Generator,
                 empty: int | None = None) -> tuple[Tensor, Tensor]:
    """A block table [batch, slots] and lengths [batch] as a paged cache's allocator leaves them:
    each sequence's pages drawn at random from the cache (unordered, some shared between
    sequences, as a shared prefix is), slots past a sequence's last page -1, lengths up to
    slots * page_size; sequence `empty` (if given) has length 0."""
    lengths = torch.randint(1, slots * page_size + 1, (batch,), generator=gen)
    if empty is not None:
        lengths[empty] = 0
    table = torch.randint(0, pages, (batch, slots), generator=gen)
    used = torch.arange(slots)[None, :] * page_size < lengths[:, None]
    table = torch.where(used, table, torch.full((), -1))
    return table.to(torch.int32), lengths.to(torch.int32)


def paged_decode(Q: Tensor, Kc: Tensor, Vc: Tensor, Tbl: Tensor, Len: Tensor, M: int, **_: object) -> Tensor:
    # Gather each sequence's keys page by page into a contiguous [b, g, m, e] cache, as a
    # PyTorch user would, and mask every key that has no valid page or lies past the length.
    pages, page_size = Kc.shape[:2]
    m = torch.arange(M)
    slot, offset = m // page_size, m % page_size
    in_table = slot < Tbl.shape[1]
    page = Tbl[:, slot.clamp(max=Tbl.shape[1] - 1)].long()  # [b, m]
    valid = in_table[None, :] & (page >= 0) & (page < pages) & (m[None, :] < Len[:, None].long())
    page = page.clamp(0, pages - 1)
    K = Kc[page, offset[None, :]].permute(0, 2, 1, 3)  # [b, g, m, e]
    V = Vc[page, offset[None, :]].permute(0, 2, 1, 3)
    # Q[b,g,r,p,e] against K[b,g,1,m,e]: the R query heads of a group share its cache head
    probs, _ = _softmax_rows(_scores(Q, K[:, :, None]), valid[:, None, None, None, :])
    return probs @ V[:, :, None]


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
    "fox": fox,
    "symmetric": symmetric,
    "diff_attn": diff_attn,
    "masformer_heads": masformer_heads,
    "shifted_sparse": shifted_sparse,
    "probe_cross": probe_cross,
    "dma": dma,
    "radial": radial,
    "hip": hip,
    "vmoba": vmoba,
    "var_sink": var_sink,
    "psa": psa,
    "landmark": landmark,
    "paged_decode": paged_decode,
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
    "diff_attn": {"small": {"lam": 0.8}, "rect": {"lam": 0.5}, "tall": {"lam": 0.3}},
    "shifted_sparse": {"small": {"GS": 4, "NS": 1}, "rect": {"GS": 4, "NS": 2}, "tall": {"GS": 6, "NS": 0}},
    "radial": {"small": {"FS": 2}, "rect": {"FS": 3}, "tall": {"FS": 2}},
    "hip": {"small": {"BQ": 4, "BK": 2, "TK": 2}, "rect": {"BQ": 2, "BK": 3, "TK": 2},
            "tall": {"BQ": 4, "BK": 2, "TK": 1}},
    "vmoba": {"small": {"BT": 1, "BY": 2, "BX": 2}, "rect": {"BT": 2, "BY": 1, "BX": 2},
              "tall": {"BT": 1, "BY": 2, "BX": 3}},
    "psa": {"small": {"BS": 4}, "rect": {"BS": 3}, "tall": {"BS": 2}},
    "landmark": {"small": {"L": 4}, "rect": {"L": 4}, "tall": {"L": 2}},  # powers of two, as Triton needs
}

# vmoba's video grid (T, Y, X) per size; queries and keys sit on the same grid.
_VIDEO = {"small": (2, 2, 3), "rect": (3, 2, 2), "tall": (2, 3, 3)}
# masformer_heads' span per head (a span past the sequence is full attention) and var_sink's
# image tokens, sinks among them, and per-head share.
_SPANS = {"small": [3, 100], "rect": [1, 4, 100], "tall": [2, 100]}
_IMAGE = {"small": (range(1, 6), [2, 4]), "rect": (range(1, 8), [1, 5]), "tall": (range(1, 5), [2])}
_RHO = [0.6, 0.0, 0.9]

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
    if name == "paged_decode":  # pages of 3 tokens, 2 more pages than the longest sequence needs
        r, t = 2, 3
        j = -(-m // t) + 1
        n = b * j  # a cache with room for every sequence's pages; the tables share some
        tbl, lengths = paged_tables(b, j, n, t, gen, empty=1 if b > 1 else None)
        args.update(Q=randn(b, h, r, p, e), Kc=randn(n, t, h, e), Vc=randn(n, t, h, f), Tbl=tbl, Len=lengths,
                    M=j * t)
        return args
    if name == "nbhd_2d":
        mx, my = _GRID[size]
        args.update(Q=randn(b, h, mx, my, e), K=randn(b, h, mx, my, e), V=randn(b, h, mx, my, f))
        return args
    if name == "vmoba":
        nt, ny, nx = _VIDEO[size]
        args.update(Q=randn(b, h, nt, ny, nx, e), K=randn(b, h, nt, ny, nx, e), V=randn(b, h, nt, ny, nx, f))
        blocks = tuple(-(-n // int(args[k])) for n, k in zip((nt, ny, nx), ("BT", "BY", "BX")))
        sel = torch.rand(b, h, *blocks, *blocks, generator=gen) < 0.4
        for blk in torch.cartesian_prod(*(torch.arange(n) for n in blocks)).reshape(-1, 3).tolist():
            sel[(slice(None), slice(None), *blk, *blk)] = True  # a query block attends its own block ...
        sel[0, 0, -1, -1, -1] = False  # ... except here: a query block that selected nothing
        args["Sel"] = sel
        return args
    if name in ("nbhd_1d", "gla_scalar", "fox", "symmetric", "radial"):
        p = m  # self-attention layout: one sequence of length M
    if name == "symmetric":  # one projection for queries and keys
        args.update(Q=randn(b, h, p, e), V=randn(b, h, m, f))
        return args
    if name == "diff_attn":
        args.update(Q1=randn(b, h, p, e), K1=randn(b, h, m, e), Q2=randn(b, h, p, e), K2=randn(b, h, m, e),
                    V=randn(b, h, m, f))
        return args
    if name == "probe_cross":  # N = 3 learned queries per head, shared by the batch
        args.update(Q=randn(h, 3, e), K=randn(b, h, m, e), V=randn(b, h, m, f))
        return args
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
    elif name == "fox":
        # Cumulative log forget gates, gates near 0.8 as in gla_scalar.
        args["G"] = torch.cumsum(tfn.logsigmoid(1.5 + torch.randn(b, h, p, generator=gen)), dim=-1).to(dtype)
    elif name == "masformer_heads":
        args["Wh"] = torch.tensor(_SPANS[size][:h], dtype=torch.int32)
    elif name == "dma":
        args.update(Wdt=randn(h, f) * 0.5, A=-(0.5 + torch.rand(h, generator=gen)).to(dtype))
        z = torch.exp(args["A"][None, :, None] * tfn.softplus((args["V"] * args["Wdt"][None, :, None]).sum(-1)))
        keep = torch.zeros(b, h, m, dtype=torch.bool)
        keep.scatter_(-1, torch.topk(z, max(1, m // 2), dim=-1).indices, True)  # the top-w keys of Z
        args["Keep"] = keep
    elif name == "radial":
        frames = -(-m // int(args["FS"]))
        args["Wt"] = radial_widths(frames, int(args["FS"]))
    elif name == "hip":
        qb, kb = -(-p // int(args["BQ"])), -(-m // int(args["BK"]))
        # A ranking per query block: a random permutation of its key blocks (0 = best).
        args["Rank"] = torch.argsort(torch.rand(b, h, qb, kb, generator=gen), dim=-1).argsort(dim=-1).to(torch.int32)
    elif name == "var_sink":
        image, sinks = _IMAGE[size]
        img = torch.zeros(b, m, dtype=torch.bool)
        img[:, list(image)] = True
        sink = torch.zeros(b, m, dtype=torch.bool)
        sink[:, sinks] = True
        args.update(Rho=torch.tensor(_RHO[:h]).to(dtype), Sink=sink, Img=img)
    elif name == "psa":
        bs = int(args["BS"])
        lvl = torch.randint(0, 3, (b, h, -(-p // bs), -(-m // bs)), generator=gen)
        lvl[0, 0, -1, :] = 0  # a query block that keeps no key block
        args["Lvl"] = lvl.to(torch.int32)
    elif name == "landmark":
        args["G"] = -(-m // int(args["L"]))  # the rank of blocks: no input declares it
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
