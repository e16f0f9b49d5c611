"""The device table: peak rates per device, every figure with its public source.

Built-in entries live in devices.yaml (package data). A user adds a device from a dict or a
YAML file with the same fields (`add_device`), or passes the dict straight to `roofline`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cache
from importlib import resources
from pathlib import Path

import yaml

REQUIRED = ("tensor_flops", "fp32_flops", "sfu_ops", "hbm_bandwidth", "sms", "smem_per_sm",
            "registers_per_sm", "l2_bytes")


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    tensor_flops: dict[str, float]  # dense tensor-core FLOP/s per dtype
    fp32_flops: float  # non-tensor FP32 FLOP/s (an FMA counts 2)
    sfu_ops: float  # transcendental (exp2) results per second
    hbm_bandwidth: float  # bytes/s
    sms: int
    smem_per_sm: int  # bytes
    registers_per_sm: int  # 32-bit registers
    l2_bytes: int
    sources: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def tensor_rate(self, dtype: str) -> float:
        """Dense tensor-core FLOP/s for `dtype`; without tensor-core support, the FP32 units."""
        return float(self.tensor_flops.get(dtype, self.fp32_flops))

    @property
    def vector_ops(self) -> float:
        """Non-tensor operations per second: one per lane per clock, half the FMA FLOP rate."""
        return self.fp32_flops / 2

    @property
    def onchip_bytes_per_sm(self) -> int:
        return self.smem_per_sm + 4 * self.registers_per_sm

    def __str__(self) -> str:
        rows = [("tensor FLOP/s", ", ".join(f"{k} {v / 1e12:g}T" for k, v in self.tensor_flops.items())),
                ("FP32 FLOP/s", f"{self.fp32_flops / 1e12:g}T"), ("SFU op/s", f"{self.sfu_ops / 1e12:g}T"),
                ("memory B/s", f"{self.hbm_bandwidth / 1e12:g}T"), ("SMs", str(self.sms)),
                ("smem/SM", f"{self.smem_per_sm // 1024} KiB"), ("registers/SM", str(self.registers_per_sm)),
                ("L2", f"{self.l2_bytes / 2**20:g} MiB")]
        return f"{self.name} ({self.key})\n" + "\n".join(f"  {k:14} {v}" for k, v in rows)


def from_dict(key: str, spec: dict) -> Device:
    missing = [f for f in REQUIRED if f not in spec]
    if missing:
        raise ValueError(f"device {key!r} lacks {', '.join(missing)}; a device needs {', '.join(REQUIRED)}")
    known = {f.name for f in fields(Device)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"device {key!r}: unknown field(s) {', '.join(unknown)}")
    spec = {**spec, "key": key, "name": spec.get("name", key), "aliases": tuple(spec.get("aliases", ()))}
    spec["tensor_flops"] = {k: float(v) for k, v in spec["tensor_flops"].items()}
    for f in ("fp32_flops", "sfu_ops", "hbm_bandwidth"):
        spec[f] = float(spec[f])
    for f in ("sms", "smem_per_sm", "registers_per_sm", "l2_bytes"):
        spec[f] = int(spec[f])
    return Device(**spec)


def _load_yaml(text: str) -> dict[str, Device]:
    return {key: from_dict(key, spec) for key, spec in yaml.safe_load(text).items()}


@cache
def _builtin() -> dict[str, Device]:
    return _load_yaml((resources.files(__package__) / "devices.yaml").read_text())


_added: dict[str, Device] = {}


def table() -> dict[str, Device]:
    return {**_builtin(), **_added}


def add_device(spec: dict | str | Path, key: str | None = None) -> list[Device]:
    """Register devices from a YAML file (keys -> fields) or one dict (with `key`)."""
    if isinstance(spec, dict):
        if key is None:
            raise ValueError("add_device(dict) needs key=")
        new = {key: from_dict(key, spec)}
    else:
        new = _load_yaml(Path(spec).read_text())
    _added.update(new)
    return list(new.values())


def get(device: str | dict | Device) -> Device:
    """A device by key or alias (case-insensitive), a dict of fields, or a YAML file path."""
    if isinstance(device, Device):
        return device
    if isinstance(device, dict):
        return from_dict(device.get("name", "custom"), {k: v for k, v in device.items()})
    name = str(device).lower()
    for d in table().values():
        if name == d.key or name in (a.lower() for a in d.aliases):
            return d
    if Path(device).suffix in (".yaml", ".yml") and Path(device).exists():
        return add_device(device)[0]
    raise KeyError(f"unknown device {device!r}; known: {', '.join(table())} (or pass a dict / YAML file)")


@dataclass(frozen=True)
class Link:
    """An interconnect between two devices: peak bytes/s per direction, with its source."""

    key: str
    name: str
    bandwidth: float
    source: str
    aliases: tuple[str, ...] = ()


@cache
def links() -> dict[str, Link]:
    """The built-in interconnects (links.yaml)."""
    entries = yaml.safe_load((resources.files(__package__) / "links.yaml").read_text())
    return {key: Link(key, e["name"], float(e["bandwidth"]), e["source"], tuple(e.get("aliases", ())))
            for key, e in entries.items()}


def get_link(link: str | Link) -> Link:
    """An interconnect by key or alias (case-insensitive)."""
    if isinstance(link, Link):
        return link
    name = str(link).lower()
    for entry in links().values():
        if name == entry.key or name in entry.aliases:
            return entry
    raise KeyError(f"unknown interconnect {link!r}; known: {', '.join(links())}")
