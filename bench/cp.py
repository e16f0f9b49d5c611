"""Context-parallel ring benchmark: one causal attention call over 1, 2 and 4 ranks.

    python bench/cp.py                         # N=16384 causal, 1, 2 and 4 ranks (a few minutes on 2 cores)
    python bench/cp.py --n 4096 --ranks 1 2    # smaller
    python bench/cp.py --backward              # forward + backward through the backward ring
    python bench/cp.py --layout contiguous     # the unbalanced layout, for comparison

Each world size runs in its own `torch.multiprocessing` spawn: gloo on CPU, NCCL when there are
at least as many GPUs as ranks. Every rank cuts its shards from the same random inputs (B=1,
H=4, D=64, fp32) and frees the rest, compiles on a small warm-up call, and then measures one call of
`ei.context_parallel(softmax_causal)`:

* time: the slowest rank's wall time for the call;
* shards: the bytes of the rank's Q, K, V shards (and their gradients with --backward): the
  memory that falls as 1/N;
* call peak: the largest rank's peak resident set during the call (VmHWM, reset before it)
  minus its resident set just before, i.e. what the call adds on top of its shards;
* comm hidden: 1 - (time the ring waited for transfers after its compute) / (time the same
  transfers take alone, measured beforehand with no compute), averaged over the ranks;
* error: max |unsharded output - the 1-rank output| (the 1-rank row runs first).

On this 2-core machine the ranks share the cores (each gets cores / ranks threads), so the
times are only a smoke test: the point is the per-rank memory and that the transfers overlap
the compute. On a machine with several GPUs the same script runs the ranks on NCCL.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu import _hwm_kb, _malloc_trim, _reset_hwm, _rss_kb  # noqa: E402 - bench/cpu.py's RSS probes

import einsum_ir as ei  # noqa: E402

B, H, D = 1, 4, 64


def _shards(cp, n: int, device) -> dict[str, torch.Tensor]:
    """This rank's Q, K, V shards of a fixed random length-n sequence (the whole is freed)."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for name in ("Q", "K", "V"):
        full = torch.randn(B, H, n, D, generator=generator)
        out[name] = cp.shard(name, full).to(device)
        del full
    return out


def _transfer_s(cp, shards: dict[str, torch.Tensor]) -> float:
    """One ring hop of the K, V shards with nothing else running (the best of 3)."""
    if cp.world == 1:
        return 0.0
    best = float("inf")
    for _ in range(3):
        dist.barrier()
        start = time.perf_counter()
        cp._wait(cp._exchange({n: shards[n] for n in ("K", "V")}, {"K": shards["K"].shape[2], "V": shards["V"].shape[2]},
                              {"K": 2, "V": 2}))
        best = min(best, time.perf_counter() - start)
    return best


def _worker(rank: int, world: int, port: int, args, reference: str, results: str) -> None:
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    cp = ei.context_parallel(ei.variants.load("softmax_causal"), layout=args.layout)

    def call(shards):
        out = cp(**shards)
        if args.backward:
            out.backward(torch.ones_like(out))
        return out

    warm = {k: v.requires_grad_(args.backward) for k, v in _shards(cp, 64 * world, device).items()}
    call(warm)
    shards = {k: v.requires_grad_(args.backward) for k, v in _shards(cp, args.n, device).items()}
    transfer = _transfer_s(cp, shards)
    held = sum(t.numel() * t.element_size() for t in shards.values()) * (2 if args.backward else 1)
    _malloc_trim()
    have_hwm = _reset_hwm()
    base = _rss_kb()
    dist.barrier()
    start = time.perf_counter()
    out = call(shards)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = (_hwm_kb() - base) * 1024 if have_hwm and not cuda else None
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    exposed = sum(cp.stats.wait_s)
    hops = (world - 1) * (3 if args.backward else 1)  # the backward's keys, then their gradients, travel too
    hidden = max(0.0, 1.0 - exposed / (transfer * hops)) if world > 1 and transfer > 0 else None
    whole = cp.unshard(out.detach()).cpu()
    row = torch.tensor([elapsed, held, peak if peak is not None else -1, hidden if hidden is not None else -1,
                        cp.stats.pairs_run, cp.stats.pairs_skipped], dtype=torch.float64, device=device)
    every = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(every, row)
    if rank == 0:
        if world == 1:
            torch.save(whole, reference)
        error = (whole - torch.load(reference)).abs().max().item() if os.path.exists(reference) else float("nan")
        every = torch.stack(every).cpu()
        hiddens = [h for h in every[:, 3].tolist() if h >= 0]
        with open(results, "a") as fh:
            fh.write("\t".join(map(str, [world, every[:, 0].max().item(), every[:, 1].max().item(),
                                         every[:, 2].max().item(), sum(hiddens) / len(hiddens) if hiddens else -1,
                                         int(every[:, 4].sum()), int(every[:, 5].sum()), error])) + "\n")
    dist.destroy_process_group()


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384, help="sequence length (queries = keys)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layout", default="zigzag", choices=("zigzag", "contiguous"))
    parser.add_argument("--backward", action="store_true", help="forward + backward")
    args = parser.parse_args()
    ranks = sorted(set(args.ranks))
    with tempfile.TemporaryDirectory() as tmp:
        reference, results = os.path.join(tmp, "out.pt"), os.path.join(tmp, "rows.tsv")
        for world in ranks:
            print(f"running {world} rank(s) ...", file=sys.stderr, flush=True)
            mp.spawn(_worker, args=(world, _port(), args, reference, results), nprocs=world)
        with open(results) as fh:
            rows = [line.split("\t") for line in fh.read().splitlines()]
    mib = lambda x: "-" if float(x) < 0 else f"{float(x) / 2**20:.0f} MiB"  # noqa: E731
    kind = "forward + backward" if args.backward else "forward"
    print(f"softmax_causal {kind}, B={B} H={H} N={args.n} D={D} fp32, {args.layout} layout, "
          f"{'NCCL' if torch.cuda.is_available() else 'gloo on CPU'}")
    header = ("ranks", "time", "shards per rank", "call peak per rank", "comm hidden", "pairs run/skipped",
              "error vs 1 rank")
    table = [header] + [(w, f"{float(t):.2f} s", mib(held), mib(peak), "-" if float(h) < 0 else f"{float(h):.0%}",
                         f"{run}/{skip}", f"{float(e):.1e}") for w, t, held, peak, h, run, skip, e in rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(str(x).rjust(wd) for x, wd in zip(r, widths)))


if __name__ == "__main__":
    main()
