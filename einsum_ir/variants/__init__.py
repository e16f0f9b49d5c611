"""The variant catalog: one `.ein` spec per attention variant, shipped as package data."""
from __future__ import annotations

import os
from importlib import resources

from einsum_ir.ir import Cascade
from einsum_ir.parser import load as load_file, parse

_SPECS = "specs"


def names() -> list[str]:
    """Catalog variant names, sorted."""
    folder = resources.files(__package__) / _SPECS
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".ein"))


def path(name: str):
    """The packaged `.ein` file of a variant."""
    if name not in names():
        raise KeyError(f"no variant {name!r}; known: {', '.join(names())}")
    return resources.files(__package__) / _SPECS / f"{name}.ein"


def source(name: str) -> str:
    return path(name).read_text()


def load(name: str) -> Cascade:
    """Parse a catalog variant by name."""
    return parse(source(name), file=f"{name}.ein")


def load_spec(spec: str) -> Cascade:
    """A path to a `.ein` file, or the name of a catalog variant (what every CLI command takes)."""
    if os.path.exists(spec):
        return load_file(spec)
    if spec in names():
        return load(spec)
    if spec.endswith(".ein") or os.sep in spec:
        raise FileNotFoundError(f"no such spec file: {spec}")
    raise KeyError(f"{spec!r} is neither a spec file nor a catalog variant "
                   f"(try `einsum-ir report` for the list)")
