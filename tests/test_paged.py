"""Indirect indices (paged KV caches, docs/spec.md "Indirect indices"): an index position reads an
integer input, `Kc[Tbl[b, m // T], m % T, g, e]`. The language round trip, located validation
errors, the interpreter against the contiguous form and against a formula, absent points for
out-of-range page ids, the cost model's bytes, and the CPU path's and Triton's kernels against
the interpreter at page sizes below, equal to and above the key tile."""
from __future__ import annotations

import re

import pytest
import torch

import einsum_ir as ei
from einsum_ir.codegen.cpu_emit import compile_cpu
from einsum_ir.codegen.dispatch import Config
from einsum_ir.indirect import bound_indirect
from einsum_ir.printer import print_einsum, print_expr
from einsum_ir.variants.formulas import paged_decode, paged_tables
from support import KERNEL_DEVICE, assert_outputs_close, make_inputs, on_kernel_device

PAGED = ei.variants.source("paged_decode")

# The same attention over a contiguous cache K[b,g,m,e]: what the paged form must equal.
CONTIGUOUS = """dims B G R P M E F
param scale = 1/sqrt(E)
input Q[b,g,r,p,e], K[b,g,m,e], V[b,g,m,f], Len[b]: int32
S[b,g,r,p,m]  = Q[b,g,r,p,e] * K[b,g,m,e] * scale where m < Len[b]
GM[b,g,r,p]   = max[m] S[b,g,r,p,m]
SN[b,g,r,p,m] = exp(S[b,g,r,p,m] - GM[b,g,r,p])
SD[b,g,r,p]   = SN[b,g,r,p,m]
O[b,g,r,p,f]  = SN[b,g,r,p,m] * V[b,g,m,f] / SD[b,g,r,p]
output O
"""


def _paged(B=3, G=2, R=2, P=2, E=8, F=4, T=16, J=5, N=9, seed=0, dtype=torch.float32) -> dict:
    """Paged inputs: random tables (pages shared between sequences, unordered, unused slots -1),
    lengths up to J*T, sequence 1 empty; M = J*T keys."""
    g = torch.Generator().manual_seed(seed)
    tbl, lengths = paged_tables(B, J, N, T, g, empty=1)
    return dict(Q=torch.randn(B, G, R, P, E, generator=g).to(dtype), Kc=torch.randn(N, T, G, E, generator=g).to(dtype),
                Vc=torch.randn(N, T, G, F, generator=g).to(dtype), Tbl=tbl, Len=lengths, M=J * T)


