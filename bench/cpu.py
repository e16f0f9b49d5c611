"""CPU benchmark: einsum-ir's tiled CPU path next to FlexAttention, SDPA and eager PyTorch.

    python bench/cpu.py                # the full table (a few minutes on 2 cores)
    python bench/cpu.py --quick        # N=2048 only
    python bench/cpu.py --n 2048 --cases causal
    python bench/cpu.py --profile window 2048    # where the time goes: torch's profiler, ours and flex
    python bench/cpu.py --backward     # forward + backward (a training step's attention)
    python bench/cpu.py --linear       # linear forms: the chunked scan at N in {2048, 8192, 32768}
    python bench/cpu.py --linear --backward   # the same, forward + the scan's backward
    python bench/cpu.py --decode       # decode steps: one query against a KV cache, contiguous and paged

Cases: causal, sliding window (W=512) and softplus-L1 attention at N in {2048, 8192}, B=1,
H=8, D=64, fp32. With --linear: Lightning's decayed causal linear attention (`lightning_causal`,
a decay per head in [0.9, 0.999]) and causal linear attention with elu+1 feature maps
(`linear_elu_causal`) at N in {2048, 8192, 32768}; the table then ends with each
implementation's time ratio t(32768)/t(2048): 16 is linear, 256 quadratic. With --decode: one
decode step (P=1) of B=8 sequences, 32 query heads on 8 KV heads, D=128, against a cache of
M in {4096, 32768} keys, fp32: `contiguous` (catalog `softmax_gqa`, K/V as (B, 8, M, D)) and
`paged16`, `paged128` (catalog `paged_decode`: the cache is a pool of pages of 16 or 128
keys in shuffled order, read through a block table; its lengths are all M). SDPA and eager
have no paged form: on the paged cases they first gather the pages into a contiguous cache
(what a user of theirs does), and so does FlexAttention (compiled once, for the contiguous
cache it is handed), so every time includes the gather; the table then adds
each paged case's time over ours on the contiguous one. Each implementation of each (case, N) runs in its own fresh subprocess,
ours first, so that no process holds two OpenMP runtimes: FlexAttention's Inductor-compiled
code brings a second one, and the idle threads of one runtime then steal the cores of the
other (or, with OMP_WAIT_POLICY=PASSIVE, every op of the other pays to wake its threads);
either way a shared process skews the comparison by 1.5-7x. Each worker builds its
implementation and then measures:

* peak memory: one warm-up call (it compiles FlexAttention and initializes thread pools and
  libraries), then one measured call: the process's peak resident set during it (VmHWM, reset
  through /proc/self/clear_refs after a malloc_trim) minus the resident set just before it,
  plus the bytes of anything built for it beforehand (SDPA's and eager's N x N boolean masks,
  FlexAttention's block mask). The Q, K, V inputs are not counted. This is RSS, so it sees
  torch's CPU allocations (which tracemalloc does not).
* time: the measured call above, then R more calls (R=3 at N<=2048, 2 above), and more while
  under 3 seconds are timed (up to 40 calls); the table shows the best.
* error: max |output - einsum-ir's output| (with --backward, over the output and dQ, dK, dV);
  ours saves its results to a temporary file that the other workers compare with.

With --backward every call is forward plus backward: Q, K, V require grad, the output's
backward runs with a fixed random gradient, and the gradients are part of the call (their
3 x N x D floats count in the peak memory of every implementation alike). Ours is the fused
backward derived by `ei.grad` (docs/backward.md). FlexAttention has no CPU backward in torch
2.13 (it raises "FlexAttention does not support backward on CPU"); the table says so.

The implementations:
  ours   `codegen.cpu_emit.compile_cpu(variant)`: generated tiled PyTorch (O(N) memory).
  flex   `torch.compile(flex_attention)` with a block mask from
         `create_block_mask(..., device="cpu")`; softplus-L1 as softmax of
         `log(softplus(s * lscale))` (= L1-normalized softplus), scale=1.
  sdpa   `F.scaled_dot_product_attention`: `is_causal=True` for causal, a boolean N x N mask
         for the window; softplus-L1 is not a softmax, so SDPA cannot express it.
  eager  what a PyTorch user writes: scores = Q K^T * scale, masked_fill(-inf), softmax, @ V
         (softplus-L1: softplus(Q K^T * lscale), normalize(p=1), @ V; the linear forms: the
         masked, decayed or feature-mapped Q K^T, @ V). Materializes N x N.
  quadratic  (linear cases) our own key-loop kernel of the same cascade, the form the chunked
         scan replaces: `CpuKernel(variant, plan=key_loop_plan(...))`. Forward only: with
         --backward ours is the scan's derived backward (reverse sweeps) and eager is autograd.
Timings on a shared machine are noisy; the ratios measured side by side in one run are the
result, never an absolute number.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

B, H, D = 1, 8, 64
WINDOW = 512
CASES = {"causal": "softmax_causal", "window": "softmax_window", "softplus_l1": "softplus_l1"}
MIN_TIMED_S, MAX_CALLS = 3.0, 40
LINEAR_CASES = {"lightning": "lightning_causal", "linear_elu": "linear_elu_causal"}
IMPLS = ["ours", "flex", "sdpa", "eager"]
LINEAR_IMPLS = ["ours", "quadratic", "eager"]
LINEAR_NS = [2048, 8192, 32768]
DECODE_CASES = {"contiguous": None, "paged16": 16, "paged128": 128}  # page size
DECODE_NS = [4096, 32768]
DECODE_B, DECODE_H, DECODE_KV, DECODE_D = 8, 32, 8, 128


def decays(torch):
    """Lightning's per-head decay rates, spread over [0.9, 0.999]."""
    return torch.linspace(0.9, 0.999, H)


