"""The GPU benchmark script runs only where a GPU is lent, once; what it can check here, on CPU,
is checked here: its inputs bind to every fused variant, and its SDPA formulations of the
variants compute what the cascades compute."""
import importlib.util
from pathlib import Path

import pytest
import torch

import einsum_ir as ei
from einsum_ir.params import bind_arguments
from support import NOT_FUSED

BENCH = Path(__file__).parents[1] / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FUSED = [n for n in ei.variants.names()
         if n not in ("linear_elu", "linear_elu_causal", "flowformer", "softmax_1pass") + tuple(NOT_FUSED)]


@pytest.mark.parametrize("name", FUSED)
def test_inputs_bind_and_sdpa_formulations_agree(gpu_bench, name):
    c = ei.variants.load(name)
    args = gpu_bench.check_inputs(name, c, "cpu", torch.float32)
    bind_arguments(c, dict(args))  # raises on a missing, mis-shaped or unexpected argument
    run_sdpa = gpu_bench.sdpa_fn(name, args)
    if run_sdpa is None:
        pytest.skip(f"SDPA cannot express {name} (the script prints n/a)")
    want = ei.interpret(c, **args)
    want = want[0] if isinstance(want, tuple) else want  # SDPA gives O only (no LSE)
    got = run_sdpa().reshape(want.shape)  # GQA: SDPA's G*R query heads are the cascade's (G, R)
    ok, err, why = gpu_bench.close(got, want, 1e-4, 1e-4)
    assert ok, f"{name}: {why} (max err {err:.1e})"


def test_the_roof_kernel_computes_attention():
    """bench/roof.py's hand-written FlashAttention-2 kernel matches SDPA (Triton's interpreter)."""
    from einsum_ir.codegen.aot import _interpreting

    if not _interpreting():
        pytest.skip("runs on CPU tensors in Triton's interpreter")
    spec = importlib.util.spec_from_file_location("roof", Path(__file__).parents[1] / "bench" / "roof.py")
    roof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roof)
    assert roof.check() < 1e-5


def test_the_roof_kernel_is_pipelined_like_the_generated_ones():
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "bench" / "roof.py"
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, check=True).stdout
    rows = [line.split() for line in out.splitlines()[1:]]
    assert len(rows) == 8
    for row in rows:  # registers, spills, shared, async loads, async mma: last five columns
        regs, spills, _, loads, mma = map(int, row[-5:])
        assert spills == 0 and loads > 0 and mma > 0, row


@pytest.mark.parametrize("name", ["softmax_causal", "bias_tensor"])
def test_the_training_check_passes_on_the_fused_backward(gpu_bench, name):
    """Phase 3's gradient check, on CPU tensors (Triton's interpreter, or the GPU if there is one)."""
    from support import KERNEL_DEVICE, TOLERANCE

    kern = ei.compile(ei.variants.load(name), backend="triton")
    status, msg = gpu_bench.check_training(kern, name, KERNEL_DEVICE, torch.float32, tol=TOLERANCE)
    assert status == "PASS", msg
    assert "Q" in msg and "V" in msg


def test_the_decode_cases_page_the_cache_exactly():
    """bench/cpu.py's paged cache (shared by bench/gpu.py's decode phase): pages in shuffled
    order behind a block table, gathered back into the contiguous cache exactly."""
    spec = importlib.util.spec_from_file_location("bench_cpu", Path(__file__).parents[1] / "bench" / "cpu.py")
    cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu)
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, 3, 64, 8, generator=g) for _ in range(2))
    pool_k, pool_v, table = cpu.paged_cache(k, v, 16)
    assert pool_k.shape == (8, 16, 3, 8) and table.shape == (2, 4) and table.dtype == torch.int32
    assert sorted(table.flatten().tolist()) == list(range(8)) and table.flatten().tolist() != list(range(8))
    assert torch.equal(cpu.gathered(pool_k, table), k) and torch.equal(cpu.gathered(pool_v, table), v)
