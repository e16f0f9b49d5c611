"""The device table: required devices, fields, sources; user-added devices."""
import pytest

from einsum_ir.cost_model import devices

NEEDED = ["a100", "h100", "h200", "b200", "l4", "rtx4090", "cpu"]


@pytest.mark.parametrize("key", NEEDED)
def test_device_has_every_field_with_a_source(key):
    d = devices.get(key)
    for f in devices.REQUIRED:
        assert getattr(d, f), f
        assert d.sources.get(f), f"{key}.{f} has no source"
    assert d.tensor_rate("bf16") > d.fp32_flops or key == "cpu"


def test_h100_and_h200_figures():
    h100, h200 = devices.get("H100-SXM"), devices.get("h200")
    assert h100.tensor_rate("bf16") == pytest.approx(989e12, rel=0.01)
    assert h100.sfu_ops == pytest.approx(3.9e12, rel=0.02)
    assert h100.hbm_bandwidth == 3.35e12 and h100.sms == 132
    assert h200.tensor_rate("bf16") == h100.tensor_rate("bf16") and h200.hbm_bandwidth == 4.8e12


SPEC = dict(tensor_flops={"bf16": 100e12}, fp32_flops=10e12, sfu_ops=1e12, hbm_bandwidth=1e12, sms=10,
            smem_per_sm=65536, registers_per_sm=65536, l2_bytes=1 << 20)


def test_add_device_from_dict_and_yaml(tmp_path):
    devices.add_device(SPEC, key="toy")
    assert devices.get("toy").sms == 10
    path = tmp_path / "mine.yaml"
    path.write_text("mygpu:\n  name: My GPU\n" + "".join(
        f"  {k}: {v!r}\n" if not isinstance(v, dict) else f"  {k}: {{bf16: 1.0e14}}\n" for k, v in SPEC.items()))
    added = devices.add_device(path)
    assert added[0].name == "My GPU" and devices.get("mygpu").tensor_rate("bf16") == 1e14
    assert devices.get(str(path)).key == "mygpu"


def test_missing_field_is_reported():
    with pytest.raises(ValueError, match="sfu_ops"):
        devices.from_dict("bad", {k: v for k, v in SPEC.items() if k != "sfu_ops"})


def test_unknown_device():
    with pytest.raises(KeyError, match="known"):
        devices.get("tpu-v9")
