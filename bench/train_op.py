"""Training through the custom op: forward and backward time and peak memory of
`codegen.torch_op.run` (what the torch.compile backend and the Hugging Face hook call) next to
SDPA, on causal softmax, B=1, H=8, D=64, fp32.

    python bench/train_op.py            # N=4096
    python bench/train_op.py --n 8192

Each implementation runs in its own fresh subprocess: one warm-up step (compiles, thread
pools), then one measured step: the forward's time, the backward's time, and the process's
resident set before the step and at its peak (VmHWM, reset just before), in MiB. Q, K, V, the
output gradient and the gradients themselves are part of the process (the same for both).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from cpu import _hwm_kb, _malloc_trim, _reset_hwm, _rss_kb  # noqa: E402 - bench/cpu.py's RSS probes

B, H, D = 1, 8, 64
IMPLS = ("ours", "sdpa")


def worker(impl: str, n: int) -> dict:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g).requires_grad_(True) for _ in range(3))
    dout = torch.randn(B, H, n, D, generator=g)
    if impl == "ours":
        import einsum_ir as ei
        from einsum_ir.codegen.torch_op import run

        c = ei.variants.load("softmax_causal")
        forward = lambda: run(c, Q=q, K=k, V=v)  # noqa: E731
    else:
        forward = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    out = forward()
    out.backward(dout)
    for t in (q, k, v):
        t.grad = None
    del out
    _malloc_trim()
    have_hwm = _reset_hwm()
    before = _rss_kb()
    t0 = time.perf_counter()
    out = forward()
    t1 = time.perf_counter()
    out.backward(dout)
    t2 = time.perf_counter()
    peak = _hwm_kb() if have_hwm else None
    return {"forward_s": t1 - t0, "backward_s": t2 - t1, "rss_before_mib": before / 1024,
            "peak_mib": None if peak is None else peak / 1024}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], int(args.worker[1]))), flush=True)
        return
    print(f"custom-op training step, causal softmax, B={B} H={H} N={args.n} D={D} fp32")
    print(f"{'impl':6s} {'forward s':>10s} {'backward s':>11s} {'RSS before MiB':>15s} {'peak MiB':>9s} {'peak - before':>14s}")
    for impl in IMPLS:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", impl, str(args.n)],
                              stdout=subprocess.PIPE, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            print(f"{impl:6s} failed (exit code {proc.returncode})")
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        peak, before = r["peak_mib"], r["rss_before_mib"]
        peak_cells = ("-", "-") if peak is None else (f"{peak:.0f}", f"{peak - before:.0f}")
        print(f"{impl:6s} {r['forward_s']:10.2f} {r['backward_s']:11.2f} {before:15.0f} {peak_cells[0]:>9s} "
              f"{peak_cells[1]:>14s}")

if __name__ == "__main__":
    main()
