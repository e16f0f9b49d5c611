"""Grouped reductions over the key rank (lowering/groups.py): `X[.., g] = red[m] Y where
m // L == g`, read back at `X[.., m // L]`, complete inside key tiles aligned to the groups.
Landmark attention's grouped softmax is the catalog's one; a block-normalized sum written here
checks that the mechanism is the cascade's, not the variant's."""
import random
from dataclasses import replace

import pytest
import torch

import einsum_ir as ei
from einsum_ir.codegen.cpu_emit import HELPERS, CpuKernel
from einsum_ir.ir import Access, Binary, Name, Num, rebuild
from einsum_ir.lowering.groups import Grouping, groupings
from einsum_ir.lowering.merge import derive
from einsum_ir.lowering.strategy import key_loop_plan
from support import KERNEL_DEVICE, on_kernel_device

# each key's weight normalized within its block of L keys (a block-wise softmax, no mask), the
# blocks then weighted by a softmax over their mean scores: two grouped reductions, no union
BLOCKWISE = """
dims B H P M E F G
param scale = 1/sqrt(E)
param L: int
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale
GB[b,h,p,g] = max[m] S[b,h,p,m] where m // L == g
EB[b,h,p,m] = exp(S[b,h,p,m] - GB[b,h,p,m // L])
DB[b,h,p,g] = EB[b,h,p,m] where m // L == g
GM[b,h,p]   = max[m] S[b,h,p,m]
SN[b,h,p,m] = exp(S[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m]
O[b,h,p,f]  = SN[b,h,p,m] * EB[b,h,p,m] / DB[b,h,p,m // L] * V[b,h,m,f] / SD[b,h,p]
output O
"""


def _blockwise(q, k, v, L):
    """BLOCKWISE in plain PyTorch: the softmax weight of each key times its share in its block."""
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    m = s.shape[-1]
    groups = torch.arange(m) // L
    share = torch.empty_like(s)
    for g in groups.unique():
        cols = groups == g
        share[..., cols] = torch.softmax(s[..., cols], dim=-1)
    return (torch.softmax(s, dim=-1) * share) @ v


