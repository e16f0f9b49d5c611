"""The chunked scan's backward (issue 11, item 6): `ei.grad` differentiates a scanned cascade,
and the backward cascade is lowered by the scan again. A sum over the keys `m <= p` turns into
a sum over the queries `p >= m` (a reverse scan, the last chunk first) for dK and dV, and a
decay's gradient (a sum over both token ranks) into a scan per query, a state per program and
an epilogue over the batch. Gradients are checked against autograd through the interpreter in
fp64, at chunk boundaries, ragged P != M, decays at 1 and near 0, and fp16."""
from __future__ import annotations

import logging

import pytest
import torch

import einsum_ir as ei
from einsum_ir.codegen.scan_cpu import ScanCpuKernel
from einsum_ir.lowering.chunked_scan import ScanPlan, lower
from einsum_ir.lowering.strategy import choose
from support import KERNEL_DEVICE, make_inputs, on_kernel_device

CHUNK = 16
SCANNED = ["lightning_causal", "lightning2", "retnet", "gla_scalar", "linear_elu", "linear_elu_causal", "flowformer"]
CAUSAL = ["lightning_causal", "lightning2", "retnet", "gla_scalar", "linear_elu_causal"]


def _grads(kern, args: dict, seed: int = 1) -> dict:
    leaves = {k: (v.detach().clone().requires_grad_(True) if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in args.items()}
    out = kern(**leaves)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    names = [k for k, v in leaves.items() if torch.is_tensor(v) and v.requires_grad]
    return dict(zip(names, torch.autograd.grad(out, [leaves[n] for n in names], dout)))


def _reference(c, args: dict) -> dict:
    wide = {k: (v.detach().double().cpu() if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in args.items()}
    return _grads(lambda **a: ei.interpret(c, **a), wide)


def _close(got: dict, want: dict, tol: float, what: str) -> None:
    assert got.keys() == want.keys(), what
    for n, w in want.items():
        g = got[n].detach().double().cpu()
        assert torch.isfinite(g).all(), f"{what}: non-finite d{n}"
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(g, w, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}, d{n}: {m}")


def _cpu(c, chunk: int = CHUNK):
    kern = ei.compile(c, backend="cpu")
    assert isinstance(kern, ScanCpuKernel)
    kern.chunk = chunk
    return kern


@pytest.mark.parametrize("name", SCANNED)
def test_the_backward_is_a_scan_too(name, caplog):
    """No recomputation: the backward's kernels are scan kernels; a causal form's dK and dV come
    from a reverse sweep."""
    c = ei.variants.load(name)
    g = ei.grad(c)
    assert g.saved == () and g.prologue is None and g.forward == c
    (b,) = g.backward
    plan, _ = choose(b)
    assert isinstance(plan, ScanPlan)
    assert any(s.reverse for s in plan.sweeps) == (name in CAUSAL)
    args = make_inputs(name, c, P=20, M=20, E=8, F=6, dtype=torch.float64)
    kern = _cpu(c)
    with caplog.at_level(logging.WARNING, logger="einsum_ir"):
        _grads(kern, args)
    assert not [r for r in caplog.records if "no fused backward" in r.getMessage()]
    assert all(isinstance(k, ScanCpuKernel) for k in kern.training.backward)


@pytest.mark.parametrize("name", SCANNED)
@pytest.mark.parametrize("n", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_cpu_gradients_at_chunk_boundaries(name, n):
    c = ei.variants.load(name)
    args = make_inputs(name, c, P=n, M=n, E=8, F=6, B=2, H=2, dtype=torch.float64)
    _close(_grads(_cpu(c), args), _reference(c, args), 1e-9, f"{name} n={n}")


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("P, M", [(20, 45), (45, 20)])
def test_reverse_scan_with_more_keys_or_more_queries(name, P, M):
    """The reverse sweep walks every position of either rank: queries past M still reach the
    keys' sums, keys past P get zero gradients."""
    c = ei.variants.load(name)
    args = make_inputs(name, c, P=P, M=M, E=8, F=6, dtype=torch.float64)
    _close(_grads(_cpu(c), args), _reference(c, args), 1e-9, f"{name} P={P} M={M}")


@pytest.mark.parametrize("lam", [1.0, 1e-3])
def test_decay_gradients_at_one_and_near_zero(lam):
    c = ei.variants.load("lightning_causal")
    args = make_inputs("lightning_causal", c, P=50, M=50, E=8, F=6, B=3, dtype=torch.float64)
    args["Lam"] = torch.full((2,), lam, dtype=torch.float64)
    _close(_grads(_cpu(c), args), _reference(c, args), 1e-9, f"lambda={lam}")


def test_a_decay_gradient_sums_over_both_ranks_and_the_batch():
    """dLam[h] = sum over b, p, m: a scan per query (keeping one feature), a state per program,
    and the sum over B in the epilogue."""
    (b,) = ei.grad(ei.variants.load("lightning_causal")).backward
    plan = lower(b)
    assert plan.epilogue is not None and plan.epilogue.output_names == ["dLam"]
    assert any("summed over the keys per query" in r for r in plan.rewrites)
    assert "dLam" not in {t for s in plan.sweeps for t in s.stores}


def test_fp16_gradients():
    c = ei.variants.load("linear_elu_causal")
    args = make_inputs("linear_elu_causal", c, P=40, M=40, E=8, F=6, dtype=torch.float16)
    got = _grads(_cpu(c), args)
    assert all(g.dtype == torch.float16 for g in got.values())
    _close(got, _reference(c, args), 3e-2, "fp16")


def test_a_decay_with_a_constant_factor_is_split_into_one():
    """pow(l, p - m - 1) is pow(l, -1) times the decay pow(l, p - m): a derivative's shape."""
    spec = ei.variants.source("lightning_causal").replace("pow(Lam[h], p - m)", "pow(Lam[h], p - m - 1)")
    c = ei.parse(spec)
    (term, *_), = [s.terms for s in lower(c).sweeps]
    assert term.decay is not None
    args = make_inputs("lightning_causal", c, P=37, M=37, E=8, F=6, dtype=torch.float64)
    torch.testing.assert_close(_cpu(c)(**args), ei.interpret(c, **args))


def test_a_per_position_sum_over_the_batch_is_taken_by_its_readers():
    """RetNet's normalizer DS[h,p] has no batch rank, so its gradient sums over B per position,
    across programs; its one reader sums it linearly, so the sum over B moves there (exact)
    and ends in the epilogue."""
    (b,) = ei.grad(ei.variants.load("retnet")).backward
    plan = lower(b)
    assert any("summed over them by its readers" in r for r in plan.rewrites)
    assert set(plan.epilogue.output_names) == {"dLam"}
    assert plan.grid == ("b", "h")


def test_a_product_over_three_axes_is_summed_one_feature_at_a_time():
    """sum_{e,f} dKV[e,f] FK[m,e] V[m,f] (Flowformer's backward) spans m, e and f: it becomes
    two sums, each over a two-axis tile."""
    (b,) = ei.grad(ei.variants.load("flowformer")).backward
    plan = lower(b)
    for e in plan.cascade.einsums:
        if not {"p", "m"} <= set(e.space):
            assert len(set(e.space) - set(plan.grid)) <= 2 or len(e.reduced) < 2, e.name


@pytest.mark.parametrize("name", SCANNED)
def test_triton_gradients(name):
    pytest.importorskip("triton")
    c = ei.variants.load(name)
    kern = ei.compile(c, backend="triton")
    kern.chunk = CHUNK
    for n in (CHUNK + 1, 2 * CHUNK + 5):
        args = on_kernel_device(make_inputs(name, c, P=n, M=n, E=8, F=6, B=2, H=2))
        tol = 3e-2 if KERNEL_DEVICE == "cuda" else 2e-4
        _close(_grads(kern, args), _reference(c, args), tol, f"{name} triton n={n}")
    assert all(type(k).__name__ == "ScanTritonKernel" for k in kern.training.backward)


ACROSS = """dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] where m <= p
X[h,p]     = S[b,h,p,m]
O[b,h,p,f] = S[b,h,p,m] * V[b,h,m,f]
T[h]       = READER
output O, T
"""


def test_a_batch_sum_moves_to_a_linear_reader_only():
    """T = sum_p 2 X takes X's sum over B (exact); T = sum_p (X + 1) would count the 1 once per
    batch entry, so X's per-position sum across programs is declined, naming it."""
    c = ei.parse(ACROSS.replace("READER", "X[h,p] * 2"))
    args = make_inputs("linear_elu_causal", c, P=37, M=37, E=8, F=6, B=3, dtype=torch.float64)
    for got, want in zip(_cpu(c)(**args), ei.interpret(c, **args)):
        torch.testing.assert_close(got, want)
    with pytest.raises(ei.LoweringError, match=r"^X sums over b per position"):
        lower(ei.parse(ACROSS.replace("READER", "X[h,p] + 1")))
