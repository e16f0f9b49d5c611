"""The chunked scan's Triton kernels (codegen/scan_triton.py): linear, decayed and gated
attention run as one kernel per sweep, in Triton's interpreter on CPU tensors (compiled on a
GPU), and match the reference interpreter; they compile ahead of time for sm_90 without spills.

The chunk is forced small (16) so that short sequences cross several chunks: N = C-1, C, C+1
and a ragged 37 cover a lone partial chunk, an exact one, one position past it, and a ragged
last chunk after full ones (positions past N must add nothing to a state)."""
import pytest
import torch

import einsum_ir as ei
from support import KERNEL_DEVICE, TOLERANCE, make_inputs, on_kernel_device

triton = pytest.importorskip("triton")

from einsum_ir.codegen.scan_triton import ScanTritonKernel  # noqa: E402

SCANNED = ["flowformer", "lightning2", "lightning_causal", "linear_elu", "linear_elu_causal", "retnet"]
CAUSAL = ["lightning2", "lightning_causal", "linear_elu_causal", "retnet"]
CHUNK = 16


def _kernel(name: str, chunk: int = CHUNK, split_block: int | None = None) -> ScanTritonKernel:
    kern = ei.compile(ei.variants.load(name), backend="triton")
    assert isinstance(kern, ScanTritonKernel)
    kern.chunk, kern.split_block = chunk, split_block
    return kern


def _reference(c, args: dict) -> torch.Tensor:
    """The interpreter on the same inputs in fp32 (half-precision inputs are exact in fp32)."""
    wide = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in args.items()}
    return ei.interpret(c, **wide)


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and not torch.isnan(out).any()
    tol = TOLERANCE if dtype == torch.float32 else 2e-2  # fp16 inputs: rounded output, fp32 states
    torch.testing.assert_close(out.float().cpu(), ref.cpu(), atol=tol, rtol=tol)


def test_scanned_variants_get_one_kernel_per_sweep():
    for name in SCANNED:
        kern = _kernel(name)
        src = kern.source()
        assert src.count("@triton.jit(do_not_specialize") == len(kern.plan.sweeps)
        assert "# Plan:" in src and "strategy: chunked scan" in src
        assert "for t_lo in range(0, " in src  # the sequential loop over chunks
    causal = _kernel("lightning_causal").source()
    assert "O_state = O_state * _pow(" in causal  # the decayed state, named after the output
    assert "tl.dot(Q, tl.trans(K))" in causal  # the intra-chunk scores from the loaded tiles


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n", [CHUNK - 1, CHUNK, CHUNK + 1, 37])
@pytest.mark.parametrize("name", SCANNED)
def test_scan_matches_interpreter(name, n, dtype):
    c = ei.variants.load(name)
    args = on_kernel_device(make_inputs(name, c, P=n, M=n, dtype=dtype))
    _check(_kernel(name)(**args), _reference(c, args), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lam", [1.0, 1e-3])
def test_lightning_decay_extremes(lam, dtype):
    """lambda = 1: no decay (sums grow with N); lambda = 1e-3: ratios across a chunk underflow
    to 0 and those above the diagonal overflow to inf, which must stay out of the state."""
    c = ei.variants.load("lightning_causal")
    args = make_inputs("lightning_causal", c, P=37, M=37, dtype=dtype)
    args["Lam"] = torch.full_like(args["Lam"], lam)
    args = on_kernel_device(args)
    _check(_kernel("lightning_causal")(**args), _reference(c, args), dtype)


@pytest.mark.parametrize("name", ["lightning_causal", "linear_elu_causal", "linear_elu", "flowformer"])
def test_split_feature_blocks_match(name):
    """The kept feature split across programs in blocks of 16 (F = 40: three blocks, the last
    ragged): each program holds its block of the state and recomputes the scores."""
    c = ei.variants.load(name)
    args = on_kernel_device(make_inputs(name, c, P=37, M=37, E=24, F=40))
    kern = _kernel(name, split_block=16)
    assert any(em.split for em in kern.emitters)
    _check(kern(**args), _reference(c, args), torch.float32)


@pytest.mark.parametrize("pm", [(33, 40), (50, 17)], ids=["P<M", "P>M"])
@pytest.mark.parametrize("name", CAUSAL + ["linear_elu"])
def test_queries_and_keys_of_different_lengths(name, pm):
    """Causal: query p sees the keys m <= p that exist (none past M); the scan walks P."""
    c = ei.variants.load(name)
    args = on_kernel_device(make_inputs(name, c, P=pm[0], M=pm[1]))
    _check(_kernel(name)(**args), _reference(c, args), torch.float32)


def test_the_gpu_config_is_the_first_candidate_without_spills():
    from einsum_ir.codegen.scan_triton import CANDIDATES

    kern = ei.compile(ei.variants.load("lightning_causal"), backend="triton")
    ext = {"B": 1, "H": 2, "P": 4096, "M": 4096, "E": 128, "F": 128}
    config = kern.config_for(ext, "bf16", "sm_90")
    chosen = kern.resource_usage(ext)
    assert chosen["spills"] == chosen["stack"] == 0
    for earlier in CANDIDATES[:CANDIDATES.index(config)]:
        u = kern.resource_usage(ext, config=earlier)
        assert u["spills"] + u["stack"] > 0, earlier
    (em,) = kern.emitters
    blocks = em.blocks(ext, config)
    assert blocks == {"BLOCK_C": config.chunk, "BLOCK_E": 128, "BLOCK_F": min(128, config.feature_block)}
    assert f"grid (2, {128 // blocks['BLOCK_F']})" in kern.source(ext)  # (b, h) x the blocks of f


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="bf16 dots are wrong in Triton 3.9's interpreter")
@pytest.mark.parametrize("name", CAUSAL)
def test_bf16_on_gpu(name):
    c = ei.variants.load(name)
    args = on_kernel_device(make_inputs(name, c, P=300, M=300, E=64, F=64, dtype=torch.bfloat16))
    out = ei.compile(c, backend="triton")(**args)
    torch.testing.assert_close(out.float(), _reference(c, args), atol=5e-2, rtol=5e-2)


@pytest.fixture(scope="module")
def scan_usage():
    """sm_90 AOT compiles at head dims 64 and 128 at each kernel's chosen config (chosen by
    compiling the candidates: one clean subprocess per kernel when this process interprets
    Triton), then in one batch."""
    from einsum_ir.codegen.aot import resource_usage_batch

    keys = [(n, d) for n in ("lightning_causal", "linear_elu_causal") for d in (64, 128)]
    kernels = {n: ei.compile(ei.variants.load(n), backend="triton") for n, _ in keys}
    shapes = {d: {"B": 2, "H": 8, "P": 4096, "M": 4096, "E": d, "F": d} for _, d in keys}
    items = [(kernels[n], shapes[d], "bf16", "sm_90", kernels[n].config_for(shapes[d], "bf16", "sm_90"))
             for n, d in keys]
    return dict(zip(keys, resource_usage_batch(items)))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", ["lightning_causal", "linear_elu_causal"])
def test_aot_sm90_without_spills(name, head_dim, scan_usage):
    u = scan_usage[(name, head_dim)]
    assert u["spills"] == 0 and u["stack"] == 0 and u["registers"] <= 255, u
    assert u["wgmma"], "expected Hopper wgmma for the chunk's dots"
    assert all(st["async_loads"] > 0 for st in u["stages"]), u  # the chunk loads are pipelined