def _landmark_args(B, H, P, E, L, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, P, E, generator=g, dtype=dtype) for _ in range(3))
    return dict(Q=q, K=k, V=v, L=L, G=-(-P // L))


def test_groupings_are_found_only_where_every_read_is_at_the_key_group():
    c = ei.variants.load("landmark")
    found = groupings(c)
    assert set(found) == {"GB", "DB", "LB"}
    assert set(found.values()) == {Grouping("g", "m", Name("L"))}
    # read at another group than its key's (the next one): not a grouped reduction
    c = ei.parse(BLOCKWISE)
    eb = c.einsum("EB")
    shifted = rebuild(eb.expr, lambda n: Access("GB", n.indices[:3] + (Binary("+", n.indices[3], Num(1)),))
                      if isinstance(n, Access) and n.tensor == "GB" else None)
    other = c.replace(einsums=tuple(replace(e, expr=shifted) if e is eb else e for e in c.einsums))
    assert set(groupings(c)) == {"GB", "DB"} and set(groupings(other)) == {"DB"}


def test_landmark_plans_one_key_loop_with_tile_local_groups():
    plan = key_loop_plan(ei.variants.load("landmark"))
    (stage,) = plan.stages
    assert {n for n in stage.kinds if stage.kind(n) == "group"} == {"GB", "DB", "LB"}
    assert stage.by_presence and stage.sentinels is None
    assert plan.passes() == 1
    assert "m <= p" in str(ei.printer.print_expr(stage.predicate))  # causal tiles still skipped


@pytest.mark.parametrize("L", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("block_s", [4, 7, 16, 640])
def test_landmark_on_the_cpu_path_matches_the_interpreter_at_any_group_size(L, block_s):
    """Tiles of whole groups whatever BLOCK_S is (a tile smaller than a group holds one group),
    a ragged last group, rows with no earlier landmark, and L = 1 (no regular key at all)."""
    c = ei.variants.load("landmark")
    args = _landmark_args(2, 2, 29, 8, L)
    kern = CpuKernel(c, block_q=8, block_s=block_s)
    torch.testing.assert_close(kern.run(args), ei.interpret(c, **args), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("L", [2, 3, 4])
def test_a_blockwise_cascade_lowers_through_the_same_mechanism(L):
    c = ei.parse(BLOCKWISE)
    args = _landmark_args(1, 2, 13, 4, L)
    want = _blockwise(args["Q"], args["K"], args["V"], L)
    torch.testing.assert_close(ei.interpret(c, **args), want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(CpuKernel(c, block_q=4, block_s=5).run(args), want, atol=1e-12, rtol=1e-10)


def test_key_tiles_of_whole_groups_visit_every_key_once():
    ns = {"torch": torch}
    exec(HELPERS, ns)
    rng = random.Random(0)
    for _ in range(300):
        group, extent, block = rng.randint(1, 6), rng.randint(1, 40), rng.randint(1, 20)
        cuts = sorted(rng.sample(range(extent + 1), min(extent + 1, rng.randint(2, 5))))
        segments = [(a, b, rng.random() < 0.5) for a, b in zip(cuts, cuts[1:]) if rng.random() < 0.8]
        tiles = list(ns["_key_tiles"](segments, block, group, extent))
        keys = [k for first, last, _ in tiles for k in range(first, last + 1)]
        assert len(keys) == len(set(keys)), (segments, tiles)
        wanted = {k for lo, hi, _ in segments for k in range(lo, hi)}
        assert wanted <= set(keys) and all(0 <= k < extent for k in keys)
        for first, last, _ in tiles:  # whole groups: starts at a multiple, ends at one or at the extent
            assert first % group == 0 and ((last + 1) % group == 0 or last + 1 == extent)
            assert last - first + 1 <= max(block - block % group, group)


@pytest.mark.parametrize("L, tile", [(1, 16), (2, 16), (4, 16), (8, 32), (16, 16)])
def test_landmark_on_triton_matches_the_interpreter(L, tile):
    pytest.importorskip("triton")
    from einsum_ir.codegen.dispatch import Config
    from einsum_ir.codegen.kernel import compile_triton

    c = ei.variants.load("landmark")
    args = _landmark_args(1, 2, 37, 8, L, dtype=torch.float32)
    config = Config(16, tile, 4, 1) if KERNEL_DEVICE == "cpu" else None
    got = compile_triton(c).run(on_kernel_device(args), config)
    torch.testing.assert_close(got.cpu(), ei.interpret(c, **args), atol=2e-5, rtol=1e-4)


def test_triton_refuses_a_group_size_its_key_tile_cannot_hold():
    pytest.importorskip("triton")
    from einsum_ir.codegen.dispatch import Config
    from einsum_ir.codegen.kernel import compile_triton

    args = _landmark_args(1, 1, 12, 8, 3, dtype=torch.float32)
    kern = compile_triton(ei.variants.load("landmark"))
    with pytest.raises(ei.LoweringError, match="groups 3 keys; use backend 'cpu'"):
        kern.run(on_kernel_device(args), Config(16, 16, 4, 1))


def test_partial_states_refuse_grouped_reductions_with_the_reason():
    with pytest.raises(ei.LoweringError, match="landmark.ein:.*GB reduces the keys in groups .* would split"):
        derive(ei.variants.load("landmark"))


def test_two_groupings_in_one_key_loop_are_refused():
    two = BLOCKWISE.replace("DB[b,h,p,g] = EB[b,h,p,m] where m // L == g", "DB[b,h,p,g] = EB[b,h,p,m] where m // E == g")
    two = two.replace("/ DB[b,h,p,m // L]", "/ DB[b,h,p,m // E]")
    with pytest.raises(ei.LoweringError, match="groups its keys in more than one way"):
        key_loop_plan(ei.parse(two))


ATOMS = ["m // L == p // L", "m // L < p // L", "m % L < L - 1", "m % L == L - 1", "m <= p", "p - m < 9", "m >= 3"]
GUARDED = {"SO": "m // L == p // L and m % L < L - 1", "SL": "m // L < p // L and m % L == L - 1",
           "SB": "m // L < p // L and m % L < L - 1"}


def _random_landmark(rng: random.Random) -> str:
    """landmark.ein with each key set's predicate drawn from ATOMS: sets that overlap, blocks
    with no landmark, rows with no key, groups some of whose keys are absent."""
    src = ei.variants.source("landmark")
    for name, pred in GUARDED.items():
        src = src.replace(f"= S[b,h,p,m] where {pred}", "= S[b,h,p,m] where " + " and ".join(rng.sample(ATOMS, rng.randint(1, 3))))
    return src


@pytest.mark.parametrize("seed", [*range(10), 117, 121])  # 117, 121: a predicate that bounds no key range
def test_fuzzed_grouped_softmax_matches_the_interpreter_on_both_backends(seed):
    """Random key sets in landmark's cascade (one softmax over two of them, a grouped softmax over
    the third), at random shapes and group sizes, on the CPU path and under Triton's interpreter.
    A conjunct that would need a block list of tiles is tested in every tile instead."""
    rng = random.Random(seed)
    c = ei.parse(_random_landmark(rng))
    L = rng.choice([1, 2, 4])
    args = _landmark_args(rng.randint(1, 2), rng.randint(1, 2), rng.randint(3, 40), 4, L, seed=seed)
    want = ei.interpret(c, **args)
    got = CpuKernel(c, block_q=rng.choice([4, 16]), block_s=rng.choice([3, 8, 640])).run(args)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    pytest.importorskip("triton")
    from einsum_ir.codegen.dispatch import Config
    from einsum_ir.codegen.kernel import compile_triton

    f32 = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    config = Config(16, 16, 4, 1) if KERNEL_DEVICE == "cpu" else None
    got = compile_triton(c).run(on_kernel_device(f32), config).cpu()
    torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=1e-4)
