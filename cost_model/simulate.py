"""Tile simulator: which KV tiles each Q tile visits under the cascade's predicates.

Tiles lie on the static grid of the token ranks named by `q_tile` and `kv_tile` (several for a
multi-dimensional layout). For every (Q tile, KV tile) pair the number of present points is
counted exactly (cost_model.predicates), component by component; the pair is *full* when every
point is present, *skipped* when none is, and *partial* (in-tile masking needed) otherwise.

- tile_speedup: total KV tiles / KV tiles visited by the worst Q tile (GNA's bound);
- flop_speedup: dense points / present points;
- estimated_speedup: every Q tile is a CTA costing its full and partial tiles (per-tile
  roofline on one SM's share of the device; partial tiles also evaluate the mask), CTAs are
  scheduled over the SMs greedily in launch order, and the makespan is compared with dense.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, replace

import torch

from einsum_ir.ir import Binary, Call, Cascade, Unary, rank_of, walk

from einsum_ir.cost_model import counts as cm
from einsum_ir.cost_model import predicates as pr
from einsum_ir.cost_model.devices import Device, get

SKIPPED, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class SimResult:
    device: Device
    q_axes: tuple[tuple[str, int, int], ...]  # (rank, extent, tile) of each Q-side axis
    kv_axes: tuple[tuple[str, int, int], ...]
    classes: torch.Tensor  # n_q_tiles x n_kv_tiles, SKIPPED / PARTIAL / FULL
    points: torch.Tensor  # n_q_tiles x n_kv_tiles: present points of each pair (one batch copy)
    copies: int  # identical CTAs per Q tile (batch ranks the mask does not read)
    present: float  # present points over the token ranks (and masked batch ranks)
    dense: float
    makespan_s: float
    dense_makespan_s: float

    @property
    def n_q_tiles(self) -> int:
        return self.classes.shape[0]

    @property
    def n_kv_tiles(self) -> int:
        return self.classes.shape[1]

    def per_q_tile(self, cls: int) -> torch.Tensor:
        return (self.classes == cls).sum(dim=1)

    @property
    def visited(self) -> torch.Tensor:
        return self.per_q_tile(FULL) + self.per_q_tile(PARTIAL)

    @property
    def tile_speedup(self) -> float:
        return self.n_kv_tiles / max(int(self.visited.max()), 1)

    @property
    def flop_speedup(self) -> float:
        return self.dense / max(self.present, 1.0)

    @property
    def estimated_speedup(self) -> float:
        return self.dense_makespan_s / self.makespan_s

    def visits(self, q_index: int) -> dict[str, list[int]]:
        """KV tiles (flat indices) that Q tile `q_index` visits, by class."""
        row = self.classes[q_index]
        return {name: torch.nonzero(row == cls).flatten().tolist()
                for name, cls in (("full", FULL), ("partial", PARTIAL), ("skipped", SKIPPED))}

    def __str__(self) -> str:
        axes = lambda ax: " x ".join(f"{r}={n}/{t}" for r, n, t in ax)  # noqa: E731
        full, part, skip = (self.per_q_tile(c).float() for c in (FULL, PARTIAL, SKIPPED))
        worst = int(self.visited.argmax())
        rows = [("Q tiles", f"{self.n_q_tiles}" + (f" (x{self.copies} batch copies)" if self.copies > 1 else "")),
                ("KV tiles", str(self.n_kv_tiles)),
                ("KV tiles per Q tile: full", f"mean {full.mean():.1f}, max {int(full.max())}"),
                ("partial (masked)", f"mean {part.mean():.1f}, max {int(part.max())}"),
                ("skipped", f"mean {skip.mean():.1f}, min {int(skip.min())}"),
                ("worst Q tile", f"#{worst}: visits {int(self.visited[worst])}"),
                ("tile_speedup", f"{self.tile_speedup:.3f}"),
                ("flop_speedup", f"{self.flop_speedup:.3f}"),
                ("estimated_speedup", f"{self.estimated_speedup:.3f} (makespan {self.makespan_s * 1e6:.1f} us "
                                      f"vs dense {self.dense_makespan_s * 1e6:.1f} us on {self.device.sms} SMs)")]
        width = max(len(k) for k, _ in rows)
        head = f"Tile simulation on {self.device.name}\n  Q tiles over {axes(self.q_axes)}; KV tiles over {axes(self.kv_axes)}"
        return head + "\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def simulate(c: Cascade, shapes: dict, device: str | dict | Device = "h100", q_tile: dict | None = None,
             kv_tile: dict | None = None, dtype: str = "bf16") -> SimResult:
    d = get(device)
    q_tile = dict(q_tile or ({"P": 128} if "P" in c.dims else {}))
    kv_tile = dict(kv_tile or ({"M": 64} if "M" in c.dims else {}))
    if not q_tile or not kv_tile:
        raise ValueError("name the token ranks to tile, e.g. q_tile={'PX': 16, 'PY': 16}, kv_tile={'MX': 16, 'MY': 8}")
    b = cm.bind(c, shapes)
    scalars = {k: int(v) for k, v in b.scalars.items() if v.is_number}
    qv, kvv = [r.lower() for r in q_tile], [r.lower() for r in kv_tile]
    parts = cm.parts_of(c)
    mask_einsums = [e for e in c.einsums
                    if set(qv + kvv) <= {parts[v].whole if v in parts else v for v in e.space}]
    if not mask_einsums:
        raise ValueError(f"no Einsum iterates all of {', '.join(list(q_tile) + list(kv_tile))}")
    preds = pr.effective_predicates(c)
    distinct = list(dict.fromkeys(preds[e.name] for e in mask_einsums if preds[e.name] is not None))
    mask = distinct[0] if len(distinct) == 1 else (
        _or_all(distinct) if distinct else None)  # a tile is visited if any Einsum has work in it
    comps = pr.components(mask, parts)
    batch = [v for v in dict.fromkeys(x for comp in comps for x in comp.vars) if v not in qv + kvv]
    tiles = {**{v: q_tile[rank_of(v)] for v in qv}, **{v: kv_tile[rank_of(v)] for v in kvv}, **{v: 1 for v in batch}}
    extent = {v: scalars[rank_of(v)] for v in tiles}
    q_axes_vars, kv_axes_vars = batch + qv, kvv  # batch-major, like a launch grid
    order = q_axes_vars + kv_axes_vars
    ntiles = {v: -(-extent[v] // tiles[v]) for v in order}
    vol = {v: torch.tensor([min(tiles[v], extent[v] - i * tiles[v]) for i in range(ntiles[v])], dtype=torch.float64)
           for v in order}
    shape = [ntiles[v] for v in order]
    full = torch.ones(shape, dtype=torch.bool)
    empty = torch.zeros(shape, dtype=torch.bool)
    present = torch.ones(shape, dtype=torch.float64)
    constrained = set()
    for comp in comps:
        counts = _component_tiles(comp, tiles, extent, scalars, parts, b.tensors)
        cvol = _outer([vol[v] for v in comp.vars])
        glob = lambda t: _to_global(t, list(comp.vars), order)  # noqa: E731
        full &= glob(counts == cvol)
        empty |= glob(counts == 0)
        present = present * glob(counts)
        constrained |= set(comp.vars)
    for v in order:
        if v not in constrained:
            present = present * _to_global(vol[v], [v], order)
    n_q = math.prod(ntiles[v] for v in q_axes_vars)
    classes = torch.full(shape, PARTIAL, dtype=torch.int8)
    classes[full] = FULL
    classes[empty] = SKIPPED
    classes = classes.reshape(n_q, -1)
    dense = float(math.prod(extent.values()))
    copies = _copies(mask_einsums[0], set(order), parts, scalars)
    cost_full, cost_partial, epilogue = _tile_costs(c, shapes, d, dtype, tiles, extent, order, kvv, mask, n_q,
                                                   copies)
    n_full = (classes == FULL).sum(1).double()
    n_part = (classes == PARTIAL).sum(1).double()
    cta = n_full * cost_full + n_part * cost_partial + epilogue
    dense_cta = torch.full((n_q,), classes.shape[1] * cost_full + epilogue, dtype=torch.float64)
    return SimResult(d, tuple((rank_of(v), extent[v], tiles[v]) for v in q_axes_vars),
                     tuple((rank_of(v), extent[v], tiles[v]) for v in kv_axes_vars), classes,
                     present.reshape(n_q, -1), copies,
                     float(present.sum()), dense, _makespan(cta, copies, d.sms), _makespan(dense_cta, copies, d.sms))


def _or_all(preds):
    out = preds[0]
    for p in preds[1:]:
        out = Binary("or", out, p)
    return out


def _component_tiles(comp: pr.Component, tiles, extent, scalars, parts, tensors) -> torch.Tensor:
    """Present points per tile combination of the component's variables (in comp.vars order)."""
    key = max(comp.vars, key=lambda v: extent[v])
    others = [v for v in comp.vars if v != key]
    env = pr.Env(pr.grid({v: extent[v] for v in others}), scalars, parts, tensors)
    edges = torch.arange(0, extent[key] + tiles[key], tiles[key]).clamp(max=extent[key])
    cum = torch.from_numpy(pr.cumulative(comp.clauses, key, extent[key], env, edges.numpy()))
    per_key_tile = (cum[:, 1:] - cum[:, :-1]).double()
    n_key = per_key_tile.shape[1]
    flat = torch.zeros(per_key_tile.shape[0], dtype=torch.long)
    for v in others:  # the row's tile index over the other variables, row-major
        flat = flat * -(-extent[v] // tiles[v]) + (torch.from_numpy(env.index[v]).flatten() // tiles[v])
    n_rows_tiles = math.prod(-(-extent[v] // tiles[v]) for v in others)
    out = torch.zeros(n_rows_tiles, n_key, dtype=torch.float64).index_add_(0, flat, per_key_tile)
    out = out.reshape([-(-extent[v] // tiles[v]) for v in others] + [n_key])
    pos = others + [key]
    return out.permute([pos.index(v) for v in comp.vars])


def _outer(vectors: list[torch.Tensor]) -> torch.Tensor:
    out = vectors[0]
    for v in vectors[1:]:
        out = out.unsqueeze(-1) * v
    return out


def _to_global(t: torch.Tensor, names: list[str], order: list[str]) -> torch.Tensor:
    perm = sorted(range(len(names)), key=lambda i: order.index(names[i]))
    t = t.permute(perm)
    shape = [t.shape[[names[i] for i in perm].index(v)] if v in names else 1 for v in order]
    return t.reshape(shape)


def _copies(e, token_and_masked: set[str], parts, scalars) -> int:
    """CTAs that repeat each Q tile: the Einsum's other output ranks (batch, heads)."""
    lhs = {parts[v].whole if v in parts else v for v in e.lhs_vars}
    return math.prod(scalars[rank_of(v)] for v in lhs - token_and_masked)


def _tile_costs(c, shapes, d: Device, dtype, tiles, extent, order, kvv, mask, n_q,
                copies) -> tuple[float, float, float]:
    """Seconds one SM spends on a full KV tile, a partial one, and a Q tile's epilogue.

    Work per (query, key) point comes from the dense cascade's counts; a KV tile's loads are
    the key-side inputs divided by the number of KV tiles; a partial tile also evaluates the
    mask (its operations per point) on the vector units.
    """
    dense_c = c.replace(einsums=tuple(replace(e, where=None) for e in c.einsums))
    counts = cm.count(dense_c, shapes, dtype)
    points = float(math.prod(extent.values())) * copies
    tile_points = float(math.prod(tiles[v] for v in order))
    n_kv = math.prod(-(-extent[v] // tiles[v]) for v in kvv)
    kv_ranks = {rank_of(v) for v in kvv}
    kv_bytes = sum(float(bts) for n, bts in counts.input_bytes.items()
                   if kv_ranks & set(c.tensors[n].ranks))
    other_bytes = float(counts.compulsory_bytes) - kv_bytes
    per_sm = lambda rate: rate / d.sms  # noqa: E731
    tensor = 2 * float(counts.macs) / points * tile_points / per_sm(d.tensor_rate(dtype))
    vector = float(counts.vector_ops) / points * tile_points / per_sm(d.vector_ops)
    sfu = float(counts.sfu_ops) / points * tile_points / per_sm(d.sfu_ops)
    memory = kv_bytes / copies / n_kv / per_sm(d.hbm_bandwidth)
    mask_ops = sum(1 for n in walk(mask) if isinstance(n, (Binary, Unary, Call))) if mask is not None else 0
    full = max(tensor, vector, sfu, memory)
    partial = max(tensor, vector + mask_ops * tile_points / per_sm(d.vector_ops), sfu, memory)
    epilogue = other_bytes / copies / n_q / per_sm(d.hbm_bandwidth)
    return full, partial, epilogue


def _makespan(costs: torch.Tensor, copies: int, sms: int) -> float:
    """Greedy list scheduling in launch order: each CTA goes to the SM that frees up first."""
    free = [0.0] * sms
    for cost in costs.tolist() * copies:
        heapq.heapreplace(free, free[0] + cost)
    return max(free)


def plot_tile_map(result: SimResult, path: str) -> None:
    """Save a heatmap of tile classes (rows: Q tiles, columns: KV tiles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    fig, ax = plt.subplots(figsize=(8, 8 * min(result.n_q_tiles / result.n_kv_tiles, 2)))
    ax.imshow(result.classes.numpy(), cmap=ListedColormap(["white", "orange", "tab:blue"]), vmin=0, vmax=2,
              interpolation="nearest", aspect="auto")
    ax.set_xlabel(f"KV tile ({' x '.join(r for r, _, _ in result.kv_axes)}, row-major)")
    ax.set_ylabel(f"Q tile ({' x '.join(r for r, _, _ in result.q_axes)}, row-major)")
    ax.set_title(f"skipped (white) / partial (orange) / full (blue); tile speedup {result.tile_speedup:.2f}")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
