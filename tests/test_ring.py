"""Context parallelism (codegen/ring.py): ring attention on real gloo process groups.

Each world size spawns its ranks once and runs every case inside them; rank 0 records, per case,
the largest difference of the unsharded output from the single-process kernel and from the
interpreter, and of every rank's input gradients from the single-process fused backward. The
tests then read one case each.
"""
from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import einsum_ir as ei
from einsum_ir.cost_model.ring import chunks, ring_cost
from einsum_ir.errors import BindError, LoweringError
from einsum_ir.lowering.ring import derive, visits
from support import make_inputs, on_kernel_device

# a per-key bias and a per-key mask read by the predicate: both travel with their key shard
KEY_SIDE = """
dims B H P M E F
param scale = 1/sqrt(E)
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f], Bk[b,h,m], Keep[b,m]: bool
S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale + Bk[b,h,m] where m <= p and Keep[b,m]
GM[b,h,p]   = max[m] S[b,h,p,m]
SN[b,h,p,m] = exp(S[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m]
O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]
output O
"""

# (id, variant name or spec text, layout, P, M, runtime params)
CASES_2 = [
    ("softmax", "softmax", "zigzag", 24, 24, {}),
    ("causal_contiguous", "softmax_causal", "contiguous", 37, 37, {}),
    ("causal_zigzag", "softmax_causal", "zigzag", 37, 37, {}),
    ("window", "softmax_window", "zigzag", 40, 40, {"W": 7}),
    ("softplus_l1", "softplus_l1", "zigzag", 23, 29, {}),
    ("key_side_tensors", KEY_SIDE, "zigzag", 21, 21, {}),
    ("moba", "moba", "zigzag", 16, 16, {"BS": 4}),  # a block table read at global positions
    ("lse", "softmax_lse", "zigzag", 20, 20, {}),  # two outputs
    ("bottom_right", "softmax_causal_bottom_right", "zigzag", 13, 27, {}),  # reads M - P
    ("alibi", "alibi", "contiguous", 18, 18, {}),
    ("empty_shard", "softmax_causal", "contiguous", 1, 1, {}),  # rank 1 holds no query and no key
]
CASES_4 = [
    ("softmax", "softmax", "contiguous", 24, 24, {}),
    ("causal_contiguous", "softmax_causal", "contiguous", 45, 45, {}),
    ("causal_zigzag", "softmax_causal", "zigzag", 45, 45, {}),
    ("window", "softmax_window", "zigzag", 40, 40, {"W": 5}),
    ("softplus_l1", "softplus_l1", "contiguous", 30, 26, {}),
    ("key_side_tensors", KEY_SIDE, "zigzag", 21, 21, {}),
    ("empty_shard", "softmax_causal", "zigzag", 3, 3, {}),  # rank 3's two chunks are empty
]
SIZES = {"B": 2, "H": 2, "E": 8, "F": 8, "R": 4, "PB": 4, "MB": 4}


def _cascade(spec: str) -> ei.Cascade:
    return ei.parse(spec) if "\n" in spec else ei.variants.load(spec)


