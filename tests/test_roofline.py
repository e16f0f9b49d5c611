"""Roofline bounds, binding units, and the price of extra passes."""
import pytest

import einsum_ir as ei

SHAPES = dict(B=1, H=16, P=8192, M=8192, E=128, F=128)


def test_one_pass_softmax_is_tensor_bound_on_h100():
    r = ei.roofline(ei.variants.load("softmax_1pass"), SHAPES, device="h100")
    assert r.binding == "tensor"
    flops = 2 * 16 * 8192 * 8192 * 256
    assert r.bound_s == pytest.approx(flops / 989.4e12, rel=1e-6)
    assert not r.pass_costs and r.bound_s == r.one_pass_bound_s


def test_extra_passes_cost_and_are_explained():
    r3 = ei.roofline(ei.variants.load("softmax"), SHAPES, device="h100")
    r1 = ei.roofline(ei.variants.load("softmax_1pass"), SHAPES, device="h100")
    assert [pc.index for pc in r3.pass_costs] == [2, 3]
    assert r3.bound_s > r1.bound_s
    assert "K" in r3.pass_costs[0].reread and r3.pass_costs[0].spilled == ("S",)
    assert r3.pass_costs[0].fiber_bytes == 4 * 8192
    assert "re-read" in str(r3) and "spill" in str(r3)


def test_low_bandwidth_device_binds_on_memory_and_prefers_spilling():
    slow = dict(name="slow", tensor_flops={"bf16": 1e18}, fp32_flops=1e18, sfu_ops=1e18, hbm_bandwidth=1e9,
                sms=1, smem_per_sm=1, registers_per_sm=1, l2_bytes=1)
    r = ei.roofline(ei.variants.load("softmax"), dict(B=1, H=1, P=256, M=256, E=64, F=64), device=slow)
    assert r.binding == "memory"
    assert all(pc.choice == "recompute" for pc in r.pass_costs)  # re-reading K beats spilling S
    fast_mem = {**slow, "tensor_flops": {"bf16": 1e9}, "hbm_bandwidth": 1e18}
    r = ei.roofline(ei.variants.load("softmax"), dict(B=1, H=1, P=256, M=256, E=64, F=64), device=fast_mem)
    assert r.binding == "tensor" and all(pc.choice == "spill" for pc in r.pass_costs)


def test_linear_attention_is_memory_bound():
    r = ei.roofline(ei.variants.load("linear_elu"), SHAPES, device="h200")
    assert r.binding == "memory"


def test_roofline_needs_bound_shapes():
    with pytest.raises(ValueError, match="bound"):
        ei.roofline(ei.variants.load("softmax"), dict(B=1, H=1, P=128))


def _cli(argv):
    import argparse

    from einsum_ir.cost_model.cli import add_commands

    parser = argparse.ArgumentParser(prog="einsum-ir")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_analyze_prints_passes_counts_and_bound(capsys):
    assert _cli(["analyze", "softmax_window", "--shapes", "B=1,H=16,P=8192,M=8192,E=128,F=128",
                 "--params", "W=512", "--device", "h200"]) == 0
    out = capsys.readouterr().out
    assert "Passes over M: 2" in out and "GM -> SN" in out
    assert "compulsory" in out and "bound by" in out and "H200" in out


def test_report_columns():
    from einsum_ir.cost_model.report import report_columns

    cols = report_columns("softmax", ei.variants.load("softmax"))
    assert cols["passes (M)"] == "3" and cols["binds"] == "tensor" and cols["H100 bound"].endswith("us")
