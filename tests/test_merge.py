"""Partial states over key ranges and their merge (lowering/merge.py, codegen/partial.py):
any partition of the keys, merged in any order and grouping, finalizes to the full kernel's
outputs, for every catalog variant whose forward is one key loop over one key rank."""
from __future__ import annotations

import math
import random

import pytest
import torch

import einsum_ir as ei
from einsum_ir.ir import rank_of
from einsum_ir.lowering.merge import derive
from support import make_inputs, on_kernel_device

DECLINED = {"flowformer": "GC reduces the keys and depends on KS, a reduction over every key",
            "landmark": "GB reduces the keys in groups"}
# Partial states taken from the cascade as written (no key loop): their partial kernel is a
# chunked scan over the key range.
AS_WRITTEN = ("linear_elu", "linear_elu_causal")
MERGED = [n for n in ei.variants.names() if n not in DECLINED]
SHAPES = [(13, 19), (21, 10)]  # P < M; P > M (a bottom-right mask leaves rows with no key)


def _key_extent(c, args) -> int:
    """How many keys there are, as the call binds their ranks (from a key input's shape, or
    given: a paged cache's M); keys over several ranks (a 2-D neighborhood's) are numbered
    row-major."""
    from einsum_ir.params import bind_shapes

    extents = bind_shapes(c, dict(args))[1]
    return math.prod(extents[rank_of(k)] for k in derive(c).keys)


def _partition(rng: random.Random, m: int) -> list[tuple[int, int]]:
    """1-5 consecutive ranges covering [0, m), some of them empty."""
    cuts = sorted(rng.randint(0, m) for _ in range(rng.randint(0, 4)))
    bounds = [0] + cuts + [m]
    return list(zip(bounds, bounds[1:]))


def _merged(c, states, rng: random.Random):
    """`states` merged in a random order and a random grouping."""
    states = list(states)
    rng.shuffle(states)
    while len(states) > 1:
        k = rng.randint(2, len(states))
        states = [ei.merge(c, states[:k])] + states[k:]
        rng.shuffle(states)
    return states[0]


def _assert_same(got, want, tol: float, what: str) -> None:
    got, want = (x if isinstance(x, tuple) else (x,) for x in (got, want))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert not g.isnan().any(), what
        assert torch.equal(torch.isinf(g), torch.isinf(w)), f"{what}: fills differ"
        fin = torch.isfinite(w)
        torch.testing.assert_close(g[fin].double().cpu(), w[fin].double().cpu(), atol=tol, rtol=tol, msg=what)


def test_the_variants_without_partial_states_say_why():
    for name, why in DECLINED.items():
        with pytest.raises(ei.LoweringError, match=why):
            derive(ei.variants.load(name))


@pytest.mark.parametrize("shape", SHAPES, ids=["P<M", "P>M"])
@pytest.mark.parametrize("name", MERGED)
def test_any_partition_merged_in_any_order_equals_the_kernel(name, shape):
    c = ei.variants.load(name)
    P, M = shape
    args = make_inputs(name, c, P=P, M=M, E=8, F=6, dtype=torch.float64)
    kern = ei.compile(c, backend="cpu")
    want = kern(**args)
    rng = random.Random(hash((name, shape)) % 1000)
    m = _key_extent(c, args)
    for trial in range(3):
        ranges = _partition(rng, m)
        states = [kern.partial(keys=r, **args) for r in ranges]
        _assert_same(_merged(c, states, rng).finalize(), want, 1e-10, f"{name} {ranges}")


@pytest.mark.parametrize("name", ["softmax_causal", "softplus_l1", "moh", "agent_attention", "nbhd_2d", "var_sink",
                                  *AS_WRITTEN])
