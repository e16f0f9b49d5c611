"""Softmax attention recognized in someone else's code, as the pieces a cascade is built from.

Frontends (the torch.compile backend, the Hugging Face hook) recognize attention and describe
it with an `AttentionPattern`: a scale, a causal and/or sliding-window predicate (measured from
the query's place in the key sequence, as after a KV cache), the first valid key of each
sequence (left padding), a logit softcap, a boolean mask or additive bias tensor, and
grouped-query heads. `spec()` writes the
cascade from those pieces generically (FuseMax's 3-pass form with the division deferred,
DESIGN section 3), in the catalog's conventions, so a pattern whose pieces match a catalog
variant yields exactly that variant (`catalog_name()`).

Scalars that vary between call sites (scale, window, cap) are runtime params, so every site
with the same structure shares one cascade and one compiled kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from einsum_ir.ir import Cascade
from einsum_ir.parser import parse

MASK_NAMES = {"bool": "Msk", "float": "Bias"}


@dataclass(frozen=True)
class AttentionPattern:
    """`softmax(mask(softcap(Q K^T * scale) + bias)) V` over heads (B, H) or GQA heads (B, G, R).

    `mask` is None, "bool" (a tensor predicate: False points are absent) or "float" (an
    additive bias). `mask_ranks` names the ranks the mask tensor carries, in order, from
    ("B", "H", "P", "M"); broadcast (size-1) dims are left out. `default_scale` means the
    scale is 1/sqrt(E), written as a derived param; otherwise `scale` is a runtime param.
    `offset`: query p sits at key position p + D (D a runtime int: the cached keys before it),
    so causality is `m <= p + D` and the window `p + D - m < W`. `key_start`: an int32 tensor
    Ks[b], the first key of sequence b (the keys before it are padding). Both are predicates
    the key loop turns into bounds, where a dense mask would be read tile by tile.
    """

    causal: bool = False
    window: bool = False
    softcap: bool = False
    gqa: bool = False
    default_scale: bool = True
    mask: str | None = None
    mask_ranks: tuple[str, ...] = ("B", "H", "P", "M")
    offset: bool = False
    key_start: bool = False

    def __post_init__(self) -> None:
        if self.mask not in (None, "bool", "float"):
            raise ValueError(f"mask must be None, 'bool' or 'float', got {self.mask!r}")
        if not set(self.mask_ranks) <= {"B", "H", "P", "M"}:
            raise ValueError(f"mask ranks must come from B, H, P, M, got {self.mask_ranks}")

    # -- the pieces, as spec text

    @property
    def heads(self) -> list[str]:
        """The head index variables: `h`, or `g, r` for grouped-query attention."""
        return ["g", "r"] if self.gqa else ["h"]

    @property
    def mask_name(self) -> str | None:
        return MASK_NAMES[self.mask] if self.mask else None

    @property
    def mask_indices(self) -> list[str]:
        """The mask's index variables; its head dim splits into g, r under GQA."""
        out: list[str] = []
        for rank in self.mask_ranks:
            out += self.heads if rank == "H" else [rank.lower()]
        return out

    @property
    def runtime_params(self) -> list[str]:
        """Runtime scalars in declaration order (the custom op passes them in this order)."""
        return (["scale"] if not self.default_scale else []) + (["W"] if self.window else []) + \
            (["cap"] if self.softcap else []) + (["D"] if self.offset else [])

    def spec(self) -> str:
        heads = self.heads
        kv_heads = ["g"] if self.gqa else ["h"]
        row = ",".join(["b"] + heads + ["p"])
        q = f"Q[{row},e]"
        k = f"K[{','.join(['b'] + kv_heads)},m,e]"
        v = f"V[{','.join(['b'] + kv_heads)},m,f]"
        score = f"[{row},m]"

        lines = ["dims " + " ".join(["B"] + [h.upper() for h in heads] + ["P", "M", "E", "F"])]
        lines.append("param scale = 1/sqrt(E)" if self.default_scale else "param scale: float")
        if self.window:
            lines.append("param W: int")
        if self.softcap:
            lines.append("param cap: float")
        if self.offset:
            lines.append("param D: int")
        inputs = [q, k, v]
        if self.mask:
            decl = f"{self.mask_name}[{','.join(self.mask_indices)}]"
            inputs.append(decl + (": bool" if self.mask == "bool" else ""))
        if self.key_start:
            inputs.append("Ks[b]: int32")
        lines.append("input " + ", ".join(inputs))

        pos = "p + D" if self.offset else "p"
        predicates = ([f"m <= {pos}"] if self.causal else []) + ([f"{pos} - m < W"] if self.window else [])
        predicates += ["m >= Ks[b]"] if self.key_start else []
        if self.mask == "bool":
            predicates.append(f"Msk[{','.join(self.mask_indices)}]")
        where = (" where " + " and ".join(predicates)) if predicates else ""

        # Each later step needs the finished contraction, so it gets its own Einsum.
        steps = []
        if self.softcap:
            steps.append(("cap * tanh({prev} / cap)"))
        if self.mask == "float":
            steps.append("{prev} + Bias[" + ",".join(self.mask_indices) + "]")
        names = [f"S{k}" for k in range(len(steps))] + ["S"]
        lines.append(f"{names[0]}{score} = {q} * {k} * scale{where}")
        for name, prev, step in zip(names[1:], names, steps):
            lines.append(f"{name}{score} = " + step.format(prev=f"{prev}{score}"))
        lines += [
            f"GM[{row}] = max[m] S{score}",
            f"SN{score} = exp(S{score} - GM[{row}])",
            f"SD[{row}] = SN{score}",
            f"O[{row},f] = SN{score} * {v} / SD[{row}]",
            "output O",
        ]
        return "\n".join(lines) + "\n"

    def cascade(self) -> Cascade:
        return _parse(self.spec())

    def catalog_name(self) -> str | None:
        """The catalog variant this pattern reproduces exactly, if any."""
        return _catalog().get(_structure(self.cascade()))

    def describe(self) -> str:
        parts = [p for p, on in [("causal", self.causal), ("window", self.window),
                                 ("softcap", self.softcap), ("gqa", self.gqa),
                                 ("custom scale", not self.default_scale),
                                 ("after a cache", self.offset), ("left padding", self.key_start)] if on]
        if self.mask:
            parts.append(f"{self.mask} mask[{','.join(self.mask_ranks)}]")
        return "softmax attention" + (f" ({', '.join(parts)})" if parts else "")


def is_default_scale(scale: float | None, head_dim: int) -> bool:
    """Whether `scale` is 1/sqrt(E) (None means the default, as in SDPA)."""
    return scale is None or math.isclose(scale, 1 / math.sqrt(head_dim), rel_tol=1e-9)


@lru_cache(maxsize=None)
def _parse(text: str) -> Cascade:
    return parse(text, file="<attention pattern>")


def _structure(c: Cascade) -> Cascade:
    return c.replace(doc="")


@lru_cache(maxsize=1)
def _catalog() -> dict[Cascade, str]:
    from einsum_ir import variants

    return {_structure(variants.load(name)): name for name in variants.names()}
