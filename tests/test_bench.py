"""The GPU benchmark script runs only where a GPU is lent, once; what it can check here, on CPU,
is checked here: its inputs bind to every fused variant, and its SDPA formulations of the
variants compute what the cascades compute."""
import importlib.util
from pathlib import Path

import pytest
import torch

import einsum_ir as ei
from einsum_ir.params import bind_arguments

BENCH = Path(__file__).parents[1] / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FUSED = [n for n in ei.variants.names() if n not in ("linear_elu", "linear_elu_causal", "flowformer", "softmax_1pass")]


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