def test_triton_partial_states_merge_to_the_kernel(name):
    c = ei.variants.load(name)
    args = on_kernel_device(make_inputs(name, c, P=13, M=19, E=8, F=6))
    kern = ei.compile(c, backend="triton")
    m = _key_extent(c, args)
    states = [kern.partial(keys=r, **args) for r in [(0, 5), (5, 5), (5, m // 2), (m // 2, m)]]
    _assert_same(ei.merge(c, states).finalize(), kern(**args), 1e-5, name)


def test_an_empty_range_is_the_identity():
    c = ei.variants.load("softmax_window")
    args = make_inputs("softmax_window", c, P=13, M=19, E=8, F=6, dtype=torch.float64)
    kern = ei.compile(c, backend="cpu")
    st = kern.partial(keys=(3, 11), **args)
    for empty in [(0, 0), (11, 11), (7, 2)]:
        merged = ei.merge(c, [st, kern.partial(keys=empty, **args)])
        for name, v in st.values.items():
            torch.testing.assert_close(merged.values[name], v, msg=name)
    alone = kern.partial(keys=(4, 4), **args).finalize()
    assert not alone.isnan().any() and bool((alone == 0).all())  # no key at all: the output's fill


def test_the_softmax_state_gives_the_natural_log_lse():
    """docs/partial.md: for a softmax, LSE = GM * ln 2 + log(SD) (GM is the max of the base-2
    scores), the log-sum-exp of the scaled scores over the state's keys."""
    c = ei.variants.load("softmax")
    args = make_inputs("softmax", c, P=13, M=19, E=8, F=6, dtype=torch.float64)
    st = ei.compile(c, backend="cpu").partial(keys=(4, 15), **args)
    lse = st.values["GM"] * math.log(2) + torch.log(st.values["SD"])
    scores = args["Q"] @ args["K"][:, :, 4:15].transpose(-1, -2) / math.sqrt(args["Q"].shape[-1])
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))


def test_a_new_ein_variant_merges_with_no_python():
    c = ei.parse("""dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] where m <= p and p - m < 6
A[b,h,p,m]  = softplus(S[b,h,p,m]) * sigmoid(S[b,h,p,m])
Z[b,h,p]    = A[b,h,p,m]
O[b,h,p,f]  = A[b,h,p,m] * V[b,h,m,f] / Z[b,h,p]
output O, Z
""")
    g = torch.Generator().manual_seed(0)
    args = {n: torch.randn(1, 2, 17, 4, generator=g, dtype=torch.float64) for n in "QKV"}
    kern = ei.compile(c, backend="cpu")
    states = [kern.partial(keys=r, **args) for r in [(0, 3), (3, 9), (9, 17)]]
    _assert_same(ei.merge(c, states[::-1]).finalize(), kern(**args), 1e-10, "new variant")


def test_merge_refuses_states_of_another_cascade():
    a, b = ei.variants.load("softmax"), ei.variants.load("softmax_causal")
    args = make_inputs("softmax", a, P=5, M=7, E=4, F=3, dtype=torch.float64)
    sa = ei.compile(a, backend="cpu").partial(keys=(0, 7), **args)
    with pytest.raises(ValueError, match="this cascade"):
        ei.merge(b, [sa])
    with pytest.raises(ValueError, match="at least one"):
        ei.merge(a, [])


@pytest.mark.parametrize("name", AS_WRITTEN)
def test_linear_states_are_the_reductions_over_the_keys_as_written(name):
    m = derive(ei.variants.load(name))
    assert m.stage is None and {r.reduce for r in m.rules} == {"sum"}
    assert {r.name for r in m.rules} == ({"KV", "Z"} if name == "linear_elu" else {"NUM", "DEN"})


@pytest.mark.parametrize("name", AS_WRITTEN)
def test_the_chunked_scan_sums_a_key_range_across_chunk_boundaries(name):
    """The partial kernel of linear attention is a scan whose key factors are selected by the
    range; with chunks of 4 positions a range starts and ends inside chunks."""
    from einsum_ir.codegen.scan_cpu import ScanCpuKernel

    c = ei.variants.load(name)
    args = make_inputs(name, c, P=19, M=19, E=8, F=6, dtype=torch.float64)
    kern = ei.compile(c, backend="cpu")
    scan = kern.partials.kernel
    assert isinstance(scan, ScanCpuKernel)
    scan.chunk = 4
    partial = kern.partials.merge.partial
    for keys in [(0, 19), (3, 14), (5, 5), (17, 40)]:
        st = kern.partial(keys=keys, **args)
        want = ei.interpret(partial, **args, key_lo=keys[0], key_hi=max(keys))
        for out, w in zip(partial.output_names, want):
            torch.testing.assert_close(st.values[out], w, msg=f"{name} {keys} {out}")


def test_the_scan_refuses_a_key_mask_where_absent_and_zero_differ():
    """A length mask on a sum the cascade divides by: where a batch has no key, the cascade's
    output is absent (its fill) but a scan's sums are 0 and 0/0 would be NaN."""
    from einsum_ir.lowering import chunked_scan

    c = ei.parse("""dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f], Len[b]: int32
FQ[b,h,p,e]  = elu(Q[b,h,p,e]) + 1
FK[b,h,m,e]  = elu(K[b,h,m,e]) + 1
KV[b,h,e,f]  = FK[b,h,m,e] * V[b,h,m,f] where m < Len[b]
Z[b,h,e]     = FK[b,h,m,e] where m < Len[b]
O[b,h,p,f]   = FQ[b,h,p,e] * KV[b,h,e,f] / (FQ[b,h,p,e] * Z[b,h,e])
output O
""")
    with pytest.raises(ei.LoweringError, match="KV is masked by m < Len.b.: where that selects no position"):
        chunked_scan.lower(c)