def _contiguous(args: dict) -> dict:
    """The paged cache gathered into K[b,g,m,e], V[b,g,m,f] (valid tables only)."""
    T, M = args["Kc"].shape[1], args["M"]
    m = torch.arange(M)
    page = args["Tbl"][:, m // T].long()
    assert bool((page[m[None, :] < args["Len"][:, None]] >= 0).all()), "a used slot without a page"
    page = page.clamp(min=0)
    K = args["Kc"][page, (m % T)[None, :]].permute(0, 2, 1, 3)
    V = args["Vc"][page, (m % T)[None, :]].permute(0, 2, 1, 3)
    return dict(Q=args["Q"], K=K.contiguous(), V=V.contiguous(), Len=args["Len"])


def _spec_error(text: str) -> ei.SpecError:
    with pytest.raises(ei.SpecError) as err:
        ei.parse(text, file="paged.ein")
    return err.value


# ---------------------------------------------------------------------------- language


def test_round_trip_and_the_printed_read():
    c = ei.variants.load("paged_decode")
    assert ei.parse(str(c)) == c
    assert "Kc[Tbl[b,m//T],m%T,g,e]" in print_einsum(c.einsums[0])
    # an indirect index inside arithmetic (a flat slot mapping) round-trips too
    flat = PAGED.replace("input Q[b,g,r,p,e], Kc[n,t,g,e]", "input Q[b,g,r,p,e], Kc[n,t,g,e], Kf[u,g,e]").replace(
        "dims B G R P M E F N T J", "dims B G R P M E F N T J U").replace(
        "Kc[Tbl[b, m // T], m % T, g, e] * scale", "Kf[Tbl[b, m // T] * T + m % T, g, e] * scale")
    c = ei.parse(flat)
    assert ei.parse(str(c)) == c


def test_a_float_index_tensor_is_a_located_error():
    err = _spec_error(PAGED.replace("Tbl[b,j]: int32", "Tbl[b,j]: fp16"))
    line = next(i for i, ln in enumerate(PAGED.splitlines(), 1) if ln.startswith("S["))
    assert f"paged.ein:{line}:" in str(err)
    assert "position 1 of Kc (rank N) reads Tbl, which is fp16" in str(err)
    assert "Tbl[b, j]: int32" in str(err)
    err = _spec_error(PAGED.replace("Tbl[b,j]: int32", "Tbl[b,j]"))
    assert "fp32 (no dtype declared)" in str(err)
    assert "bool" in str(_spec_error(PAGED.replace("Tbl[b,j]: int32", "Tbl[b,j]: bool")))


def test_an_index_tensor_that_is_not_an_input_is_a_located_error():
    spec = PAGED.replace("S[b,g,r,p,m]  =", "Tb[b,j] = Tbl[b,j] + 1\nS[b,g,r,p,m]  =").replace(
        "Kc[Tbl[b, m // T], m % T, g, e] * scale", "Kc[Tb[b, m // T], m % T, g, e] * scale")
    err = _spec_error(spec)
    assert "reads Tb, which is computed by an Einsum" in str(err) and "paged.ein:" in str(err)
    err = _spec_error(PAGED.replace("Kc[Tbl[b, m // T], m % T, g, e] * scale", "Kc[Nope[b, m // T], m % T, g, e] * scale"))
    assert "Nope, which is neither an input nor assigned" in str(err)


def test_nested_indirect_reads_and_bad_table_indices_are_located_errors():
    spec = PAGED.replace("Len[b]: int32", "Len[b]: int32, Map[j]: int32").replace(
        "Kc[Tbl[b, m // T], m % T, g, e] * scale", "Kc[Tbl[b, Map[m // T]], m % T, g, e] * scale")
    err = _spec_error(spec)
    assert "reads Map: indirect reads do not nest" in str(err)
    assert "^^^" in str(err)  # a caret under the inner read
    err = _spec_error(PAGED.replace("Kc[Tbl[b, m // T], m % T, g, e] * scale", "Kc[Tbl[b, m / T], m % T, g, e] * scale"))
    assert "index of Tbl uses '/'" in str(err)
    err = _spec_error(PAGED.replace("Kc[Tbl[b, m // T], m % T, g, e] * scale", "Kc[Tbl[b], m % T, g, e] * scale"))
    assert "Tbl has 2 indices" in str(err)


def test_table_shapes_are_checked_at_bind_time():
    c = ei.variants.load("paged_decode")
    args = _paged()
    args["Tbl"] = args["Tbl"][:2]  # B=2 rows for a batch of 3
    with pytest.raises(ei.BindError, match="B"):
        ei.interpret(c, **args)


# ---------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("T", [4, 16])
def test_interpreter_equals_the_contiguous_cache(T):
    c, flat = ei.variants.load("paged_decode"), ei.parse(CONTIGUOUS)
    for seed in range(3):
        args = _paged(T=T, J=3 if T == 16 else 9, seed=seed)
        assert_outputs_close(ei.interpret(c, **args), ei.interpret(flat, **_contiguous(args)))
        assert_outputs_close(ei.interpret(c, **args), paged_decode(**args))
    assert torch.all(ei.interpret(c, **args)[1] == 0)  # the empty sequence


def test_out_of_range_page_ids_are_absent_points():
    c = ei.variants.load("paged_decode")
    args = _paged(seed=4)
    args["Len"][:] = args["M"]  # every slot is read: the bad ids below are inside the lengths
    args["Tbl"] = torch.randint(0, 9, args["Tbl"].shape, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    args["Tbl"][0, 1], args["Tbl"][0, 3], args["Tbl"][2, 0] = -1, 9, 2 ** 30
    args["Tbl"][1, :] = -5  # a sequence with no valid page: absent, O = 0
    out = ei.interpret(c, **args)
    assert_outputs_close(out, paged_decode(**args))
    assert torch.all(out[1] == 0)
    # the same as dropping those pages' keys from a contiguous cache (not keys of value 0)
    zero = dict(args, Tbl=args["Tbl"].clamp(0, 8))
    assert not torch.allclose(out[0], ei.interpret(c, **zero)[0])


def test_a_table_shorter_than_the_keys_is_absent_past_its_end():
    c = ei.variants.load("paged_decode")
    args = _paged(J=3, seed=5)
    args.update(M=5 * 16, Len=torch.full((3,), 5 * 16, dtype=torch.int32))  # keys past J*T: no slot
    args["Tbl"] = args["Tbl"].clamp(min=0)
    assert_outputs_close(ei.interpret(c, **args), paged_decode(**args))


def test_bounds_are_stated_once_as_the_readers_predicate():
    c = bound_indirect(ei.variants.load("paged_decode"))
    assert print_einsum(c.einsum("S")).endswith(
        "where m < Len[b] and m // T < J and Tbl[b,m//T] >= 0 and Tbl[b,m//T] < N")
    assert c.einsum("O").where is None  # SN is present only where S's bounds hold
    assert bound_indirect(c) is c


# softmax attention whose scores read a selection through an index table
SELECTED_SOFTMAX = """dims B H P M E F N
param scale = 1/sqrt(E)
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f], Sel[n]: int32, Ix[b,m]: int32
S[b,h,p,m]  = {score}
GM[b,h,p]   = max[m] S[b,h,p,m]
SN[b,h,p,m] = exp(S[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m]
O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]
output O
"""


def test_an_indirect_read_in_a_predicate_is_false_where_absent():
    c = ei.parse(SELECTED_SOFTMAX.format(score="Q[b,h,p,e] * K[b,h,m,e] * scale where Sel[Ix[b,m]] == 0"))
    g = torch.Generator().manual_seed(0)
    args = dict(Q=torch.randn(2, 2, 5, 8, generator=g), K=torch.randn(2, 2, 20, 8, generator=g),
                V=torch.randn(2, 2, 20, 4, generator=g), Sel=torch.tensor([0, 1, 0, 0], dtype=torch.int32),
                Ix=torch.randint(-2, 6, (2, 20), generator=g).to(torch.int32))
    i = args["Ix"].long()
    keep = (i >= 0) & (i < 4) & (args["Sel"][i.clamp(0, 3)] == 0)
    s = (args["Q"] @ args["K"].transpose(-1, -2) / 8 ** 0.5).masked_fill(~keep[:, None, None, :], float("-inf"))
    want = torch.softmax(s, -1) @ args["V"]
    assert_outputs_close(ei.interpret(c, **args), want)
    assert_outputs_close(compile_cpu(c, block_q=4, block_s=8)(**args), want)
    assert_outputs_close(_triton_run(c, args, 8), want)


def test_an_indirect_read_under_a_union_is_refused_with_its_location():
    spec = PAGED.replace("O[b,g,r,p,f]  = SN[b,g,r,p,m] * Vc[Tbl[b, m // T], m % T, g, f] / SD[b,g,r,p]",
                         "O[b,g,r,p,f]  = union_sum(SN[b,g,r,p,m], Vc[Tbl[b, m // T], m % T, g, f]) / SD[b,g,r,p]")
    c = ei.parse(spec, file="paged.ein")
    with pytest.raises(ei.LoweringError, match=r"paged.ein:\d+:\d+: .*inside union_sum"):
        ei.compile(c, backend="cpu")


def test_the_backward_is_refused_with_its_location():
    with pytest.raises(ei.LoweringError, match=r"paged_decode.ein:\d+:\d+: .*Vc\[Tbl"):
        ei.grad(ei.variants.load("paged_decode"))


# ---------------------------------------------------------------------------- cost model


def test_bytes_of_a_paged_cache_are_the_visited_keys():
    c = ei.variants.load("paged_decode")
    args = _paged(T=4, J=6, N=20, seed=2)
    args["Tbl"][0, 0] = -1  # one page of sequence 0 that is no page
    shapes = {"B": 3, "G": 2, "R": 2, "P": 2, "M": args["M"], "E": 8, "F": 4, "N": 20, "T": 4, "J": 6,
              "Tbl": args["Tbl"], "Len": args["Len"]}
    counts = ei.counts(c, shapes=shapes, dtype="fp16")
    m = torch.arange(args["M"])
    visited = (m[None, :] < args["Len"][:, None]) & (args["Tbl"][:, m // 4] >= 0)
    keys = int(visited.sum())
    assert 0 < keys < 3 * args["M"]
    assert counts.input_bytes["Kc"] == keys * 2 * 8 * 2  # G * E elements of 2 bytes per key
    assert counts.input_bytes["Vc"] == keys * 2 * 4 * 2
    assert counts.einsum("S").macs == keys * 2 * 2 * 2 * 8  # G * R * P rows, E each
    # without the values, an upper bound: every key of every sequence
    open_shapes = {k: v for k, v in shapes.items() if k not in ("Tbl", "Len")}
    assert ei.counts(c, shapes=open_shapes, dtype="fp16").input_bytes["Kc"] == 3 * args["M"] * 2 * 8 * 2
    sim = ei.simulate(c, shapes, device="h100", q_tile={"P": 16}, kv_tile={"M": 8})
    assert sim.tile_speedup >= 1


# ---------------------------------------------------------------------------- kernels


# (page size T, table slots J, key tile): pages shorter than, equal to and longer than a tile
PAGES = [(16, 5, 64), (128, 1, 64), (8, 4, 8), (4, 7, 16)]


@pytest.mark.parametrize("T,J,tile", PAGES, ids=lambda x: str(x))
def test_cpu_path_equals_the_interpreter(T, J, tile):
    c = ei.variants.load("paged_decode")
    kern = compile_cpu(c, block_q=4, block_s=tile)
    for seed in range(2):
        args = _paged(T=T, J=J, seed=seed)
        args["Tbl"][0, 0] = -1 if seed else 10 ** 6  # an out-of-range page inside a length
        if seed:  # more keys than the table holds: those past J*T are no keys
            args["M"] = J * T + 5
            args["Len"][2] = args["M"]
        assert_outputs_close(kern(**args), ei.interpret(c, **args))


def test_page_id_bounds_are_tested_per_tile_and_the_loop_is_bounded_by_the_length():
    """An out-of-range page id is an edge case, not a pattern to skip tiles by: the loop takes
    its per-program bound from m < Len[b] and from the table's extent (m // T < J, affine),
    builds no block list per call, and a tile the bounds call full tests its page ids once:
    full where they are all inside the cache, masked where one is not (Stage.tile_checks)."""
    from einsum_ir.lowering.strategy import key_loop_plan

    (stage,) = key_loop_plan(ei.variants.load("paged_decode")).stages
    assert not stage.loop.block_list and "Len[b]" in stage.loop.describe()
    assert "m // T < J" in print_expr(stage.predicate) and "Tbl[b,m//T] >= 0" not in print_expr(stage.predicate)
    assert print_expr(stage.tile_checks) == "Tbl[b,m//T] >= 0 and Tbl[b,m//T] < N"
    assert not any(not s.masked for s in stage.loop.tile_segments)  # what a kernel that does not test runs
    assert any(not s.masked for s in stage.checked_loop.key_segments)

    c = ei.variants.load("paged_decode")
    kern = compile_cpu(c, block_q=4, block_s=16)
    args = _paged(T=16, J=5, seed=3)
    args["Tbl"] = torch.randint(0, 9, (3, 5), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    args["Len"][:] = 64
    assert_outputs_close(kern(**args), ei.interpret(c, **args))
    assert kern.last_stats["partial"] == 0 and kern.last_stats["full"] == 4
    args["Tbl"][1, 2] = -1  # keys 32..47 of sequence 1 are absent: that tile runs masked
    assert_outputs_close(kern(**args), ei.interpret(c, **args))
    assert kern.last_stats["partial"] == 1 and kern.last_stats["full"] == 3


def test_cpu_path_reads_the_pages_by_a_gather():
    """Rows of a token's heads (G x E floats) in key-major order, viewed as the tile's order
    (b, g, m, e): the grid ranks stay one batch stride for torch's matrix products (rows in
    (b, m) order would make einsum copy the tile). K and V share one row index per tile (equal
    leading ranks) and copy into scratch tiles the key tiles reuse. A full tile's reads are
    inside the table and the cache (its bounds and its tested page ids say so): no clamps."""
    src = compile_cpu(ei.variants.load("paged_decode")).source({"B": 2, "G": 2, "R": 2, "P": 1, "M": 64, "E": 8,
                                                                "F": 4, "N": 8, "T": 16, "J": 4})
    table = re.search(r"(Tbl_\d+) = _gather\(Tbl_all, _ALL, \(m // T_\), inside=True\)", src).group(1)
    rows = re.search(rf"(Kc_rows_\d+) = _row_index\(Kc_all, {table}\.permute\(1, 0\), \(m % T_\)\[:, None\], "
                     rf"inside=True\)\n", src)
    assert rows, src
    tile = r"\.permute\(1, 2, 0, 3\)\n"
    kc = re.search(rf"(Kc_\d+) = _take_rows\(Kc_all, {rows.group(1)}, \(_bufs, '(Kc_\d+)'\)\){tile}", src)
    vc = re.search(rf"(Vc_\d+) = _take_rows\(Vc_all, {rows.group(1)}, \(_bufs, '(Vc_\d+)'\)\){tile}", src)
    assert kc and vc and kc.group(1) == kc.group(2) and vc.group(1) == vc.group(2)
    assert src.count("= _row_index(") == src.count("= _take_rows(Kc_all")  # one per loop body, not per tensor
    assert src.count("inside=True") == 2  # the masked body tests its reads


def test_take_rows_reads_outside_as_zero_in_scratch_reused_by_tiles():
    """Rows past the table (a page id of -1 or >= N) are 0, in the scratch tile as well as in a
    fresh one, and a later, smaller tile reuses the scratch of the first."""
    from einsum_ir.codegen.cpu_emit import HELPERS

    ns = {"torch": torch}
    exec(HELPERS, ns)
    pool = torch.arange(5 * 3 * 2, dtype=torch.float32).reshape(5, 3, 2)
    page = torch.tensor([[0, 4], [-1, 7]])
    slot = torch.tensor([2, 0])
    rows = ns["_row_index"](pool, page, slot)
    bufs: dict = {}
    want = torch.stack([torch.stack([pool[0, 2], pool[4, 0]]), torch.zeros(2, 2)])
    assert torch.equal(ns["_take_rows"](pool, rows), want)
    assert torch.equal(ns["_take_rows"](pool, rows, (bufs, "x")), want)
    first = bufs["x"]
    small = ns["_take_rows"](pool, ns["_row_index"](pool, torch.tensor([3]), 1), (bufs, "x"))
    assert torch.equal(small, pool[3, 1][None]) and bufs["x"] is first


def _triton_run(c, args: dict, tile: int, dtype=torch.float32):
    from einsum_ir.codegen.kernel import compile_triton

    kern = compile_triton(c)
    config = Config(16, tile, 4, 1) if KERNEL_DEVICE == "cpu" else None
    return kern.run(on_kernel_device(args), config)


# a tile that divides the page (32/16, 16/16) reads one page id per tile; the others per key
@pytest.mark.parametrize("T,J,tile", [(16, 3, 32), (32, 1, 16), (16, 4, 16), (4, 5, 16)], ids=lambda x: str(x))
def test_triton_equals_the_interpreter(T, J, tile):
    c = ei.variants.load("paged_decode")
    args = _paged(B=2, T=T, J=J, P=1, seed=3)
    args["Len"][0] = J * T
    args["Tbl"][0, -1] = -1  # an unused slot inside a length: absent, not page 0
    assert_outputs_close(_triton_run(c, args, tile), ei.interpret(c, **args))


def test_triton_loads_page_ids_then_gathers_under_their_mask():
    from einsum_ir.codegen.kernel import compile_triton

    src = compile_triton(ei.variants.load("paged_decode")).source()
    assert "Tbl = tl.load(Tbl_ptr + b * stride_Tbl_0 + (m // T_) * stride_Tbl_1" in src
    assert "Kc = tl.load(Kc_ptr + Tbl[:, None] * stride_Kc_0" in src
    assert "mask=(((Tbl) >= 0) & ((Tbl) < N))[:, None]" in src
    assert "< T_" not in src and "(m // T_)) >= 0" not in src  # halves that always hold are not tested


def test_triton_reads_one_page_id_per_tile_where_the_tile_divides_the_page():
    """Under the constexpr IN_PAGE_T_ (the key tile divides the page size) the page id is one
    scalar load per tile and the slot the tile's offset in the page plus the lane; the launch
    sets it from the true page size, which the shape bucket keeps exact (and never for an
    empty table, which has no slot to clamp a page id to)."""
    from einsum_ir.codegen.kernel import compile_triton
    from einsum_ir.codegen.tiles import stage_tiles

    kern = compile_triton(ei.variants.load("paged_decode"))
    src = kern.source()
    assert "    if IN_PAGE_T_:  # every key tile lies in one page" in src
    # clamped into the table and the cache, not masked: S's predicate holds those bounds
    assert "Tbl = tl.load(Tbl_ptr + b * stride_Tbl_0 + tl.minimum((k_lo_m // T_), J - 1) * stride_Tbl_1)" in src
    assert ("Kc = tl.load(Kc_ptr + tl.minimum(tl.maximum(Tbl, 0), N - 1) * stride_Kc_0 + "
            "(k_lo_m % T_ + r_k)[:, None] * stride_Kc_1") in src
    (stage,) = kern.plan.stages
    assert stage.page_sizes == ("T_",)
    extents = {"B": 2, "G": 2, "R": 2, "P": 1, "M": 256, "E": 8, "F": 4, "N": 8, "J": 4}
    assert stage_tiles(stage, {**extents, "T_": 128}, Config(16, 64, 4, 1))["IN_PAGE_T_"] == 1
    assert stage_tiles(stage, {**extents, "T_": 16}, Config(16, 64, 4, 1))["IN_PAGE_T_"] == 0
    assert stage_tiles(stage, {**extents, "T_": 128, "J": 0}, Config(16, 64, 4, 1))["IN_PAGE_T_"] == 0


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_half_precision_caches(backend):
    c = ei.variants.load("paged_decode")
    args = _paged(B=2, T=8, J=4, P=1, E=16, F=16, dtype=torch.float16, seed=6)
    ref = ei.interpret(c, **{k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                             for k, v in args.items()})
    out = _triton_run(c, args, 16) if backend == "triton" else compile_cpu(c, block_q=4, block_s=16)(**args)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float().cpu(), ref, atol=3e-2, rtol=3e-2)


def test_catalog_inputs_are_valid_paged_inputs():
    c = ei.variants.load("paged_decode")
    args = make_inputs("paged_decode", c, B=3, P=2, M=40)
    tbl, lengths = args["Tbl"], args["Len"]
    assert lengths[1] == 0 and bool((lengths <= tbl.shape[1] * args["Kc"].shape[1]).all())
    used = torch.arange(tbl.shape[1])[None, :] * args["Kc"].shape[1] < lengths[:, None].long()
    assert bool(((tbl >= 0) & (tbl < args["Kc"].shape[0]))[used].all())
    assert_outputs_close(ei.interpret(c, **args), paged_decode(**args))


def test_a_flat_slot_mapping_reads_through_index_arithmetic():
    """`Kf[Tbl[b, m // T] * T + m % T, g, e]`: one token axis, the page id inside arithmetic."""
    flat = ei.parse(PAGED.replace("Kc[n,t,g,e], Vc[n,t,g,f]", "Kf[u,g,e], Vf[u,g,f]").replace(
        "dims B G R P M E F N T J", "dims B G R P M E F N T J U").replace(
        "Kc[Tbl[b, m // T], m % T, g, e]", "Kf[Tbl[b, m // T] * T + m % T, g, e]").replace(
        "Vc[Tbl[b, m // T], m % T, g, f]", "Vf[Tbl[b, m // T] * T + m % T, g, f]"))
    args = _paged(B=2, T=4, J=5, P=1, seed=7)
    args["Tbl"][0, 0] = 9  # one past the last page: its slots lie past Kf's end, absent
    want = ei.interpret(ei.variants.load("paged_decode"), **args)
    kc, vc = args.pop("Kc"), args.pop("Vc")
    args.update(Kf=kc.reshape(-1, *kc.shape[2:]), Vf=vc.reshape(-1, *vc.shape[2:]), T=4, N=9)
    assert_outputs_close(ei.interpret(flat, **args), want)
    assert_outputs_close(compile_cpu(flat, block_q=4, block_s=8)(**args), want)
    assert_outputs_close(_triton_run(flat, args, 16), want)
    assert_outputs_close(_triton_run(flat, args, 4), want)  # the tile is the page: one page id per tile


def test_partial_states_over_a_paged_cache_merge_to_the_whole():
    c = ei.variants.load("paged_decode")
    args = _paged(T=4, J=5, seed=1)
    args["Tbl"][0, 0] = -1
    kern = compile_cpu(c, block_q=4, block_s=8)
    parts = [kern.partial(keys=(0, 7), **args), kern.partial(keys=(7, args["M"]), **args)]
    assert_outputs_close(ei.merge(c, parts).finalize(), ei.interpret(c, **args))


def test_an_indirect_read_in_a_condition_selects_where_absent():
    """where(cond, a, b) with cond reading through a table: an absent read makes cond false, so
    the point takes b (present), not absent."""
    score = "Q[b,h,p,e] * K[b,h,m,e] * where(Sel[Ix[b,m]] == 0, scale, 2 * scale)"
    c = ei.parse(SELECTED_SOFTMAX.format(score=score))
    g = torch.Generator().manual_seed(1)
    args = dict(Q=torch.randn(1, 2, 5, 8, generator=g), K=torch.randn(1, 2, 12, 8, generator=g),
                V=torch.randn(1, 2, 12, 4, generator=g), Sel=torch.tensor([0, 1, 0], dtype=torch.int32),
                Ix=torch.randint(-2, 5, (1, 12), generator=g).to(torch.int32))
    i = args["Ix"].long()
    plain = ((i >= 0) & (i < 3) & (args["Sel"][i.clamp(0, 2)] == 0)).to(torch.float32)
    s = args["Q"] @ args["K"].transpose(-1, -2) / 8 ** 0.5 * (2 - plain[:, None, None, :])
    want = torch.softmax(s, -1) @ args["V"]
    assert bound_indirect(c).einsum("S").where is None  # every key stays present
    assert_outputs_close(ei.interpret(c, **args), want)
    assert_outputs_close(compile_cpu(c, block_q=4, block_s=8)(**args), want)
