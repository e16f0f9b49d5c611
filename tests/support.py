"""Helpers shared by the kernel tests: random inputs built from a cascade's declarations, the
output comparison every backend is held to, and an empty kernel cache (`fresh`)."""
from __future__ import annotations


import pytest
import torch

from einsum_ir.ir import rank_of

# Where generated Triton kernels run in the tests: the GPU when there is one (compiled), else
# CPU tensors in Triton's interpreter. A GPU's fp32 dots use TF32, hence its looser tolerance.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = 3e-2 if KERNEL_DEVICE == "cuda" else 2e-4


def on_kernel_device(args: dict) -> dict:
    """The arguments with every tensor moved to KERNEL_DEVICE."""
    return {k: v.to(KERNEL_DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


# Catalog variants a fused backend does not lower, with words of the LoweringError it raises
# (docs/catalog.md has each one's reason).
NOT_FUSED: dict[str, str] = {}


# runtime params per variant; extents P, M are set by the caller
PARAMS = {
    "softmax_window": {"W": 7},
    "sinks_window": {"NS": 3, "W": 9},
    "nbhd_1d": {"W": 9, "ST": 2},
    "nbhd_2d": {"WX": 3, "WY": 5, "SX": 1, "SY": 2},
    "softcap": {"cap": 5.0},
    "moba": {"BS": 8},
    "diff_attn": {"lam": 0.6},
    "shifted_sparse": {"GS": 8, "NS": 2},
    "radial": {"FS": 6},
    "hip": {"BQ": 16, "BK": 4, "TK": 3},
    "vmoba": {"BT": 2, "BY": 2, "BX": 3},
    "psa": {"BS": 8},
    "landmark": {"L": 4},  # a power of two: Triton's key tiles hold whole groups (tests/test_groups.py: any L)
}

# vmoba's video grid (T, Y, X), the same for queries and keys; its block counts follow.
VIDEO_GRID = (3, 4, 5)


def _extents(name: str, params: dict, ext: dict) -> None:
    """The extents of the block, frame and grid ranks of the variants that have them."""
    P, M = ext["P"], ext["M"]
    if name == "vmoba":
        for q, k, n, blk in zip(("PT", "PY", "PX"), ("MT", "MY", "MX"), VIDEO_GRID, ("BT", "BY", "BX")):
            ext[q] = ext[k] = n
            ext["Q" + q[1]] = ext["K" + q[1]] = -(-n // params[blk])
    elif name == "hip":
        ext["QB"], ext["KB"] = -(-P // params["BQ"]), -(-M // params["BK"])
    elif name == "psa":
        ext["QB"], ext["KB"] = -(-P // params["BS"]), -(-M // params["BS"])
    elif name == "radial":
        ext["T"] = -(-max(P, M) // params["FS"])  # frame distances
    elif name == "landmark":
        ext["G"] = -(-M // params["L"])  # blocks: no input declares the rank, the call gives it
    elif name == "paged_decode":  # pages of T tokens, enough table slots for M keys
        ext.setdefault("T", 8)
        ext.setdefault("J", -(-M // ext["T"]))


def _integer_input(name: str, shape: list[int], params: dict, g: torch.Generator) -> torch.Tensor:
    """Integer inputs by what they mean: spans, band widths, rankings, pyramid levels."""
    if name == "masformer_heads":  # one short span, one full head, and so on
        return torch.tensor([[5, 10_000][i % 2] for i in range(shape[0])], dtype=torch.int32)
    if name == "radial":
        from einsum_ir.variants.formulas import radial_widths
        return radial_widths(shape[0], params["FS"])
    if name == "hip":
        return torch.argsort(torch.rand(shape, generator=g), dim=-1).argsort(dim=-1).to(torch.int32)
    return torch.randint(0, 3, shape, generator=g).to(torch.int32)  # psa's levels 0, 1, 2


# Causal softmax with an LSE output: the spec several test files parse, build or vary.
CAUSAL_SOFTMAX_LSE = """dims B H P M E F
param scale = 1/sqrt(E)
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale where m <= p
GM[b,h,p]   = max[m] S[b,h,p,m]
SN[b,h,p,m] = exp(S[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m]
O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]
LSE[b,h,p]  = GM[b,h,p] + log(SD[b,h,p])
output O, LSE fill -inf
"""


def make_inputs(name: str, c, P: int = 33, M: int = 40, E: int = 24, F: int = 20, B: int = 1, H: int = 2,
                dtype=torch.float32, device="cpu", seed: int = 0, extra: dict | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    params = dict(PARAMS.get(name, {}))
    ext = {"B": B, "H": H, "P": P, "M": M, "E": E, "F": F, "N": 12, "R": 3, "G": 2,
           "PX": 5, "PY": 7, "MX": 5, "MY": 7}
    if "BS" in params:
        ext["PB"] = -(-P // params["BS"])
        ext["MB"] = -(-M // params["BS"])
    if extra:
        ext.update({k: v for k, v in extra.items() if k.isupper() and len(k) <= 2 and k in c.dims})
        params.update({k: v for k, v in extra.items() if k not in c.dims})
    _extents(name, params, ext)
    for r in c.cross_rank_reads:  # an input read at another rank's index: equal extents
        ext[rank_of(r.var)] = ext[rank_of(r.declared)]
    args = {}
    for d in c.inputs:
        shape = [ext[i.upper()] for i in d.indices]
        if d.dtype == "bool":
            t = torch.rand(shape, generator=g) < 0.6
        elif d.dtype == "int32":
            t = _integer_input(name, shape, params, g)
        elif name == "dma" and d.name == "A":  # A <= 0: the value-derived bias lies in (0, 1]
            t = -torch.rand(shape, generator=g).to(dtype)
        elif d.name in ("Slope", "Lam", "Rho"):  # floating inputs share one dtype (docs/spec.md)
            t = (torch.rand(shape, generator=g) * 0.5 + 0.25).to(dtype)
        elif d.name == "G":  # cumulative log-gates (gla_scalar): non-increasing along the sequence
            t = torch.cumsum(torch.nn.functional.logsigmoid(torch.randn(shape, generator=g) + 2), -1).to(dtype)
        else:
            t = torch.randn(shape, generator=g).to(dtype)
        args[d.name] = t.to(device)
    args.update(params)
    if name == "landmark":
        args["G"] = ext["G"]
    if name == "paged_decode":  # a block table as an allocator leaves it; M keys at most
        from einsum_ir.variants.formulas import paged_tables
        args["Tbl"], args["Len"] = paged_tables(ext["B"], ext["J"], ext["N"], ext["T"], g,
                                                empty=1 if ext["B"] > 1 else None)
        args["Len"] = args["Len"].clamp(max=M).to(device)
        args["Tbl"], args["M"] = args["Tbl"].to(device), M
    return args


def assert_outputs_close(got, want, atol: float | None = None, rtol: float | None = None) -> None:
    """Outputs (one tensor or a tuple) match in shape, dtype and fills (+-inf), have no NaN,
    and agree within tolerance where finite (TOLERANCE unless given)."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    atol = TOLERANCE if atol is None else atol
    rtol = TOLERANCE if rtol is None else rtol
    for g, w in zip(got, want):
        g, w = g.cpu(), w.cpu()
        assert g.shape == w.shape and g.dtype == w.dtype
        exact = torch.promote_types(g.dtype, torch.float32)  # fp16/bf16 compared in fp32, fp64 as is
        g, w = g.to(exact), w.to(exact)
        assert not torch.isnan(g).any(), "NaN in the output"
        assert torch.equal(torch.isinf(g), torch.isinf(w)), "fills (+-inf) differ"
        finite = torch.isfinite(w)
        torch.testing.assert_close(g[finite], w[finite], atol=atol, rtol=rtol)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty on-disk cache and empty in-process memos, so counters start from nothing."""
    from einsum_ir.codegen import dispatch, kernel, modules

    monkeypatch.setenv("EINSUM_IR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EINSUM_IR_CACHE", raising=False)
    monkeypatch.setattr(kernel, "_SOURCES", {})
    monkeypatch.setattr(modules, "_MODULES", {})
    monkeypatch.setattr(dispatch, "STATS", dispatch.STATS.__class__())
    return tmp_path / "cache"


# A cascade no strategy lowers: linear attention under a window is no prefix for the chunked
# scan, and its three-operand sum is no score for the key loop.
UNLOWERED = """dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
NUM[b,h,p,f] = Q[b,h,p,e] * K[b,h,m,e] * V[b,h,m,f] where m <= p and p - m < 4
output NUM
"""
