"""Generated Triton kernels (DESIGN sections 6, 7): every fused catalog variant runs in Triton's
interpreter on CPU tensors and matches the reference interpreter; every fused variant compiles
ahead of time for sm_80 and sm_90 with no spills (and wgmma on sm_90)."""
# CPU tensors run in Triton's interpreter, which needs TRITON_INTERPRET=1 when triton is first
# imported: tests/conftest.py sets it on machines without a GPU. The AOT tests then compile in
# one clean subprocess (codegen.aot does that itself).
import pytest  # noqa: E402
import torch  # noqa: E402

import einsum_ir as ei  # noqa: E402
from einsum_ir.lowering.chunked_scan import ScanPlan  # noqa: E402
from einsum_ir.lowering.strategy import build_plan  # noqa: E402
from support import (  # noqa: E402
    NOT_FUSED, UNLOWERED, KERNEL_DEVICE, assert_outputs_close, make_inputs, on_kernel_device,
)

triton = pytest.importorskip("triton")


FUSED = sorted(n for n in ei.variants.names() if n not in NOT_FUSED)  # the linear forms as chunked scans
def _inputs(*args, **kwargs) -> dict:
    """Inputs on the device the kernels run on (the GPU when there is one)."""
    return on_kernel_device(make_inputs(*args, **kwargs))


# (P, M, E, F): non-powers of two, P != M both ways, a single partial tile
SHAPES = [(33, 40, 24, 20), (50, 17, 12, 40), (16, 16, 16, 16)]


def test_every_variant_compiles_and_a_cascade_without_a_lowering_says_why():
    for name in ei.variants.names():
        if name in NOT_FUSED:
            with pytest.raises(ei.LoweringError, match=NOT_FUSED[name]):
                ei.compile(ei.variants.load(name), backend="triton")
        else:
            ei.compile(ei.variants.load(name), backend="triton")
    with pytest.raises(ei.LoweringError, match="no query-key score contraction"):
        ei.compile(ei.parse(UNLOWERED), backend="triton")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "P%d_M%d_E%d_F%d" % s)
@pytest.mark.parametrize("name", FUSED)
def test_fused_variant_matches_interpreter(name, shape):
    P, M, E, F = shape
    c = ei.variants.load(name)
    kern = ei.compile(c, backend="triton")
    args = _inputs(name, c, P=P, M=M, E=E, F=F)
    assert_outputs_close(kern(**args), ei.interpret(c, **args))


# bf16: Triton 3.9's interpreter gets tl.dot on bf16 wrong (numpy has no bf16; a 16x16 bf16 dot
# is off by 1e10), so bf16 kernels run on a GPU only; without one the AOT tests below compile them.
@pytest.mark.parametrize("dtype", [torch.float16] + [torch.bfloat16] * (KERNEL_DEVICE == "cuda"))
@pytest.mark.parametrize("name", ["softmax_causal", "softmax_gqa", "alibi", "sigmoid_bias"])
def test_half_precision_inputs_accumulate_in_fp32(name, dtype):
    c = ei.variants.load(name)
    kern = ei.compile(c, backend="triton")
    args = _inputs(name, c, P=40, M=33, E=32, F=16, dtype=dtype)
    out = kern(**args)
    ref = ei.interpret(c, **{k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                             for k, v in args.items()})
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_fully_masked_rows_take_the_fill_value():
    # bottom-right causal with P > M: the first P - M query rows see no key
    spec = ei.variants.source("softmax_lse").replace(
        "S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale",
        "S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale where m <= p + M - P")
    c = ei.parse(spec)
    kern = ei.compile(c, backend="triton")
    args = _inputs("softmax_lse", c, P=45, M=20, E=16, F=24)
    o, lse = kern(**args)
    ro, rlse = ei.interpret(c, **args)
    assert torch.all(o[:, :, :25] == 0) and torch.all(torch.isneginf(lse[:, :, :25]))
    assert_outputs_close((o, lse), (ro, rlse))


def test_block_selection_with_empty_rows():
    c = ei.variants.load("moba")
    args = _inputs("moba", c, P=40, M=40, E=16, F=16)
    args["Sel"][:, :, 2] = False  # query block 2 selects nothing: rows 16..23 absent
    args["Sel"][:, :, :, 3] = False
    out = ei.compile(c, backend="triton")(**args)
    assert_outputs_close(out, ei.interpret(c, **args))
    assert torch.all(out[:, :, 16:24] == 0)


