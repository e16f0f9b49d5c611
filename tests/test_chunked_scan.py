"""The chunked scan (lowering/chunked_scan.py, codegen/scan_cpu.py): which cascades reassociate,
why the others decline, the CPU kernel against the interpreter at chunk boundaries, and counts
that grow linearly in N."""
import pytest
import sympy
import torch

import einsum_ir as ei
from einsum_ir.codegen.scan_cpu import ScanCpuKernel
from einsum_ir.lowering.chunked_scan import ScanPlan, lower
from einsum_ir.lowering.scan_cost import lowered_counts
from einsum_ir.lowering.strategy import choose

from support import assert_outputs_close, make_inputs

LINEAR = ("lightning_causal", "linear_elu", "linear_elu_causal", "flowformer")
CHUNK = 16

GATED = """
dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f], Lam[h]
S[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] where m <= p
D[b,h,p,m] = S[b,h,p,m] * exp(log(Lam[h]) * p) / exp(log(Lam[h]) * m)
O[b,h,p,f] = D[b,h,p,m] * V[b,h,m,f]
output O
"""


def scan_kernel(c, chunk=CHUNK):
    kern = ei.compile(c, backend="cpu")
    assert isinstance(kern, ScanCpuKernel)
    kern.chunk = chunk
    return kern


@pytest.mark.parametrize("name", LINEAR)
def test_linear_variants_choose_the_scan(name):
    plan, declined = choose(ei.variants.load(name))
    assert isinstance(plan, ScanPlan) and not declined


