"""Spec names in generated code: the cascade's identifiers in a namespace of their own.

Generated kernels name their values after the cascade's tensors, ranks and params (`S`, `O_num`,
`W`), derive names of their own from those (`Q_ptr`, `stride_Q_0`, `q_lo_p`, `KEYS_m`) and use a
few fixed ones (`tl`, `torch`, `DT`, `BLOCK_Q`, `pid_g`). A spec may name anything: a param
`q_valid` or `KEYS_m` would silently alias an emitter's value, `tl` or `torch` would shadow a
module, `lambda` would not even parse. So both emitters print `spelled(c)`, the cascade with every
identifier escaped:

- every `_` is doubled (`q_valid` -> `q__valid`), so an escaped name never holds a single `_`,
  while every name an emitter derives or fixes holds one (`Q_ptr`, `q_lo_p`, `pid_g`);
- a name with no `_` that is, in any letter case, a Python keyword or builtin or one of the
  emitters' own `_`-free names (`DT`, `tl`, `lo`, `stage0`) gets a trailing `_` (`tl` -> `tl_`).

Names the emitters' rewrites add (`O_num`, `G_GM`) are made from escaped names and chosen fresh,
as before. `tests/test_names.py` reads every generated module and checks that its `_`-free names
are escaped IR names or in `RESERVED`.
"""
from __future__ import annotations

import builtins
import keyword
import re
from collections.abc import Mapping
from dataclasses import dataclass

from einsum_ir.ir import (
    Access, Cascade, Einsum, Expr, Index, Init, InputDecl, Name, Output, Param, Split, rebuild,
)

# The emitters' own names without a `_` (the generated Python and Triton), module names included.
EMITTER_NAMES = ("CHUNK", "DT", "GROUP", "KT", "NQT", "alpha", "block", "buf", "bufs", "clamped", "dtype", "first", "full", "hi",
                 "i", "idx", "itertools", "k", "last", "live", "lo", "masked", "math", "name", "numel", "ok", "out",
                 "pos", "run", "runs", "segments", "shape", "some", "t", "tl", "torch", "triton", "valid", "np")
RESERVED = frozenset((*keyword.kwlist, *keyword.softkwlist, *dir(builtins), *EMITTER_NAMES))
NUMBERED = re.compile(r"(stage|sweep)\d+$", re.I)  # the CPU path's per-stage and per-sweep functions


def spelled(name: str, rank: bool = False) -> str:
    """`name` as generated code spells it (see the module docstring). A rank's dim (`M`) and
    index (`m`) are spelled alike, so a name reserved in either case escapes both."""
    if "_" in name:
        return name.replace("_", "__")
    forms = {name.lower(), name.upper()} if rank else {name}
    return name + "_" if forms & RESERVED or NUMBERED.match(name) else name


def spell_cascade(c: Cascade) -> Cascade:
    """`c` with every dim, rank index, tensor and param name spelled for generated code."""
    dims = set(c.dims)

    def node(n: Expr) -> Expr | None:
        if isinstance(n, Name):  # a dim (a rank's extent) or a param
            return Name(spelled(n.name, rank=n.name in dims), n.loc)
        if isinstance(n, Index):
            return Index(spelled(n.name, rank=True), n.loc)
        if isinstance(n, Access):
            return Access(spelled(n.tensor), tuple(rebuild(i, node) for i in n.indices), n.loc)
        return None

    def expr(e: Expr | None) -> Expr | None:
        return None if e is None else rebuild(e, node)

    return c.replace(
        dims=tuple(spelled(d, rank=True) for d in c.dims),
        einsums=tuple(Einsum(node(e.target), expr(e.expr), e.reduce, expr(e.where), e.loc) for e in c.einsums),
        outputs=tuple(Output(spelled(o.name), o.fill, o.loc) for o in c.outputs),
        inputs=tuple(InputDecl(spelled(d.name), tuple(spelled(i, rank=True) for i in d.indices), d.dtype, d.loc)
                     for d in c.inputs),
        params=tuple(Param(spelled(p.name), expr(p.expr), p.type, p.loc) for p in c.params),
        splits=tuple(Split(*(spelled(r, rank=True) for r in (s.rank, s.outer, s.inner)), s.loc) for s in c.splits),
        inits=tuple(Init(node(i.target), expr(i.expr), i.loc) for i in c.inits))


@dataclass(frozen=True)
class Spelled:
    """A cascade spelled for generated code, and how a call's names map into it."""

    cascade: Cascade
    names: Mapping[str, str]  # the user's dim, tensor and param names -> their spelling

    def args(self, values: Mapping) -> dict:
        """`values` keyed by spelled names (names of the emitters' own pass through)."""
        return {self.names.get(k, k): v for k, v in values.items()}

    def set(self, names) -> frozenset:
        return frozenset(self.names.get(n, n) for n in names)


def spell(c: Cascade) -> Spelled:
    """`c` spelled for generated code (`spell_cascade`) with the map of its names."""
    names = {d: spelled(d, rank=True) for d in c.dims}
    names.update({t: spelled(t) for t in c.tensors})
    names.update({p.name: spelled(p.name) for p in c.params})
    return Spelled(spell_cascade(c), names)
