"""Find softmax attention in a torch.fx graph (as Dynamo hands it to a backend).

Two shapes are recognized:
- `scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0, is_causal, scale, enable_gqa)`;
- explicit chains `matmul(q, k^T)` -> scale -> softcap -> bias/mask -> `softmax(-1)` ->
  `matmul(., v)`, as eager attention code writes them.

Key/value heads repeated for grouped-query attention (`k[:, :, None].expand(...).reshape(...)`,
transformers' `repeat_kv`) are unrepeated, so the cascade reads each key/value head once.

Masks built from index arithmetic (`arange`, offsets, comparisons, `&`, `where(m, 0, -inf)`)
are evaluated symbolically: when the mask is a conjunction of `m <= p` and `p - m < W`
terms it becomes the causal and window predicates and the dense mask is dropped. Any other
mask stays a tensor operand (boolean: a tensor predicate; float: an additive bias).

`find_attention` only reads the graph; it returns `Site`s saying what it would replace and
why it left the rest. The torch.compile backend (codegen.dynamo_backend) does the rewrite.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from einsum_ir.frontends.attention import AttentionPattern, is_default_scale

SDPA = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
SOFTMAX = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)
MATMUL = (torch.matmul, operator.matmul, torch.bmm)
CASTS = ("to", "type", "float", "type_as", "contiguous")
# A float mask value at or below this is -inf in effect (transformers uses finfo(dtype).min).
NEG_LARGE = -1e30


class NotMatched(Exception):
    """A candidate that is not (or not exactly) attention the cascade pattern can express."""


@dataclass
class Site:
    """One attention candidate: replaced (with a pattern and operands) or left, with why."""

    kind: str  # "sdpa" or "chain"
    anchor: fx.Node  # the node computing the attention output (replaced when matched)
    pattern: AttentionPattern | None = None
    query: fx.Node | None = None
    key: fx.Node | None = None
    value: fx.Node | None = None
    mask: fx.Node | None = None  # dense mask operand, when the mask is not index arithmetic
    invert_mask: bool = False  # a masked_fill-style mask (True = drop): negate before use
    scalars: dict = field(default_factory=dict)  # scale, window, softcap
    reason: str = ""

    @property
    def replaced(self) -> bool:
        return self.pattern is not None

    def describe(self) -> str:
        where = f"{self.kind} at {self.anchor.name}"
        if self.pattern is None:
            return f"left {where}: {self.reason}"
        catalog = self.pattern.catalog_name()
        return (f"replaced {where} by {self.pattern.describe()}"
                + (f" (catalog variant {catalog})" if catalog else "")
                + (f"; {self.reason}" if self.reason else ""))


def find_attention(graph: fx.Graph) -> list[Site]:
    """Every SDPA call and every softmax in `graph`, matched or explained."""
    sites = []
    for node in graph.nodes:
        if _is_call(node, SDPA):
            kind, match = "sdpa", _match_sdpa
        elif _is_call(node, SOFTMAX, "softmax"):
            kind, match = "chain", _match_chain
        else:
            continue
        try:
            sites.append(match(node))
        except NotMatched as why:
            sites.append(Site(kind, node, reason=str(why)))
    return sites


# ---------------------------------------------------------------------------- SDPA


def _match_sdpa(node: fx.Node) -> Site:
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask", None)
    dropout = _arg(node, 4, "dropout_p", 0.0)
    causal = _arg(node, 5, "is_causal", False)
    scale = _arg(node, 6, "scale", None)
    enable_gqa = _arg(node, 7, "enable_gqa", False)
    for name, value in [("dropout_p", dropout), ("is_causal", causal), ("scale", scale),
                        ("enable_gqa", enable_gqa)]:
        if isinstance(value, fx.Node):
            raise NotMatched(f"{name} is computed in the graph, not a constant")
    if dropout:
        raise NotMatched(f"dropout_p={dropout}: cascades have no attention dropout")
    site = Site("sdpa", node, query=q)
    site.key, site.value, gqa = _unrepeat_kv(k, v)
    # SDPA's own flag permits GQA; the heads decide it (guard-free under dynamic shapes).
    heads_differ = statically_known_true(_shape(k)[1] != _shape(q)[1])
    _finish(site, mask, causal=bool(causal), scale=scale, softcap=None,
            gqa=gqa or (bool(enable_gqa) and heads_differ))
    return site


# ---------------------------------------------------------------------------- explicit chains


def _match_chain(softmax: fx.Node) -> Site:
    _check_last_dim(softmax)
    # Forward: casts and inactive dropout, then the contraction with V.
    out = softmax
    while True:
        user = _only_user(out)
        if _is_call(user, MATMUL) and user.args[0] is out:
            break
        if _is_cast(user) or _is_inactive_dropout(user):
            out = user
            continue
        raise NotMatched(f"softmax output feeds {user.format_node()}, not a matmul with V")
    pv = user
    # Backward from the scores: mask terms, then a softcap, then scale factors, in that order.
    cur = softmax.args[0]
    scale, softcap, masks = 1.0, None, []
    phase = 0  # the latest stage seen (walking backward): 0 masks, 1 softcap, 2 scale
    while not _is_call(cur, MATMUL):
        if len(cur.users) != 1:
            raise NotMatched(f"{cur.name} is used outside the attention chain")
        step = _score_step(cur)
        kind = step[0]
        if kind == "cast":
            cur = step[1]
            continue
        order = {"mask": 0, "softcap": 1, "scale": 2}[kind]
        if order < phase:  # walking backward: this step comes before one of a later phase
            later = ["mask", "softcap", "scale"][phase]
            raise NotMatched(f"{cur.name}: a {kind} before a {later}; the pattern is "
                             "softmax(mask(softcap(scale * QK)))")
        phase = order
        if kind == "mask":
            masks.append(step[2:])
        elif kind == "softcap":
            if softcap is not None:
                raise NotMatched("two softcaps")
            softcap = step[2]
        else:
            scale *= step[2]
        cur = step[1]
    qk = cur
    if len(qk.users) != 1:
        raise NotMatched(f"the scores {qk.name} are used outside the attention chain")
    q, kt = qk.args[:2]
    k = _untranspose(kt)
    if k is None:
        raise NotMatched(f"{kt.name} is not K with its last two dims swapped")
    site = Site("chain", pv, query=q)
    site.key, site.value, gqa = _unrepeat_kv(k, pv.args[1])
    if len(masks) > 1:
        raise NotMatched("more than one mask term on the scores")
    mask, invert = (masks[0] if masks else (None, False))
    site.invert_mask = invert
    _finish(site, mask, causal=False, scale=scale, softcap=softcap, gqa=gqa)
    return site


def _score_step(node: fx.Node) -> tuple:
    """What `node` does to the scores: ("scale"|"softcap"|"mask"|"cast", input, ...)."""
    if _is_cast(node):
        return ("cast", node.args[0])
    if _is_call(node, (operator.mul, torch.mul), "mul"):
        x, c = _tensor_and_number(node)
        inner = _softcap_input(x, c)
        if inner is not None:
            return ("softcap", inner, c)
        return ("scale", x, c)
    if _is_call(node, (operator.truediv, torch.div), "div"):
        x, c = node.args[:2]
        if isinstance(x, fx.Node) and _is_number(c):
            return ("scale", x, 1.0 / c)
    if _is_call(node, (operator.add, torch.add), "add"):
        a, b = node.args[:2]
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            # The bias is the operand that is not on the path back to the QK matmul.
            x, bias = (a, b) if _reaches_matmul(a) else (b, a)
            return ("mask", x, bias, False)
    if _is_call(node, (torch.masked_fill, torch.Tensor.masked_fill), "masked_fill"):
        x, mask, fill = node.args[:3]
        if _is_number(fill) and fill <= NEG_LARGE:
            return ("mask", x, mask, True)
    if _is_call(node, (torch.where,)) and len(node.args) == 3:
        cond, x, fill = node.args
        if _is_number(fill) and fill <= NEG_LARGE:
            return ("mask", x, cond, False)
    raise NotMatched(f"{node.format_node()} is not a scale, softcap or mask of the scores")


def _softcap_input(x: fx.Node, cap: float) -> fx.Node | None:
    """The scores under `cap * tanh(scores / cap)`, if `x` is that tanh."""
    if not _is_call(x, (torch.tanh,), "tanh") or len(x.users) != 1:
        return None
    div = x.args[0]
    if _is_call(div, (operator.truediv, torch.div), "div") and len(div.users) == 1:
        inner, c = div.args[:2]
        if _is_number(c) and math.isclose(c, cap):
            return inner
    return None


def _reaches_matmul(node: fx.Node, depth: int = 12) -> bool:
    for _ in range(depth):
        if _is_call(node, MATMUL):
            return True
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if not tensors:
            return False
        node = tensors[0]
    return False


# ---------------------------------------------------------------------------- shared pieces


def _finish(site: Site, mask, *, causal: bool, scale: float | None, softcap: float | None,
            gqa: bool) -> None:
    """Fill in the pattern from the operands, folding an index-arithmetic mask into predicates."""
    q_shape = _shape(site.query)
    if len(q_shape) != 4 or len(_shape(site.key)) != 4:
        raise NotMatched(f"query/key are {len(q_shape)}-D; the pattern takes (B, H, P, E)")
    head_dim = q_shape[-1]
    window = None
    notes = []
    if mask is not None:
        terms = mask_predicates(mask, negate=site.invert_mask)
        if terms is not None:
            site.invert_mask = False
            causal = causal or terms["causal"]
            window = terms["window"]
            notes.append("mask built from index arithmetic became predicates")
        else:
            site.mask = mask
            kind = "bool" if _dtype(mask) == torch.bool or site.invert_mask else "float"
            notes.append(f"{kind} mask kept as a tensor operand")
    mask_kind = None
    if site.mask is not None:
        mask_kind = "bool" if (_dtype(site.mask) == torch.bool or site.invert_mask) else "float"
    site.scalars = {"scale": scale, "window": window, "softcap": softcap}
    site.pattern = AttentionPattern(causal=causal, window=window is not None,
                                    softcap=softcap is not None, gqa=gqa,
                                    default_scale=is_default_scale(scale, head_dim), mask=mask_kind,
                                    mask_ranks=_mask_ranks(site.mask) if site.mask is not None else
                                    ("B", "H", "P", "M"))
    site.reason = "; ".join(notes)


def _mask_ranks(mask: fx.Node) -> tuple[str, ...]:
    shape = (1,) * (4 - len(_shape(mask))) + tuple(_shape(mask))
    return tuple("BHPM"[k] for k in range(4) if shape[k] != 1)


def _unrepeat_kv(k: fx.Node, v: fx.Node) -> tuple[fx.Node, fx.Node, bool]:
    """The key/value heads before a `repeat_kv`, when both were repeated alike."""
    k0, v0 = _repeated_from(k), _repeated_from(v)
    if k0 is not None and v0 is not None and _shape(k0)[1] == _shape(v0)[1]:
        return k0, v0, True
    return k, v, False


def _repeated_from(node: fx.Node) -> fx.Node | None:
    """x when node is x[:, :, None].expand(B, Hkv, R, S, D).reshape(B, Hkv*R, S, D)."""
    if not _is_call(node, (torch.reshape,), "reshape") or len(node.users) != 1:
        return None
    expand = node.args[0]
    if not _is_call(expand, (), "expand") or len(expand.users) != 1:
        return None
    index = expand.args[0]
    if not (_is_call(index, (operator.getitem,)) and len(index.users) == 1):
        return None
    base, key = index.args
    full = slice(None, None, None)
    if isinstance(key, tuple) and len(key) == 5 and key[2] is None and \
            all(k == full for i, k in enumerate(key) if i != 2) and len(_shape(base)) == 4:
        return base
    return None


def _untranspose(node: fx.Node) -> fx.Node | None:
    """x when node is x with its last two dims swapped (transpose, mT, permute)."""
    if _is_call(node, (torch.transpose,), "transpose"):
        x, a, b = node.args[:3]
        n = len(_shape(x))
        if {a % n, b % n} == {n - 2, n - 1}:
            return x
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    if _is_call(node, (torch.permute,), "permute"):
        x = node.args[0]
        dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
        n = len(_shape(x))
        if list(d % n for d in dims) == list(range(n - 2)) + [n - 1, n - 2]:
            return x
    return None


def _check_last_dim(softmax: fx.Node) -> None:
    dim = _arg(softmax, 1, "dim", None)
    n = len(_shape(softmax))
    if not isinstance(dim, int) or dim % n != n - 1:
        raise NotMatched(f"softmax over dim {dim}, not the last (key) dim")


def _is_call(node, functions: tuple, method: str | None = None) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in functions:
        return True
    return method is not None and node.op == "call_method" and node.target == method


def _is_cast(node: fx.Node) -> bool:
    """A dtype/layout change between float types (no arithmetic)."""
    if node.op != "call_method" or node.target not in CASTS:
        return False
    return _dtype(node) is not None and _dtype(node).is_floating_point


def _is_inactive_dropout(node: fx.Node) -> bool:
    if not _is_call(node, (torch.nn.functional.dropout, torch.dropout)):
        return False
    p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True)
    return p == 0 or training is False


def _only_user(node: fx.Node) -> fx.Node:
    if len(node.users) != 1:
        raise NotMatched(f"{node.name} has {len(node.users)} users; the attention weights would be "
                         "needed outside the kernel")
    return next(iter(node.users))


def _tensor_and_number(node: fx.Node) -> tuple[fx.Node, float]:
    a, b = node.args[:2]
    if isinstance(a, fx.Node) and _is_number(b):
        return a, float(b)
    if isinstance(b, fx.Node) and _is_number(a):
        return b, float(a)
    raise NotMatched(f"{node.format_node()} multiplies the scores by a tensor, not a constant")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _arg(node: fx.Node, pos: int, name: str, default):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _example(node: fx.Node):
    value = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(value, torch.Tensor):
        raise NotMatched(f"{node.name} has no tensor metadata")
    return value


def _shape(node: fx.Node) -> tuple:
    return tuple(_example(node).shape)


def _dtype(node: fx.Node) -> torch.dtype | None:
    try:
        return _example(node).dtype
    except NotMatched:
        return None


# ---------------------------------------------------------------------------- masks as predicates


@dataclass(frozen=True)
class _Affine:
    """const + sum(coeff * index along axis); axes count from the right (-1 is the key dim)."""

    coeffs: tuple[tuple[int, int], ...]
    const: int
    ndim: int

    def plus(self, other: "_Affine", sign: int = 1) -> "_Affine":
        merged = dict(self.coeffs)
        for axis, c in other.coeffs:
            merged[axis] = merged.get(axis, 0) + sign * c
        return _Affine(tuple(sorted((a, c) for a, c in merged.items() if c)),
                       self.const + sign * other.const, max(self.ndim, other.ndim))


@dataclass(frozen=True)
class _Pred:
    """A conjunction of `affine <= 0` terms (True when empty); `ndim` for broadcasting."""

    terms: tuple[_Affine, ...]
    ndim: int


def mask_predicates(mask: fx.Node, negate: bool = False) -> dict | None:
    """{"causal": bool, "window": int | None} when `mask` (negated with `negate`, as
    masked_fill reads it) is a causal/window band from index arithmetic (boolean, or additive
    0 / -inf), else None."""
    try:
        value = _MaskEval().eval(mask)
        if isinstance(value, _Pred) and negate:
            value = _negate(value)
    except NotMatched:
        return None
    if not isinstance(value, _Pred):
        return None
    causal, window = False, None
    for term in value.terms:
        c = dict(term.coeffs)
        if set(c) - {-2, -1}:
            return None
        a_p, a_m = c.get(-2, 0), c.get(-1, 0)
        if (a_p, a_m, term.const) == (-1, 1, 0):  # m - p <= 0
            causal = True
        elif (a_p, a_m) == (1, -1) and 1 - term.const >= 1:  # p - m <= -const, i.e. p - m < W
            w = 1 - term.const
            window = w if window is None else min(window, w)
        else:
            return None
    if not causal and window is None:
        return None
    return {"causal": causal, "window": window}


class _MaskEval:
    """Symbolic evaluation of a mask subgraph over index arithmetic; NotMatched otherwise."""

    def __init__(self) -> None:
        self.memo: dict[fx.Node, object] = {}

    def eval(self, x):
        if not isinstance(x, fx.Node):
            if isinstance(x, bool):
                return _Pred((), 0) if x else None
            if _is_number(x):
                return x
            raise NotMatched(f"constant {x!r}")
        if x not in self.memo:
            self.memo[x] = self._node(x)
        return self.memo[x]

    def _node(self, n: fx.Node):
        t, args = n.target, n.args
        if _is_call(n, (torch.arange,)):
            if len(args) != 1:  # the end may be symbolic (dynamic shapes); no start or step
                raise NotMatched("arange with a start or step")
            return _Affine(((-1, 1),), 0, 1)
        if _is_call(n, (torch.tensor,)) and _is_number(args[0]):
            return args[0]
        if _is_call(n, (torch.zeros,)) and len(_shape(n)) == 0:
            return 0
        if _is_call(n, (), "new_ones") and _dtype(n) == torch.bool and len(_shape(n)) == 0:
            return _Pred((), 0)
        if _is_call(n, (), "to") or _is_call(n, (), "bool") or _is_call(n, (), "contiguous"):
            inner = self.eval(args[0])
            if isinstance(inner, _Pred) and _dtype(n) != torch.bool:
                raise NotMatched("a predicate cast to a number")
            return inner
        if _is_call(n, (), "expand"):
            inner = self.eval(args[0])
            return _with_ndim(inner, len(_shape(n)))
        if _is_call(n, (torch.unsqueeze,), "unsqueeze") or _is_call(n, (operator.getitem,)):
            return self._reindex(n)
        if _is_call(n, (operator.add, torch.add), "add") or _is_call(n, (operator.sub, torch.sub), "sub"):
            a, b = self.eval(args[0]), self.eval(args[1])
            sign = -1 if n.target in (operator.sub, torch.sub) or n.target == "sub" else 1
            return _affine(a).plus(_affine(b), sign)
        comparisons = {operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt",
                       torch.le: "le", torch.lt: "lt", torch.ge: "ge", torch.gt: "gt"}
        op = comparisons.get(t) if n.op == "call_function" else (t if t in ("le", "lt", "ge", "gt") else None)
        if op:
            a, b = _affine(self.eval(args[0])), _affine(self.eval(args[1]))
            d = a.plus(b, -1)  # a - b
            neg = _Affine(tuple((ax, -c) for ax, c in d.coeffs), -d.const, d.ndim)
            term = {"le": d, "lt": _Affine(d.coeffs, d.const + 1, d.ndim),
                    "ge": neg, "gt": _Affine(neg.coeffs, neg.const + 1, neg.ndim)}[op]
            return _Pred((term,), term.ndim)
        if _is_call(n, (operator.and_, torch.logical_and, torch.bitwise_and), "logical_and"):
            a, b = self.eval(args[0]), self.eval(args[1])
            if not (isinstance(a, _Pred) and isinstance(b, _Pred)):
                raise NotMatched("& of non-predicates")
            return _Pred(a.terms + b.terms, max(a.ndim, b.ndim))
        if _is_call(n, (operator.invert, torch.logical_not), "logical_not"):
            inner = self.eval(args[0])
            if not isinstance(inner, _Pred):
                raise NotMatched("~ of a non-predicate")
            return _negate(inner)
        if _is_call(n, (torch.where,)) and len(args) == 3:
            cond, keep, drop = self.eval(args[0]), args[1], args[2]
            keep = self.eval(keep) if isinstance(keep, fx.Node) else keep
            drop = self.eval(drop) if isinstance(drop, fx.Node) else drop
            if isinstance(cond, _Pred) and keep == 0 and _is_number(drop) and drop <= NEG_LARGE:
                return cond  # an additive mask: 0 where the predicate holds, -inf elsewhere
        raise NotMatched(f"{n.format_node()} is not index arithmetic")

    def _reindex(self, n: fx.Node):
        """Unsqueeze / None-and-full-slice indexing: move the value's axes, keep its terms."""
        inner = self.eval(n.args[0])
        old_nd = len(_shape(n.args[0]))
        new_nd = len(_shape(n))
        if _is_call(n, (torch.unsqueeze,), "unsqueeze"):
            d = n.args[1] % new_nd
            where = [k for k in range(new_nd) if k != d]
        else:
            key = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
            if any(k is Ellipsis for k in key):
                raise NotMatched("Ellipsis in a mask index")
            where, pos = [], 0
            full = slice(None, None, None)
            for k in key:
                if k is None:
                    pos += 1
                elif k == full:
                    where.append(pos)
                    pos += 1
                else:
                    raise NotMatched(f"index {k!r} in a mask")
            where += list(range(pos, pos + old_nd - len(where)))
        if len(where) != old_nd:
            raise NotMatched("mask indexing changes the rank")
        # old axis a (from the right: a - old_nd) moves to where[a] (from the right: - new_nd)
        move = {a - old_nd: where[a] - new_nd for a in range(old_nd)}
        return _moved(inner, move, new_nd)


def _negate(pred: _Pred) -> _Pred:
    """not (d <= 0) is d >= 1, i.e. -d + 1 <= 0 over integers; a conjunction would need `or`."""
    if len(pred.terms) != 1:
        raise NotMatched("the negation of a conjunction")
    d = pred.terms[0]
    return _Pred((_Affine(tuple((a, -c) for a, c in d.coeffs), 1 - d.const, d.ndim),), pred.ndim)


def _affine(v) -> _Affine:
    if isinstance(v, _Affine):
        return v
    if _is_number(v) and float(v).is_integer():
        return _Affine((), int(v), 0)
    raise NotMatched(f"{v!r} is not an integer index expression")


def _with_ndim(v, ndim: int):
    if isinstance(v, _Affine):
        return _Affine(v.coeffs, v.const, ndim)
    if isinstance(v, _Pred):
        return _Pred(v.terms, ndim)
    return v


def _moved(v, move: dict[int, int], ndim: int):
    if isinstance(v, _Affine):
        return _Affine(tuple(sorted((move[a], c) for a, c in v.coeffs)), v.const, ndim)
    if isinstance(v, _Pred):
        return _Pred(tuple(_moved(t, move, ndim) for t in v.terms), ndim)
    return v