def test_block_list_holds_exactly_the_live_key_tiles():
    c = ei.variants.load("moba")
    kern = ei.compile(c, backend="triton")
    assert "stage0_blocks" in kern.source()
    P = M = 45
    args = _inputs("moba", c, P=P, M=M, E=16, F=16, B=1, H=2)
    kern(**args)
    sel, BS, T = args["Sel"], args["BS"], 16  # 16 x 16 tiles in the interpreter
    p = torch.arange(P)[:, None]
    m = torch.arange(M)[None, :]
    live = sel[:, :, p // BS, m // BS] & (m <= p)  # [B, H, P, M], small here
    full, partial = [], []
    for h in range(2):
        for qt in range(-(-P // T)):
            rows = live[0, h, qt * T:(qt + 1) * T]
            tiles = [rows[:, kt * T:(kt + 1) * T] for kt in range(-(-M // T))]
            full.append(sum(bool(t.all()) and t.shape[1] == T for t in tiles))
            partial.append(sum(bool(t.any()) for t in tiles) - full[-1])
    assert kern.last_block_counts[0].tolist() == full
    assert kern.last_block_counts[1].tolist() == partial


def test_runtime_params_do_not_regenerate_code():
    c = ei.variants.load("softmax_window")
    kern = ei.compile(c, backend="triton")
    src = kern.source()
    for W in (1, 5, 100):
        args = _inputs("softmax_window", c, P=30, M=30, E=16, F=16, extra={"W": W})
        assert_outputs_close(kern(**args), ei.interpret(c, **args))
    assert kern.source() == src


def test_source_is_readable_and_generic():
    c = ei.variants.load("softmax_causal")
    src = ei.compile(c, backend="triton").source({"B": 1, "H": 2, "P": 256, "M": 256, "E": 64, "F": 64})
    assert "# Generated by einsum-ir" in src and "S[b,h,p,m]" in src  # the cascade as a header
    for name in ("GM_new", "SD = SD * alpha", "O_num", "tl.dot(", "tl.store("):
        assert name in src
    assert "softmax" not in src.split("import triton")[1]  # no variant names in the code
    # affine mask: one loop over the full tiles below the diagonal, with no mask at all, and one
    # over the masked tiles on it; no branch inside either loop, and pointers that advance
    body = src.split("# full key tiles")[1].split("# masked key tiles")[0]
    assert "mask=q_valid" not in body and "tl.where" not in body and "\n        if " not in body
    assert "K_ptrs += BLOCK_S * stride_K_2" in body
    masked = src.split("# masked key tiles")[1].split("O = ")[0]
    assert masked.count(', float("-inf"))') == 1  # one -inf select per score
    assert "tl.exp2(" in src and "1.4426950408889634" in src  # exp2 with log2(e) in the score scale


@pytest.mark.parametrize("w,s", [((5, 3), (2, 1)), ((4, 4), (4, 4)), ((12, 3), (1, 3))])
def test_2d_neighborhood_box_tiles(w, s):
    c = ei.variants.load("nbhd_2d")
    kern = ei.compile(c, backend="triton")
    args = _inputs("nbhd_2d", c, E=16, F=16,
                       extra={"PX": 12, "PY": 10, "MX": 12, "MY": 10, "WX": w[0], "WY": w[1],
                              "SX": s[0], "SY": s[1]})
    assert_outputs_close(kern(**args), ei.interpret(c, **args))


def test_backends():
    c = ei.variants.load("softmax")
    args = _inputs("softmax", c, P=9, M=11, E=8, F=8)
    ref = ei.interpret(c, **args)
    torch.testing.assert_close(ei.compile(c, backend="reference")(**args), ref)
    auto = ei.compile(c)  # CPU tensors: the reference path
    torch.testing.assert_close(auto(**args), ref)
    unlowered = ei.compile(ei.parse(UNLOWERED))
    assert "score" in unlowered.why_not_fused
    with pytest.raises(ValueError):
        ei.compile(c, backend="nope")


def test_lowering_error_is_one_line():
    with pytest.raises(ei.LoweringError) as err:
        ei.compile(ei.parse(UNLOWERED), backend="triton")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- AOT (no GPU)

def _aot_request(name, head_dim, target):
    from einsum_ir.codegen.report import default_shapes

    c = ei.variants.load(name)
    kern = ei.compile(c, backend="triton")
    return kern, default_shapes(c, head_dim), "bf16", target


@pytest.fixture(scope="module")
def aot_usage():
    """All AOT compiles in one batch (one subprocess when this process interprets Triton)."""
    from einsum_ir.codegen.aot import resource_usage_batch

    keys = [(n, d, t) for n in FUSED for d in (64, 128) for t in ("sm_90", "sm_80")]
    return dict(zip(keys, resource_usage_batch([_aot_request(*k) for k in keys])))


@pytest.mark.parametrize("target", ["sm_90", "sm_80"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", FUSED)
def test_aot_compiles_without_spills(name, head_dim, target, aot_usage):
    u = aot_usage[(name, head_dim, target)]
    assert u["spills"] == 0, u
    assert u["registers"] <= 255
    if target == "sm_90":  # software-pipelined loops: async copies into shared memory, async wgmma
        assert u["wgmma"], "expected Hopper wgmma in the PTX"
        # every kernel with a matrix product pipelines it (a scan's sweeps that only sum a map
        # over the chunks, like Flowformer's flows, have none to pipeline)
        assert all(st["async_loads"] > 0 and st["async_mma"] > 0 for st in u["stages"] if st["mma"]), u
    else:
        assert u["cp_async"], "expected cp.async in the sm_80 PTX"


def _kernel_table_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "kernel_table.py"
    spec = importlib.util.spec_from_file_location("kernel_table", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script, (path.parent.parent / "docs" / "kernels.md").read_text()


def test_kernel_table_is_current(aot_usage):
    """docs/kernels.md's forward table is what scripts/kernel_table.py writes (the compiles above
    are cached)."""
    script, committed = _kernel_table_script()
    if f"Triton {triton.__version__}:" not in committed:
        pytest.skip(f"docs/kernels.md was made with another Triton than {triton.__version__}")
    forward, _ = committed.split("\n" + script.BACKWARD_HEADER + "\n")
    assert script.table(backward=False) == forward.rstrip("\n") + "\n", \
        "run scripts/kernel_table.py to regenerate docs/kernels.md"


def test_backward_kernel_table_rows_are_current_and_pipelined():
    """Two backward rows recompiled here match docs/kernels.md (all of them take minutes); every
    committed backward row has 0 spills and pipelined loops at both head dims."""
    script, committed = _kernel_table_script()
    if f"Triton {triton.__version__}:" not in committed:
        pytest.skip(f"docs/kernels.md was made with another Triton than {triton.__version__}")
    section = committed.split("\n" + script.BACKWARD_HEADER + "\n")[1].split("Without a fused backward")[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and not r.startswith("| variant")]
    assert len(rows) >= 19, section
    for row in rows:
        name, *cells = row.strip("| ").split(" | ")
        (backward,) = ei.grad(ei.variants.load(name)).backward
        scanned = isinstance(build_plan(backward), ScanPlan)
        for cell in cells:
            regs, spills, _, pipelined = cell.split(" / ")
            loads, mmas = map(int, pipelined.split(", "))
            assert int(regs) <= 255 and int(spills) == 0, row
            # a scan's sweeps at 16-position chunks multiply with mma.sync (wgmma takes 64 rows):
            # their loads are pipelined, their dots are not asynchronous
            assert loads > 0 and (mmas > 0 or scanned), row
    fresh, _ = script.backward_rows(["softmax_causal", "bias_tensor"])
    for row in fresh:
        assert row in rows, f"{row} is not in docs/kernels.md: run scripts/kernel_table.py"


def test_extra_outputs_max_scores_and_lse_in_output_order():
    spec = ei.variants.source("softmax_lse").replace("output O, LSE fill -inf",
                                                        "output LSE fill -inf, GM fill -inf, O")
    c = ei.parse(spec.replace("* scale\n", "* scale where m <= p\n", 1))
    args = _inputs("softmax_lse", c, P=21, M=30, E=16, F=8)
    out = ei.compile(c, backend="triton")(**args)
    assert len(out) == 3 and out[1].shape == (1, 2, 21)
    assert_outputs_close(out, ei.interpret(c, **args))


NEW_VARIANT = """# a variant nobody wrote Python for: softplus-gated scores with a per-head bias table,
# a causal sliding window, V stored transposed, and a normalizer (deferred division)
dims B H P M E F
param scale = 1/sqrt(E)
param W: int
input Q[b,h,p,e], K[b,h,m,e], V[b,h,f,m], Bias[h,p,m]
S0[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] * scale where m <= p and p - m < W
S[b,h,p,m]  = S0[b,h,p,m] + Bias[h,p,m]
A[b,h,p,m]  = softplus(S[b,h,p,m]) * sigmoid(S[b,h,p,m])
AD[b,h,p]   = A[b,h,p,m]
O[b,h,p,f]  = A[b,h,p,m] * V[b,h,f,m] / AD[b,h,p]
output O
"""


def test_a_new_ein_variant_needs_no_python():
    c = ei.parse(NEW_VARIANT)
    kern = ei.compile(c, backend="triton")
    g = torch.Generator().manual_seed(3)
    args = dict(Q=torch.randn(2, 2, 29, 20, generator=g), K=torch.randn(2, 2, 35, 20, generator=g),
                V=torch.randn(2, 2, 12, 35, generator=g), Bias=torch.randn(2, 29, 35, generator=g), W=6)
    args = on_kernel_device(args)
    assert_outputs_close(kern(**args), ei.interpret(c, **args))


def test_a_term_without_the_summed_index_is_summed_too():
    # map first, then reduce: sum_e (Q*K + Bias) = Q.K + E*Bias, and sum_m of a key-free term
    # counts the present keys
    c = ei.parse("""dims B P M E F
input Q[b,p,e], K[b,m,e], V[b,m,f], Bias[p,m], C[p]
S[b,p,m] = Q[b,p,e] * K[b,m,e] + Bias[p,m] where m <= p
A[b,p,m] = sigmoid(S[b,p,m])
O[b,p,f] = A[b,p,m] * V[b,m,f] + C[p] where m <= p + 3
output O
""")
    g = torch.Generator().manual_seed(4)
    args = dict(Q=torch.randn(2, 19, 8, generator=g), K=torch.randn(2, 23, 8, generator=g),
                V=torch.randn(2, 23, 5, generator=g), Bias=torch.randn(19, 23, generator=g),
                C=torch.randn(19, generator=g))
    args = on_kernel_device(args)
    assert_outputs_close(ei.compile(c, backend="triton")(**args), ei.interpret(c, **args))


def test_report_columns():
    from einsum_ir.codegen.report import report_columns

    cols = report_columns("softmax_causal", ei.variants.load("softmax_causal"))
    assert cols["fused"] == "yes"
    regs, spills = cols["sm90_d64"].split("/")
    assert int(regs) > 0 and int(spills) == 0
    cols = report_columns("unlowered", ei.parse(UNLOWERED))
    assert cols["fused"].startswith("no: chunked scan: NUM is masked by") and "no query-key score contraction" in cols["fused"]


@pytest.mark.parametrize("spec", [
    # GQA with a causal mask: R (3 query heads per K/V head, not a power of two) packs with P
    """dims B G R P M E F
param scale = 1/sqrt(E)
input Q[b,g,r,p,e], K[b,g,m,e], V[b,g,m,f]
S[b,g,r,p,m]  = Q[b,g,r,p,e] * K[b,g,m,e] * scale where m <= p + M - P
GM[b,g,r,p]   = max[m] S[b,g,r,p,m]
SN[b,g,r,p,m] = exp(S[b,g,r,p,m] - GM[b,g,r,p])
SD[b,g,r,p]   = SN[b,g,r,p,m]
O[b,g,r,p,f]  = SN[b,g,r,p,m] * V[b,g,m,f] / SD[b,g,r,p]
output O
""",
    # MQA: one K/V head for all query heads; queries stored [b,p,h,e] (head-interleaved)
    """dims B H P M E F
param scale = 1/sqrt(E)
input Q[b,p,h,e], K[b,m,e], V[b,m,f]
S[b,h,p,m]  = Q[b,p,h,e] * K[b,m,e] * scale
GM[b,h,p]   = max[m] S[b,h,p,m]
SN[b,h,p,m] = exp(S[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m]
O[b,p,h,f]  = SN[b,h,p,m] * V[b,m,f] / SD[b,h,p]
output O
"""], ids=["gqa_causal", "mqa"])
def test_grouped_query_heads_pack_into_the_query_tile(spec):
    c = ei.parse(spec)
    kern = ei.compile(c, backend="triton")
    assert len(kern.plan.stages[0].query) == 2
    g = torch.Generator().manual_seed(5)
    args = {}
    ext = {"B": 2, "G": 2, "R": 3, "H": 3, "P": 21, "M": 26, "E": 16, "F": 8}
    for d in c.inputs:
        args[d.name] = torch.randn([ext[i.upper()] for i in d.indices], generator=g)
    args = on_kernel_device(args)
    assert_outputs_close(kern(**args), ei.interpret(c, **args))


PROLOGUE_AND_EPILOGUE = """dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
QN[b,h,p,e] = Q[b,h,p,e] * 0.5
S[b,h,p,m]  = QN[b,h,p,e] * K[b,h,m,e] where m <= p
GM[b,h,p]   = max[m] S[b,h,p,m]
SN[b,h,p,m] = exp(S[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m]
O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]
output O
"""


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_query_prologue_with_an_epilogue(backend):
    # A query-side map (no key rank) before the stream and a division after it.
    c = ei.parse(PROLOGUE_AND_EPILOGUE)
    g = torch.Generator().manual_seed(5)
    args = dict(Q=torch.randn(1, 2, 21, 8, generator=g), K=torch.randn(1, 2, 17, 8, generator=g),
                V=torch.randn(1, 2, 17, 4, generator=g))
    if backend == "triton":
        args = on_kernel_device(args)
    assert_outputs_close(ei.compile(c, backend=backend)(**args), ei.interpret(c, **args))