# ----------------------------------------------------------------------------- the worker

def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _hwm_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _tensor_bytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    total = 0
    for v in getattr(obj, "__dict__", {}).values():
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, (tuple, list)):
            total += sum(x.numel() * x.element_size() for x in v if isinstance(x, torch.Tensor))
    return total


def build(impl: str, case: str, n: int, q, k, v):
    """(callable, bytes built beforehand) for one implementation, or raise with the reason."""
    import torch
    import torch.nn.functional as F

    scale = 1.0 / math.sqrt(D)
    lscale = math.log(D) * math.log(n) / math.sqrt(D)
    if case in LINEAR_CASES:
        return build_linear(impl, case, n, q, k, v)
    if case in DECODE_CASES:
        return build_decode(impl, case, n, q, k, v)
    if impl == "quadratic":
        raise NotImplementedError("ours is the key loop already")
    if impl == "ours":
        import einsum_ir as ei
        from einsum_ir.codegen.cpu_emit import compile_cpu

        kern = compile_cpu(ei.variants.load(CASES[case]))
        extra = {"W": WINDOW} if case == "window" else {}
        return (lambda: kern(Q=q, K=k, V=v, **extra)), 0
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    if impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        fa = torch.compile(flex_attention)
        if case == "causal":
            bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, n, n, device="cpu")
            return (lambda: fa(q, k, v, block_mask=bm)), _tensor_bytes(bm)
        if case == "window":
            bm = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki < WINDOW), None, None, n, n,
                                   device="cpu")
            return (lambda: fa(q, k, v, block_mask=bm)), _tensor_bytes(bm)

        def score_mod(s, b, h, qi, ki):
            return torch.log(F.softplus(s * lscale))

        return (lambda: fa(q, k, v, score_mod=score_mod, scale=1.0)), 0
    if impl == "sdpa":
        if case == "causal":
            return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), 0
        if case == "window":
            mask = (j <= i) & (i - j < WINDOW)
            return (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)), _tensor_bytes(mask)
        raise NotImplementedError("not a softmax")
    if impl == "eager":
        if case == "softplus_l1":
            def run():
                a = F.softplus((q @ k.transpose(-1, -2)) * lscale)
                return F.normalize(a, p=1.0, dim=-1) @ v
            return run, 0
        mask = (j <= i) if case == "causal" else (j <= i) & (i - j < WINDOW)

        def run():
            s = (q @ k.transpose(-1, -2)) * scale
            s = s.masked_fill(~mask, float("-inf"))
            return torch.softmax(s, dim=-1) @ v
        return run, _tensor_bytes(mask)
    raise ValueError(impl)