def _inputs(c: ei.Cascade, n_q: int, n_k: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sizes = {**SIZES, "P": n_q, "M": n_k}
    def tensor(d):
        shape = [sizes[i.upper()] for i in d.indices]
        return torch.rand(shape) < 0.8 if d.dtype == "bool" else torch.randn(shape)

    return {d.name: tensor(d) for d in c.inputs}


def _case(spec: str, layout: str, n_q: int, n_k: int, params: dict) -> dict[str, float]:
    c = _cascade(spec)
    full = _inputs(c, n_q, n_k)
    cp = ei.context_parallel(c, layout=layout)
    local = {n: cp.shard(n, t).clone().requires_grad_(t.is_floating_point()) for n, t in full.items()}
    outs = _tuple(cp(**local, **params))
    leaves = {n: t.clone().requires_grad_(t.is_floating_point()) for n, t in full.items()}
    refs = _tuple(ei.compile(c)(**leaves, **params))
    interpreted = _tuple(ei.interpret(c, **full, **params))
    generator = torch.Generator().manual_seed(1)
    seeds = [torch.randn(r.shape, generator=generator) for r in refs]
    sum((r * s).sum() for r, s in zip(refs, seeds)).backward()
    sum((o * cp.shard(n, s)).sum() for o, s, n in zip(outs, seeds, c.output_names)).backward()
    errors = {"pairs_skipped": float(cp.stats.pairs_skipped), "kernel": 0.0, "interpreter": 0.0}
    for o, r, i, n in zip(outs, refs, interpreted, c.output_names):
        whole = cp.unshard(o.detach(), n)
        errors["kernel"] = max(errors["kernel"], _largest(whole - r.detach()))
        errors["interpreter"] = max(errors["interpreter"], _largest(whole - i))
    for n in (n for n, t in full.items() if t.is_floating_point()):
        errors[f"d{n}"] = _largest(local[n].grad - cp.shard(n, leaves[n].grad))
    for key in list(errors):  # the worst over the ranks
        value = torch.tensor(errors[key])
        dist.all_reduce(value, op=dist.ReduceOp.MAX if key != "pairs_skipped" else dist.ReduceOp.SUM)
        errors[key] = value.item()
    return errors


def _tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _largest(diff: torch.Tensor) -> float:
    return diff.abs().max().item() if diff.numel() else 0.0


def _worker(rank: int, world: int, port: int, cases: list, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for case_id, *case in cases:
            results[case_id] = _case(*case)
        if rank == 0:
            with open(path, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, cases: list, tmp_path_factory) -> dict:
    path = str(tmp_path_factory.mktemp(f"ring{world}") / "results.json")
    mp.spawn(_worker, args=(world, _free_port(), cases, path), nprocs=world)
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _spawn(2, CASES_2, tmp_path_factory)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _spawn(4, CASES_4, tmp_path_factory)


def _check(errors: dict) -> None:
    assert errors["kernel"] < 1e-5 and errors["interpreter"] < 1e-5, errors
    grads = {k: v for k, v in errors.items() if k.startswith("d")}
    assert grads and all(v < 1e-4 for v in grads.values()), errors


@pytest.mark.parametrize("case", [c[0] for c in CASES_2])
def test_two_ranks(two_ranks, case):
    _check(two_ranks[case])


@pytest.mark.parametrize("case", [c[0] for c in CASES_4])
def test_four_ranks(four_ranks, case):
    _check(four_ranks[case])


def test_masked_pairs_are_skipped(two_ranks, four_ranks):
    # causal over 2 ranks, contiguous: rank 0 never needs rank 1's keys; zigzag skips the
    # late-key chunks of early queries on both ranks
    assert two_ranks["causal_contiguous"]["pairs_skipped"] == 1
    assert two_ranks["causal_zigzag"]["pairs_skipped"] >= 2
    assert two_ranks["softmax"]["pairs_skipped"] == 0
    assert four_ranks["causal_zigzag"]["pairs_skipped"] > 0


# ---------------------------------------------------------------------------- one process


def test_one_rank_without_a_process_group():
    c = ei.variants.load("softmax_causal")
    full = _inputs(c, 19, 19)
    cp = ei.context_parallel(c)
    leaves = {n: t.clone().requires_grad_() for n, t in full.items()}
    out = cp(**leaves)
    assert torch.allclose(out, ei.interpret(c, **full), atol=1e-5)
    out.sum().backward()
    ref = {n: t.clone().requires_grad_() for n, t in full.items()}
    ei.interpret(c, **ref).sum().backward()
    for n in full:
        assert torch.allclose(leaves[n].grad, ref[n].grad, atol=1e-4), n


def test_layouts():
    assert chunks(8, 2, "contiguous") == [[(0, 4)], [(4, 8)]]
    assert chunks(8, 2, "zigzag") == [[(0, 2), (6, 8)], [(2, 4), (4, 6)]]
    assert chunks(3, 4, "contiguous") == [[(0, 1)], [(1, 2)], [(2, 3)], [(3, 3)]]
    spans = chunks(37, 4, "zigzag")
    assert sorted(s for rank in spans for s in rank) == [(i * 5, min(i * 5 + 5, 37)) for i in range(8)]
    with pytest.raises(ValueError, match="unknown layout"):
        chunks(8, 2, "striped")


def test_zigzag_balances_causal_work():
    c = ei.variants.load("softmax_causal")
    shapes = dict(B=1, H=8, P=16384, M=16384, E=64, F=64)
    contiguous = ring_cost(c, shapes, 4, "contiguous")
    zigzag = ring_cost(c, shapes, 4, "zigzag")
    assert contiguous.imbalance > 1.5
    assert zigzag.imbalance == pytest.approx(1.0, abs=1e-6)
    assert sum(zigzag.rank_work) == pytest.approx(sum(contiguous.rank_work))
    assert "imbalance" in str(zigzag) and "memory per rank" in str(zigzag)
    assert ei.context_parallel(c).cost(shapes, ranks=4).imbalance == zigzag.imbalance


def test_shifted_cascade_reads_global_positions():
    r = derive(ei.variants.load("softplus_l1"))
    text = str(r.shifted)
    assert "M_total" in text  # the length-scaled softplus reads the global key length
    r = derive(ei.variants.load("softmax_causal"))
    dims = dict(B=1, H=1, P=8, M=8, E=4, F=4)
    assert not visits(r, (0, 4), (4, 8), dims) and visits(r, (4, 8), (0, 4), dims)


def test_what_a_ring_cannot_shard_is_refused():
    with pytest.raises(LoweringError, match=r"bias_tensor\.ein:\d+:\d+: Bias is read at both a query"):
        ei.context_parallel(ei.variants.load("bias_tensor"))
    with pytest.raises(LoweringError, match="query='p'"):
        ei.context_parallel(ei.variants.load("softmax_gqa"))
    assert ei.context_parallel(ei.variants.load("softmax_gqa"), query="p").ring.query == "p"
    with pytest.raises(LoweringError, match="stages"):
        ei.context_parallel(ei.variants.load("agent_attention"))


def test_shards_that_do_not_fit_the_layout_are_refused():
    c = ei.variants.load("softmax")
    full = _inputs(c, 8, 8)
    cp = ei.context_parallel(c)
    with pytest.raises(BindError, match="disagree"):
        cp(Q=full["Q"], K=full["K"], V=full["V"][:, :, :5])


@pytest.mark.parametrize("name", ["softmax_causal", "softplus_l1"])
def test_triton_ring_chunks(name):
    """One rank, zigzag: two query chunks and two key chunks, so the Triton kernels run with
    nonzero offsets, forward and backward."""
    c = ei.variants.load(name)
    args = make_inputs(name, c, P=19, M=19, E=8, F=8)
    cp = ei.context_parallel(c, backend="triton")
    leaves = {n: v.clone().requires_grad_() for n, v in on_kernel_device(args).items()}
    out = cp(**leaves)
    torch.testing.assert_close(out.cpu(), ei.interpret(c, **args), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    ref = {n: v.clone().requires_grad_() for n, v in args.items()}
    ei.interpret(c, **ref).sum().backward()
    for n in args:
        torch.testing.assert_close(leaves[n].grad.cpu(), ref[n].grad, atol=1e-4, rtol=1e-4, msg=n)
