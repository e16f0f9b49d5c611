"""How many splits of the keys a split-KV launch takes (lowering/split_kv.py), per shape and device.

A key loop launches one program per (query tile, grid point). When that is fewer than the
device's SMs (decode: a few query rows per head) most of the GPU idles, so the keys are split
and every split is a program of its own. The count is the smallest that gives about two
programs per SM (a second wave evens out splits that end early, past a sequence's length),
and never more than

- one split per MIN_TILES key tiles (a split of fewer tiles spends its time on its prologue and
  its state's store, not on keys), and
- what keeps the combine's traffic (each split writes its state, the combine reads it back) at
  most 1/COMBINE_SHARE of the key and value bytes the splits read.

One split is the ordinary kernel. On a CPU the tiled PyTorch path runs every program of the grid
in one vectorized tile, so splitting only adds work: one split.
"""
from __future__ import annotations

from dataclasses import dataclass

from einsum_ir.cost_model.devices import Device, get

WAVES = 2  # programs per SM the split count aims for
MIN_TILES = 4  # key tiles per split, at least
COMBINE_SHARE = 8  # the states' traffic stays under 1/COMBINE_SHARE of the key/value bytes
BLOCK_Q = 64  # the query tile the choice assumes (the autotuner's default on a GPU)
BLOCK_S = 64  # the key tile


@dataclass(frozen=True)
class SplitChoice:
    splits: int
    programs: int  # programs the key loop launches with `splits` splits
    base_programs: int  # ... with one
    key_tiles: int
    sms: int
    reason: str

    def __str__(self) -> str:
        return (f"split-KV: {self.splits} split(s) of the keys, {self.programs} programs "
                f"({self.base_programs} unsplit, {self.sms} SMs, {self.key_tiles} key tiles): {self.reason}")


def choose_splits(grid: int, queries: int, keys: int, state_bytes: int, kv_bytes: int,
                  device: str | Device = "h100") -> SplitChoice:
    """The split count for a key loop over `grid` grid points, `queries` query rows and `keys`
    keys per grid point; `state_bytes` is what one split's state of one grid point holds (every
    query row's carried values), `kv_bytes` the key and value bytes one grid point reads."""
    d = get(device)
    q_tiles = -(-queries // BLOCK_Q) if queries else 0
    base = grid * q_tiles
    tiles = -(-keys // BLOCK_S)

    def choice(n: int, why: str) -> SplitChoice:
        n = max(1, n)
        return SplitChoice(n, base * n, base, tiles, d.sms, why)

    if d.key == "cpu":
        return choice(1, "the CPU path runs every program at once; splitting only repeats work")
    if base == 0 or base >= d.sms:
        return choice(1, f"{base} programs already fill {d.sms} SMs")
    want = -(-WAVES * d.sms // base)
    by_tiles = tiles // MIN_TILES
    by_traffic = kv_bytes // max(1, 2 * COMBINE_SHARE * state_bytes)
    n = min(want, by_tiles, by_traffic)
    if n <= 1:
        limit = "key tiles" if by_tiles <= by_traffic else "the combine's traffic"
        return choice(1, f"too few keys to split ({limit} allow no second split)")
    why = f"{base} programs for {d.sms} SMs: {n} splits give {base * n}"
    if n < want:
        why += (f" (capped at {MIN_TILES} key tiles per split)" if by_tiles <= by_traffic else
                f" (capped so the states' traffic stays under 1/{COMBINE_SHARE} of the key/value bytes)")
    return choice(n, why)
