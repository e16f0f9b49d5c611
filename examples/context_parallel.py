"""Ring attention over 2 processes on this machine (gloo on CPU): shard, call, unshard, train.

    python examples/context_parallel.py

Each rank holds a zigzag shard of the queries and keys of a causal softmax; the ring passes the
key shards round while each rank computes, merges the partial states exactly, and runs the
backward ring for the gradients. Rank 0 compares the result with one process.
"""
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import einsum_ir as ei
from einsum_ir.cost_model.ring import chunks

RANKS = 2


def worker(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    c = ei.variants.load("softmax_causal")
    torch.manual_seed(0)  # every rank makes the same full tensors here, only to cut its shard of them
    full = {name: torch.randn(1, 4, 1000, 64) for name in ("Q", "K", "V")}

    cp = ei.context_parallel(c, layout="zigzag")
    local = {name: cp.shard(name, t).requires_grad_() for name, t in full.items()}
    out = cp(**local)                      # this rank's 500 output rows
    out.square().sum().backward()          # the backward ring: dQ, dK, dV of this rank's shards
    whole = cp.unshard(out.detach())

    if rank == 0:
        leaves = {name: t.clone().requires_grad_() for name, t in full.items()}
        ref = ei.compile(c)(**leaves)
        ref.square().sum().backward()
        spans = chunks(1000, RANKS, "zigzag")[rank]
        print(f"{RANKS} ranks, zigzag: rank 0 holds rows {spans}; it ran {cp.stats.pairs_run} chunk pairs and "
              f"skipped {cp.stats.pairs_skipped} that the mask leaves empty")
        print(f"max |ring - one process| = {(whole - ref.detach()).abs().max().item():.2e}")
        print(f"max |ring dK - one process dK| (rank 0's shard) = "
              f"{(local['K'].grad - cp.shard('K', leaves['K'].grad)).abs().max().item():.2e}")
        print()
        print(cp.cost(dict(B=1, H=32, P=131072, M=131072, E=128, F=128), ranks=8, link="nvlink4"))
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    mp.spawn(worker, args=(free_port,), nprocs=RANKS)