def build_linear(impl: str, case: str, n: int, q, k, v):
    """The linear cases: the chunked scan, our quadratic key loop, and eager PyTorch."""
    import torch
    import torch.nn.functional as F

    extra = {"Lam": decays(torch)} if case == "lightning" else {}
    if impl in ("ours", "quadratic"):
        import einsum_ir as ei
        from einsum_ir.codegen.cpu_emit import CpuKernel, compile_cpu
        from einsum_ir.codegen.names import spell
        from einsum_ir.lowering.strategy import key_loop_plan

        c = ei.variants.load(LINEAR_CASES[case])
        if impl == "ours":
            kern = compile_cpu(c)
        else:
            try:
                kern = CpuKernel(c, plan=key_loop_plan(spell(c).cascade))
            except ei.LoweringError as err:
                raise NotImplementedError(f"no key loop: {str(err)[:40]}") from None
        return (lambda: kern(Q=q, K=k, V=v, **extra)), 0
    if impl != "eager":
        raise NotImplementedError("not a softmax")
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    if case == "lightning":
        weights = torch.where(j <= i, extra["Lam"][:, None, None] ** (i - j).clamp(min=0), 0.0)

        def run():
            return ((q @ k.transpose(-1, -2)) * weights) @ v
        return run, _tensor_bytes(weights)
    mask = j <= i

    def run():
        fq, fk = F.elu(q) + 1, F.elu(k) + 1
        a = (fq @ fk.transpose(-1, -2)).masked_fill(~mask, 0.0)
        return (a @ v) / a.sum(-1, keepdim=True)
    return run, _tensor_bytes(mask)


def paged_cache(k, v, page: int, seed: int = 0):
    """K and V (B, G, M, D) as a pool of pages (page, slot, head, dim) in shuffled order, and
    the block table Tbl[b, j]: the page that holds keys j*page ... (j+1)*page - 1 of sequence b."""
    import torch

    b, g, m, d = k.shape
    pages = m // page
    order = torch.randperm(b * pages, generator=torch.Generator().manual_seed(seed))
    table = order.reshape(b, pages).to(torch.int32)
    pool_k, pool_v = (torch.empty(b * pages, page, g, d, dtype=k.dtype) for _ in range(2))
    for pool, x in ((pool_k, k), (pool_v, v)):
        pool[order] = x.reshape(b, g, pages, page, d).permute(0, 2, 3, 1, 4).reshape(b * pages, page, g, d)
    return pool_k, pool_v, table


def gathered(pool, table):
    """The contiguous (B, G, M, D) cache of a paged pool: what SDPA, FlexAttention and eager
    need first."""
    b, pages = table.shape
    _, page, g, d = pool.shape
    return pool[table.long()].reshape(b, pages * page, g, d).transpose(1, 2)