@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize("n", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_scan_matches_the_interpreter_at_chunk_boundaries(name, n):
    c = ei.variants.load(name)
    args = make_inputs(name, c, P=n, M=n, E=8, F=6, B=2, H=3)
    assert_outputs_close(scan_kernel(c)(**args), ei.interpret(c, **args), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["linear_elu", "flowformer"])
def test_non_causal_scan_takes_different_query_and_key_lengths(name):
    c = ei.variants.load(name)
    args = make_inputs(name, c, P=21, M=50, E=8, F=6)
    assert_outputs_close(scan_kernel(c)(**args), ei.interpret(c, **args), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["lightning_causal", "linear_elu_causal"])
@pytest.mark.parametrize("P, M", [(20, 45), (45, 20)])
def test_causal_scan_with_more_keys_or_more_queries(name, P, M):
    """Queries and keys walk the same positions: keys past P are never read, queries past M
    see every key."""
    c = ei.variants.load(name)
    args = make_inputs(name, c, P=P, M=M, E=8, F=6)
    assert_outputs_close(scan_kernel(c)(**args), ei.interpret(c, **args), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lam", [1.0, 1e-3])
def test_decay_at_one_and_near_zero(lam):
    c = ei.variants.load("lightning_causal")
    args = make_inputs("lightning_causal", c, P=70, M=70, E=8, F=6, H=2)
    args["Lam"] = torch.full((2,), lam)
    got, want = scan_kernel(c)(**args), ei.interpret(c, **args)
    assert torch.isfinite(got).all()
    assert_outputs_close(got, want, atol=1e-4, rtol=1e-4)


def test_fp16_inputs_accumulate_in_fp32():
    c = ei.variants.load("linear_elu_causal")
    args = make_inputs("linear_elu_causal", c, P=40, M=40, E=8, F=6, dtype=torch.float16)
    got = scan_kernel(c)(**args)
    assert got.dtype == torch.float16
    want = ei.interpret(c, **{k: v.float() if torch.is_tensor(v) else v for k, v in args.items()})
    assert_outputs_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_a_decay_written_as_a_ratio_of_exponentials_reassociates():
    """exp(a p) / exp(a m) is g(p)/g(m): the symbolic check accepts it, whatever its spelling."""
    c = ei.parse(GATED)
    assert isinstance(lower(c), ScanPlan)
    args = make_inputs("lightning_causal", c, P=45, M=45, E=8, F=6)
    assert_outputs_close(scan_kernel(c)(**args), ei.interpret(c, **args), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change, coupling", [
    ("D[b,h,p,m] = exp(S[b,h,p,m])", "D"),  # a nonlinearity of the score
    ("D[b,h,p,m] = S[b,h,p,m] * pow(Lam[h], abs(p - m))", "O"),  # not g(p)/g(m)
    ("D[b,h,p,m] = S[b,h,p,m] * sqrt(p - m + 1)", "O"),  # not a decay either
])
def test_what_couples_the_two_sides_declines_naming_the_einsum(change, coupling):
    text = GATED.replace(GATED.splitlines()[4], change)
    with pytest.raises(ei.LoweringError, match=rf"^{coupling}\b"):
        lower(ei.parse(text))


def test_a_polynomial_coupling_distributes_into_separable_terms():
    """(q.k)(p - m) is p (q.k) - (q.k) m: two terms, each a query part times a key part."""
    c = ei.parse(GATED.replace(GATED.splitlines()[4], "D[b,h,p,m] = S[b,h,p,m] * (p - m)"))
    plan = lower(c)
    assert len(plan.sweeps[0].terms) == 2
    args = make_inputs("lightning_causal", c, P=37, M=37, E=8, F=6)
    assert_outputs_close(scan_kernel(c)(**args), ei.interpret(c, **args), atol=1e-3, rtol=1e-4)


def test_a_window_is_not_a_prefix():
    text = GATED.replace("where m <= p", "where m <= p and p - m < 64")
    with pytest.raises(ei.LoweringError, match="masked by"):
        lower(ei.parse(text))


@pytest.mark.parametrize("name", ["softmax", "softmax_causal", "sigmoid_bias"])
def test_softmax_forms_stay_on_the_key_loop(name):
    plan, declined = choose(ei.variants.load(name))
    assert plan.strategy == "stream keys under a query tile"
    assert declined[0].strategy == "chunked scan"


def test_agent_tokens_stay_on_the_key_loop():
    """No product over both P and M: the scan would only add sweeps."""
    plan, _ = choose(ei.variants.load("agent_attention"))
    assert plan.strategy == "stream keys under a query tile"


@pytest.mark.parametrize("name", ["lightning_causal", "linear_elu_causal"])
def test_counts_grow_linearly(name):
    c = ei.variants.load(name)
    flops = [float(lowered_counts(c, dict(B=1, H=8, P=n, M=n, E=64, F=64)).flops) for n in (2048, 32768)]
    assert flops[1] / flops[0] == pytest.approx(16, rel=0.01)
    written = [float(ei.counts(c, dict(B=1, H=8, P=n, M=n, E=64, F=64), as_written=True).flops)
               for n in (2048, 32768)]
    assert written[1] / written[0] > 200


def test_counts_are_symbolic_without_shapes():
    counts = ei.counts(ei.variants.load("lightning_causal"), dict(B=1, H=1, E=64, F=64))
    assert {str(s) for s in sympy.sympify(counts.flops).free_symbols} == {"C", "P"}


def test_non_causal_contraction_is_reassociated_in_the_cascade():
    text = GATED.replace(" where m <= p", "").replace(
        "S[b,h,p,m] * exp(log(Lam[h]) * p) / exp(log(Lam[h]) * m)", "S[b,h,p,m] * 2")
    c = ei.parse(text)
    plan = lower(c)
    assert plan.rewrites and "O_state" in plan.cascade.tensors
    args = make_inputs("softmax", c, P=19, M=33, E=8, F=6)
    assert_outputs_close(scan_kernel(c)(**args), ei.interpret(c, **args), atol=1e-4, rtol=1e-4)


def test_analyze_shows_both_forms(capsys):
    from einsum_ir.cli import main

    assert main(["analyze", "lightning_causal", "--shapes", "B=1,H=8,P=32768,M=32768,E=64,F=64"]) == 0
    out = capsys.readouterr().out
    assert "chunked scan (1 sweep(s), chunks of 64)" in out and "as written" in out and "chosen: chunked scan" in out
