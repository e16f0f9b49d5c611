"""The CPU path's per-call helpers, made cheap for tiny shapes (a decode step), against
straightforward references: `_grid_segments` (the key segments of all programs at once) must
give exactly the segments a key-by-key, program-by-program check gives."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from einsum_ir.codegen.cpu_emit import HELPERS


@pytest.fixture(scope="module")
def helpers() -> dict:
    """The helpers as the generated module has them: exec'd beside its imports."""
    ns = {"itertools": itertools, "math": math, "torch": torch}
    exec(HELPERS, ns)  # noqa: S102 - the project's own helper source
    return ns


def brute_force(segments: list) -> list[tuple[int, int, bool]]:
    """Per key, per program: visited when in some segment, full when in a full segment; a key
    is kept when some program visits it, masked unless every program has it full; runs of
    consecutive kept keys with one flag are the segments."""
    ends = [torch.as_tensor(x) for lo, hi, _ in segments for x in (lo, hi)]
    shape = torch.broadcast_shapes(*(x.shape for x in ends))
    per_program = [[int(v) for v in x.broadcast_to(shape).reshape(-1)] for x in ends]
    programs = math.prod(shape)
    values = [v for x in per_program for v in x]
    if not values:
        return []
    out: list[tuple[int, int, bool]] = []
    for key in range(min(values), max(values)):
        seen, full = False, True
        for p in range(programs):
            inside = [per_program[2 * s][p] <= key < per_program[2 * s + 1][p] for s in range(len(segments))]
            seen |= any(inside)
            full &= any(i for i, (_, _, masked) in zip(inside, segments) if not masked)
        if not seen:
            continue
        if out and out[-1][1] == key and out[-1][2] == (not full):
            out[-1] = (out[-1][0], key + 1, not full)
        else:
            out.append((key, key + 1, not full))
    return out


SHAPES = [(), (1,), (4,), (3, 1), (1, 2), (3, 2), (2, 1, 2)]


def random_end(rng: random.Random, shape: tuple[int, ...], near: object = None) -> object:
    """An int or an int tensor of `shape`, small values so that ends coincide often; `near`: a
    previous end to reuse (touching segments) or shift (empty and reversed segments)."""
    kind = rng.random()
    if near is not None and kind < 0.25:
        return near  # a segment starting where the last one ends
    if near is not None and kind < 0.35:
        return near - rng.randint(0, 2)  # empty or reversed: no program visits it
    if kind < 0.55:
        return rng.randint(-2, 14)
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    dtype = rng.choice([torch.int32, torch.int64])
    return torch.randint(-2, 15, shape, generator=gen, dtype=dtype)


def random_segments(rng: random.Random) -> list:
    shape = rng.choice(SHAPES)
    segments, hi = [], None
    for _ in range(rng.randint(1, 4)):
        lo = random_end(rng, shape, hi)
        hi = random_end(rng, shape, lo)
        segments.append((lo, hi, rng.random() < 0.5))
    return segments


@pytest.mark.parametrize("seed", range(8))
def test_grid_segments_matches_brute_force(helpers, seed):
    rng = random.Random(seed)
    for _ in range(250):
        segments = random_segments(rng)
        got = helpers["_grid_segments"](segments)
        assert got == brute_force(segments), segments
        assert all(type(lo) is int and type(hi) is int and lo < hi for lo, hi, _ in got)


def test_grid_segments_cases(helpers):
    grid = helpers["_grid_segments"]
    ks = torch.tensor([[0], [8], [16], [24]], dtype=torch.int32)  # a decode step's left padding
    m = torch.full((4, 1), 65, dtype=torch.int32)
    assert grid([(ks, m, False), (m, 65, True)]) == [(0, 24, True), (24, 65, False)]
    assert grid([(0, 5, False), (5, 9, True)]) == [(0, 5, False), (5, 9, True)]  # ints: one program
    assert grid([(0, 5, False), (5, 5, False), (7, 9, False)]) == [(0, 5, False), (7, 9, False)]
    assert grid([(3, 3, False)]) == []
    assert grid([(torch.zeros(0, 1, dtype=torch.int64), 4, False)]) == []  # no programs
    # program 0's two full segments overlap on [2, 4): it still counts once there, so keys
    # program 1 has only masked stay masked
    two = [(torch.tensor([0, 9]), torch.tensor([4, 9]), False), (torch.tensor([2, 9]), torch.tensor([6, 9]), False)]
    assert grid(two + [(0, 6, True)]) == [(0, 6, True)]
    assert grid(two + [(0, 6, False)]) == [(0, 6, False)]