def build_decode(impl: str, case: str, n: int, q, k, v):
    """One decode step: ours (contiguous or paged), SDPA, FlexAttention and eager; the paged
    cases hand the others the pages gathered into a contiguous cache."""
    import torch
    import torch.nn.functional as F

    page = DECODE_CASES[case]
    b, h, _, d = q.shape
    g = k.shape[1]
    if page is not None:
        pool_k, pool_v, table = paged_cache(k, v, page)
    if impl == "ours":
        import einsum_ir as ei

        qg = q.reshape(b, g, h // g, 1, d)
        if page is None:
            kern = ei.compile(ei.variants.load("softmax_gqa"), backend="cpu")
            return (lambda: kern(Q=qg, K=k, V=v).reshape(b, h, 1, -1)), 0
        kern = ei.compile(ei.variants.load("paged_decode"), backend="cpu")
        lengths = torch.full((b,), n, dtype=torch.int32)
        return (lambda: kern(Q=qg, Kc=pool_k, Vc=pool_v, Tbl=table, Len=lengths, M=n).reshape(b, h, 1, -1)), 0
    if impl == "quadratic":
        raise NotImplementedError("a softmax: no scan")
    cache = (lambda: (k, v)) if page is None else (lambda: (gathered(pool_k, table), gathered(pool_v, table)))
    if impl == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        fa = torch.compile(flex_attention)  # compiled once; each call gathers like SDPA's

        def run():
            kk, vv = cache()
            return fa(q, kk, vv, enable_gqa=True)
        return run, 0
    if impl == "sdpa":
        def run():
            kk, vv = cache()
            return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)
        return run, 0

    def run():
        kk, vv = cache()
        kk, vv = kk.repeat_interleave(h // g, dim=1), vv.repeat_interleave(h // g, dim=1)
        return torch.softmax((q @ kk.transpose(-1, -2)) / math.sqrt(d), dim=-1) @ vv
    return run, 0


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def with_backward(fn, q, k, v, dout):
    """fn followed by the backward of its output: returns the output and dQ, dK, dV."""
    def step():
        for t in (q, k, v):
            t.grad = None
        out = fn()
        out.backward(dout)
        return out.detach(), q.grad, k.grad, v.grad
    return step


def case_inputs(case: str, n: int, g, backward: bool = False):
    """Q, K, V of a case: one query per sequence against its keys for decode, else N of each."""
    import torch

    if case in DECODE_CASES:
        q = torch.randn(DECODE_B, DECODE_H, 1, DECODE_D, generator=g)
        k, v = (torch.randn(DECODE_B, DECODE_KV, n, DECODE_D, generator=g) for _ in range(2))
        return q, k, v
    return tuple(torch.randn(B, H, n, D, generator=g).requires_grad_(backward) for _ in range(3))


def worker(case: str, n: int, impl: str, rounds: int, backward: bool, ref: str) -> dict:
    """One implementation's measurements. Ours writes its results to `ref`; the others compare
    with them there."""
    import torch

    g = torch.Generator().manual_seed(0)
    q, k, v = case_inputs(case, n, g, backward)
    dout = torch.randn(*q.shape[:-1], v.shape[-1], generator=g)
    if backward and (impl == "quadratic" or case in DECODE_CASES):  # its training kernels would be the scan's again
        return {"status": "n/a (forward only)"}
    try:
        fn, setup_bytes = build(impl, case, n, q, k, v)
    except NotImplementedError as err:
        return {"status": f"n/a ({err})"}
    if backward:
        fn = with_backward(fn, q, k, v, dout)
    try:
        out = fn()  # warm-up: compiles flex, initializes thread pools and libraries
        _malloc_trim()
        have_hwm = _reset_hwm()
        base = _rss_kb()
        t0 = time.perf_counter()
        fn()
        times = [time.perf_counter() - t0]
        peak = _hwm_kb() - base if have_hwm else None
    except Exception as err:  # noqa: BLE001 - report, don't crash the table
        return {"status": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"}
    res = {"status": "ok", "peak_mb": None if peak is None else (peak * 1024 + setup_bytes) / 2**20}
    print(f"    {impl}: measured call {times[0] * 1e3:.0f} ms, peak {res['peak_mb']:.0f} MiB", file=sys.stderr,
          flush=True)
    # at least `rounds` more calls; short ones repeat until 3 s are timed, so that a few
    # milliseconds of interference do not decide a small case (and with it a scaling ratio)
    while len(times) <= rounds or (sum(times) < MIN_TIMED_S and len(times) < MAX_CALLS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    res["time"] = min(times)
    out = out if isinstance(out, tuple) else (out,)
    if impl == "ours":
        torch.save([t.detach() for t in out], ref)
    elif os.path.exists(ref):
        res["err"] = max(float((a.detach().float() - b.float()).abs().max()) for a, b in zip(out, torch.load(ref)))
    return res


def profile(case: str, n: int, impls: list[str]) -> None:
    """torch.profiler's op table for one call of each implementation (after a warm-up)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    q, k, v = case_inputs(case, n, torch.Generator().manual_seed(0))
    for impl in impls:
        fn, _ = build(impl, case, n, q, k, v)
        fn()
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"{impl}, {case} N={n}: {wall * 1e3:.0f} ms unprofiled")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


# ----------------------------------------------------------------------------- the parent

def run_case(case, n, impls, rounds, backward=False) -> dict:
    """Each implementation in its own fresh worker process, ours first (the others compare with
    its results)."""
    import tempfile

    t0 = time.time()
    print(f"  {case} N={n}:", file=sys.stderr, flush=True)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref = os.path.join(tmp, "ours.pt")
        for impl in impls:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", case, str(n), impl, str(rounds), ref]
            cmd += ["--backward"] if backward else []
            try:
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=1800,
                                      check=False)
            except subprocess.TimeoutExpired:
                res[impl] = {"status": "timed out (1800 s)"}
                continue
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
                res[impl] = {"status": f"failed: {why}"}
                continue
            res[impl] = json.loads(lines[-1][len("RESULT "):])
    print(f"  {case} N={n} done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return res


def fmt_time(r) -> str:
    return f"{r['time'] * 1e3:.0f}" if r.get("status") == "ok" else "-"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--cases", nargs="+", default=list(CASES),
                    choices=list(CASES) + list(LINEAR_CASES) + list(DECODE_CASES))
    ap.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS + ["quadratic"])
    ap.add_argument("--quick", action="store_true", help="N=2048 only")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3 at N<=2048, else 2)")
    ap.add_argument("--backward", action="store_true", help="time forward + backward (dQ, dK, dV)")
    ap.add_argument("--linear", action="store_true", help="the linear cases (chunked scan) at N up to 32768")
    ap.add_argument("--decode", action="store_true", help="decode steps (P=1) against KV caches, contiguous and paged")
    ap.add_argument("--worker", nargs=5, metavar=("CASE", "N", "IMPL", "ROUNDS", "REF"), help=argparse.SUPPRESS)
    ap.add_argument("--profile", nargs=2, metavar=("CASE", "N"), help="print torch profiler tables of one case")
    args = ap.parse_args(argv)
    if args.profile:
        profile(args.profile[0], int(args.profile[1]), [i for i in args.impls if i in ("ours", "flex")])
        return
    if args.worker:
        case, n, impl, rounds, ref = args.worker
        res = worker(case, int(n), impl, int(rounds), args.backward, ref)
        print("RESULT " + json.dumps(res), flush=True)
        return
    import torch

    ns = [2048] if args.quick else args.n
    impls = ["ours"] + [i for i in args.impls if i != "ours"]
    if args.linear:
        args.cases = list(LINEAR_CASES)
        ns = [2048] if args.quick else (args.n if args.n != ap.get_default("n") else LINEAR_NS)
        impls = LINEAR_IMPLS
    if args.decode:
        args.cases = [c for c in args.cases if c in DECODE_CASES] or list(DECODE_CASES)
        ns = [4096] if args.quick else (args.n if args.n != ap.get_default("n") else DECODE_NS)
    results = {}
    load0 = os.getloadavg()[0]
    t0 = time.time()
    shape = (f"B={DECODE_B} H={DECODE_H} on {DECODE_KV} KV heads D={DECODE_D} P=1" if args.decode else
             f"B={B} H={H} D={D}")
    print(f"einsum-ir CPU benchmark: {shape} fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {load0:.1f}", file=sys.stderr)
    for n in ns:
        rounds = args.rounds or (3 if n <= 2048 else 2)
        for case in args.cases:
            res = run_case(case, n, impls, rounds, args.backward)
            for impl in impls:
                results[impl, case, n] = res.get(impl, {"status": "-"})
    what = "forward + backward" if args.backward else "forward"
    print(f"einsum-ir CPU benchmark, {what}: {shape} fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {load0:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; {time.time() - t0:.0f} s")
    print()
    print_table(results, ns, args.cases, impls)
    if args.decode:
        print_paged_overhead(results, ns, args.cases)
    if args.linear and len(ns) > 1:
        print_scaling(results, ns, args.cases, impls)


def print_paged_overhead(results, ns, cases) -> None:
    """Ours on each paged case over ours on the contiguous cache (1.00: paging is free)."""
    print()
    print("paged over contiguous (ours):")
    for case in [c for c in cases if DECODE_CASES[c] is not None]:
        cells = []
        for n in ns:
            a, b = results.get(("ours", "contiguous", n), {}), results.get(("ours", case, n), {})
            ok = a.get("status") == b.get("status") == "ok"
            cells.append(f"M={n} {b['time'] / a['time']:.2f}" if ok else f"M={n} -")
        print(f"  {case}: " + ", ".join(cells))


def print_scaling(results, ns, cases, impls) -> None:
    """t(largest N)/t(smallest N) per implementation and case: linear is the ratio of the Ns."""
    lo, hi = ns[0], ns[-1]
    print()
    print(f"scaling t(N={hi})/t(N={lo}) (linear: {hi / lo:.0f}, quadratic: {(hi / lo) ** 2:.0f}):")
    for case in cases:
        cells = []
        for i in impls:
            a, b = results.get((i, case, lo), {}), results.get((i, case, hi), {})
            ok = a.get("status") == b.get("status") == "ok"
            cells.append(f"{i} {b['time'] / a['time']:.1f}" if ok else f"{i} -")
        print(f"  {case}: " + ", ".join(cells))


def print_table(results, ns, cases, impls) -> None:
    head = ["case", "N"] + [f"{i} ms" for i in impls] + [f"{i}/ours" for i in impls if i != "ours"] + \
           [f"{i} MiB" for i in impls]
    rows = []
    notes = []
    for case in cases:
        for n in ns:
            rs = [results.get((i, case, n), {"status": "-"}) for i in impls]
            ours = rs[0]
            row = [case, str(n)] + [fmt_time(r) for r in rs]
            for i, r in zip(impls[1:], rs[1:]):
                if r.get("status") == "ok" and ours.get("status") == "ok":
                    row.append(f"{r['time'] / ours['time']:.2f}x")
                else:
                    row.append("-")
            row += [f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "-" for r in rs]
            rows.append(row)
            for i, r in zip(impls, rs):
                if r.get("status") != "ok":
                    notes.append(f"{i} on {case} N={n}: {r.get('status')}")
                elif r.get("err") is not None and r["err"] > 1e-3:
                    notes.append(f"{i} on {case} N={n}: max |diff| vs ours {r['err']:.2e}")
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(head)]
    line = "  ".join(h.rjust(w) for h, w in zip(head, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print()
    print("ms: best of the measured call and the next ones (3 more at N<=2048, 2 above; short calls repeat")
    print("    until 3 s are timed, up to 40), after a")
    print("    warm-up call (FlexAttention's compile excluded). One fresh subprocess per implementation.")
    print("x/ours: that implementation's time divided by ours (>1: ours is faster).")
    print("MiB: peak RSS during one call (after a warm-up call) above the RSS before it, plus")
    print("     masks/block masks built beforehand; Q, K, V are not counted.")
    errs = [(i, c, n, results[i, c, n].get("err")) for i in impls for c in cases for n in ns
            if results.get((i, c, n), {}).get("err") is not None and i != "ours"]
    if errs:
        worst = max(errs, key=lambda x: x[3])
        print(f"Outputs agree with ours: worst max |diff| {worst[3]:.1e} ({worst[0]}, {worst[1]}, N={worst[2]}).")
    for note in notes:
        print("note: " + note)


if __name__ == "__main__":
    main()
