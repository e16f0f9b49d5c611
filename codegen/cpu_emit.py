"""The CPU emitter: a kernel plan -> readable tiled PyTorch code (DESIGN section 6).

The same plan the Triton emitter reads (lowering/plan.py) becomes one Python function per
stage, made of plain torch calls:

    for each query tile (all grid ranks B, H, ... at once: one big vectorized tile)
        prologue      Einsums without the key rank
        accumulators  carried reductions (running max, running sums)
        for each key tile the skipping plan allows (loop bounds from the predicates):
            full tile    -> stream Einsums and carried updates, no masks at all
            partial tile -> the predicate's mask first; an empty mask skips the tile;
                            then the same Einsums with masks (absent points contribute
                            nothing) and the online max rescaling
        epilogue      Einsums after the loop; stores, absent rows take the output's fill

So the largest temporary is one score tile (grid x BLOCK_Q x BLOCK_S), never P x M: memory is
O(N). Values are named after the cascade's tensors; every value is a torch tensor whose dims
are its *tile axes* in one canonical order (grid ranks, query ranks, key ranks, then feature
ranks; one dim per rank, so 2-D neighborhoods need no flattening), so broadcasting is only ever
unsqueezing and a sum of products is one `torch.einsum`. The generated source is shown by `CpuKernel.source()`.

Entry point: `compile_cpu(cascade) -> CpuKernel`; it raises `LoweringError` (with the plan's
reason) for cascades without a fused lowering, exactly like the Triton backend.
"""
from __future__ import annotations

import itertools
import linecache
import re
import string

import torch

from einsum_ir.codegen.block_emit import (
    BlockEmitter,
    Section,
    Val,
    accesses,
    is_simple,
    module_header,
    paren,
)
from einsum_ir.codegen.kernel import collect_outputs
from einsum_ir.errors import LoweringError
from einsum_ir.ir import (
    Access,
    Binary,
    Cascade,
    Einsum,
    Index,
    rank_of,
)
from einsum_ir.params import bind_arguments
from einsum_ir.lowering.plan import Plan, Stage, build_plan

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_S = 512

# --------------------------------------------------------------------------- runtime helpers

HELPERS = '''
def _key_tiles(ranges, keys, block):
    """Key tiles [lo, hi] covering the union of key ranges [lo, hi), in order, each key once.

    On the CPU a tile is a slice, so tiles start where a range starts (no alignment) and the
    last one of a range is simply shorter."""
    done = 0
    for lo, hi in sorted((max(lo, 0), min(hi, keys)) for lo, hi in ranges):
        lo = max(lo, done)
        for start in range(lo, hi, block):
            yield start, min(start + block, hi) - 1
        done = max(done, hi)


def _tiles(n, block):
    """Query tiles [lo, hi] of a rank of extent n."""
    for lo in range(0, n, block):
        yield lo, min(lo + block, n) - 1


def _select(c, a, b):
    """Scalar where (the skipping plan's tl.where on loop bounds)."""
    return a if c else b


def _cdiv(a, b):
    return -(-a // b)


def _imin(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    return min(a, b)


def _imax(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
    return max(a, b)


def _nbhd_start(q, L, w, s):
    """First key of the GNA window of query q (Hassani et al. 2025): monotone in q."""
    left = w // 2
    right = w // 2 + w % 2 - 1
    leader = _imin((q // s) * s + s // 2, L - 1)
    start = _imax(leader - left, 0) + (leader + right >= L) * (L - right - leader - 1)
    return _imax(start, 0)


def _nbhd(q, k, L, w, s=1, d=1):
    """True where key k lies in the (strided, dilated) neighborhood of query q."""
    group = q % d
    glen = (L - group + d - 1) // d
    start = _nbhd_start(q // d, glen, w, s)
    kk = k // d
    return ((k % d) == group) & (kk >= start) & (kk < start + w)


def _gather(t, *idx):
    """t[idx...] for integer index tensors (broadcast together); reads outside t are 0."""
    valid = None
    clamped = []
    for pos, i in enumerate(idx):
        if isinstance(i, torch.Tensor):
            ok = (i >= 0) & (i < t.shape[pos])
            valid = ok if valid is None else valid & ok
            i = i.clamp(0, t.shape[pos] - 1)
        clamped.append(i)
    out = t[tuple(clamped)]
    if valid is None:
        return out.clone()  # constant indices give a view; callers may work in place
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype))
'''

TORCH_UNARY = {
    "exp": "torch.exp({0})", "log": "torch.log({0})", "log1p": "torch.log1p({0})",
    "sqrt": "torch.sqrt({0})", "rsqrt": "torch.rsqrt({0})", "tanh": "torch.tanh({0})",
    "sigmoid": "torch.sigmoid({0})", "softplus": "torch.nn.functional.softplus({0})", "relu": "torch.relu({0})",
    "elu": "torch.nn.functional.elu({0})", "abs": "torch.abs({0})",
}
INPLACE = ("exp", "log", "log1p", "sqrt", "rsqrt", "tanh", "sigmoid", "relu", "abs")
MATH_UNARY = {
    "exp": "math.exp({0})", "log": "math.log({0})", "log1p": "math.log1p({0})",
    "sqrt": "math.sqrt({0})", "rsqrt": "(1.0 / math.sqrt({0}))", "tanh": "math.tanh({0})",
    "sigmoid": "(1.0 / (1.0 + math.exp(-({0}))))", "abs": "abs({0})",
    "relu": "max({0}, 0.0)",
}


def _skip_code(code: str) -> str:
    """A skipping-plan code string (written for Triton) as plain Python on ints."""
    code = code.replace("tl.minimum(", "min(").replace("tl.maximum(", "max(")
    code = code.replace("tl.where(", "_select(").replace("tl.cdiv(", "_cdiv(")
    if "tl." in code:
        raise LoweringError(f"the skipping plan uses {code!r}, which the CPU emitter cannot translate")
    return code


class StageEmitter(BlockEmitter):
    """One stage of a plan -> one Python function over torch tensors."""

    def __init__(self, plan: Plan, stage: Stage, name: str):
        super().__init__(plan, stage, name)
        self.order = list(stage.grid) + list(stage.query) + list(stage.stream) + list(stage.features)
        self.qset, self.kset = set(stage.query), set(stage.stream)
        self.letters = self._letters()
        self.used_index_values: set[str] = set()
        self.views: dict[str, tuple[str, ...]] = {}  # full tensor -> stage-view axes

    # ------------------------------------------------------------------ axes
    def _letters(self) -> dict[str, str]:
        used, out = set(), {}
        pref = {self.s.query[0]: "q", self.s.stream[0]: "k"} if len(self.s.query) == len(self.s.stream) == 1 else {}
        for a in self.order:
            want = pref.get(a, a if len(a) == 1 else a[0])
            if want in used or want not in string.ascii_lowercase:
                want = next(ch for ch in string.ascii_lowercase if ch not in used and ch not in self.order)
            used.add(want)
            out[a] = want
        return out

    def canon(self, axes) -> tuple[str, ...]:
        axes = set(axes)
        unknown = axes - set(self.order)
        if unknown:
            raise LoweringError(f"rank(s) {', '.join(sorted(unknown))} are neither grid, query, key nor "
                                f"feature ranks of stage {self.s.index}")
        return tuple(a for a in self.order if a in axes)

    def align(self, code: str, frm: tuple[str, ...], to: tuple[str, ...]) -> str:
        """Unsqueeze a value with dims `frm` to broadcast against dims `to` (frm in to)."""
        if not frm or frm == to:
            return code
        idx = [":" if a in frm else "None" for a in to]
        while idx and idx[0] == "None":  # broadcasting adds leading dims
            idx.pop(0)
        while idx and idx[-1] == ":":
            idx.pop()
        if not idx:
            return code
        return f"{paren(code)}[{', '.join(idx)}]"

    def shape(self, axes) -> str:
        dims = []
        for a in axes:
            if a in self.qset or a in self.kset:
                dims.append(f"_n_{a}")
            else:
                dims.append(rank_of(a))
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    # ------------------------------------------------------------------ expressions
    def num(self, v: Val) -> str:
        if v.kind == "bool":
            return f"{paren(v.code)}.to(DT)" if v.axes else f"float({v.code})"
        return v.code

    def index(self, name: str) -> Val:
        self.used_index_values.add(name)  # the stage function defines only the index tiles it reads
        return super().index(name)

    def logical_not(self, v: Val) -> Val:
        if v.scalar:
            return Val(f"(not {self.truth(v)})", (), "bool")
        return Val(f"(~{paren(self.truth(v))})", v.axes, "bool")

    def logical(self, op: str, a: Val, b: Val, axes: tuple[str, ...]) -> Val:
        ac, bc = self.align(self.truth(a), a.axes, axes), self.align(self.truth(b), b.axes, axes)
        if not axes:
            return Val(f"({ac} {op} {bc})", (), "bool")
        return Val(f"({paren(ac)} {'&' if op == 'and' else '|'} {paren(bc)})", axes, "bool")

    def nbhd(self, args: list[Val]) -> Val:
        axes = self.canon([x for a in args for x in a.axes])
        codes = [self.align(a.code, a.axes, axes) for a in args]
        return Val(f"_nbhd({', '.join(codes)})", axes, "bool")

    def where(self, args: list[Val], axes: tuple[str, ...], pres: str | None, pax: tuple) -> Val:
        c = self.align(self.truth(args[0]), args[0].axes, axes)
        x = self.align(self.num(args[1]), args[1].axes, axes)
        y = self.align(self.num(args[2]), args[2].axes, axes)
        if not axes:
            return Val(f"({x} if {c} else {y})", (), "float", pres, pax)
        if args[1].scalar and args[2].scalar and args[0].axes != axes:
            c = f"{c}.expand({self.shape(axes)[1:-1]})"
        return Val(self.select(c, x, y), axes, "float", pres, pax)

    def call(self, fn: str, args: list[Val], axes: tuple[str, ...], pres: str | None, pax: tuple,
             sec: Section) -> Val:
        codes = [self.align(self.num(a), a.axes, axes) for a in args]
        if not axes:  # scalar math (params, dims)
            if fn in MATH_UNARY:
                return Val(MATH_UNARY[fn].format(codes[0]), (), "float", pres, pax)
            if fn in ("max", "min"):
                return Val(f"{fn}({codes[0]}, {codes[1]})", (), "float", pres, pax)
            if fn == "pow":
                return Val(f"({codes[0]} ** {codes[1]})", (), "float", pres, pax)
            if fn in ("softplus", "elu"):
                return Val(f"{TORCH_UNARY[fn].format(f'torch.tensor(float({codes[0]}))')}.item()", (),
                           "float", pres, pax)
            raise LoweringError(f"function {fn}() has no CPU lowering")
        if fn in TORCH_UNARY:
            x = codes[0]
            if args[0].kind == "int":
                x = f"{paren(x)}.to(DT)"
            elif fn in INPLACE and not is_simple(x) and set(args[0].axes) == set(axes):
                # the argument is a fresh temporary of the full tile: compute in place
                return Val(f"{paren(x)}.{fn}_()", axes, "float", pres, pax)
            return Val(TORCH_UNARY[fn].format(x), axes, "float", pres, pax)
        if fn == "pow":
            a, b = codes
            if args[0].scalar:
                return Val(f"torch.pow(float({a}), {b})", axes, "float", pres, pax)
            return Val(f"torch.pow({a}, {b})", axes, "float", pres, pax)
        if fn in ("max", "min"):
            a, b = codes
            clamp = "min" if fn == "max" else "max"
            if args[1].scalar:
                return Val(f"torch.clamp({a}, {clamp}={b})", axes, "float", pres, pax)
            if args[0].scalar:
                return Val(f"torch.clamp({b}, {clamp}={a})", axes, "float", pres, pax)
            return Val(f"torch.{'maximum' if fn == 'max' else 'minimum'}({a}, {b})", axes, "float", pres, pax)
        raise LoweringError(f"function {fn}() has no CPU lowering")

    # ------------------------------------------------------------------ loads
    def load(self, a: Access, sec: Section) -> Val:
        """A tile of a tensor that lives outside the stage (input or earlier stage's result)."""
        t = a.tensor
        info = self.c.tensors[t]
        kind = "float"
        if t in self.c.input_names and info.dtype in ("bool",):
            kind = "bool"
        elif t in self.c.input_names and info.dtype.startswith("int"):
            kind = "int"
        plain = all(isinstance(i, Index) for i in a.indices)
        vars_ = [i.name for i in a.indices] if plain else []
        if plain and len(set(vars_)) == len(vars_):
            key = (t, tuple(vars_))
            if key not in self.view_of:
                self.view_of[key] = self._make_view(t, vars_)
            view, vaxes = self.view_of[key]
            where = "S" if self.kset & set(vaxes) else "Q" if self.qset & set(vaxes) else "stage"
            name = t + {"S": "_j", "Q": "_i", "stage": ""}[where]
            if self.first_view.setdefault(t, key) != key:
                name = self.fresh(name)
            if key + (where,) not in self.loaded:
                idx = []
                for ax in vaxes:
                    idx.append(f"q_lo_{ax}:q_hi_{ax} + 1" if ax in self.qset else
                               f"k_lo_{ax}:k_hi_{ax} + 1" if ax in self.kset else ":")
                while idx and idx[-1] == ":":
                    idx.pop()
                code = f"{view}[{', '.join(idx)}]" if idx else view
                target = {"S": self.key_loads, "Q": self.query_loads, "stage": self.stage_loads}[where]
                target.add(f"{name} = {code}")
                self.loaded[key + (where,)] = name
                if where != "S":
                    self.hoistable.add(name)
            return Val(self.loaded[key + (where,)], vaxes, kind)
        # a gather: index expressions (Sel[b, h, p // BS, m // BS])
        idx_vals = [self.emit(i, sec) for i in a.indices]
        axes = self.canon([x for v in idx_vals for x in v.axes])
        key = (t, tuple(map(repr, a.indices)), self.masked, self.in_loop)
        if key in self.gathers:
            return self.gathers[key]
        codes = [self.align(v.code, v.axes, axes) if v.axes else v.code for v in idx_vals]
        name = self.fresh(t)
        sec.add(f"{name} = _gather({t}_all, {', '.join(codes)})")
        self.full_inputs.add(t)
        val = Val(name, axes, kind)
        self.gathers[key] = val
        return val

    def _make_view(self, t: str, vars_: list[str], store: bool = False) -> tuple[str, tuple[str, ...]]:
        """Code for the stage view of tensor t: its dims permuted to the canonical tile order
        (a view, so stores write through)."""
        if not store:
            self.full_inputs.add(t)
        vaxes = self.canon(vars_)
        perm = [vars_.index(a) for a in vaxes]
        if perm == list(range(len(vars_))):
            return f"{t}_all", vaxes
        name = f"{t}_v"
        self.view_lines.append(f"{name} = {t}_all.permute({', '.join(map(str, perm))})")
        return name, vaxes

    # ------------------------------------------------------------------ reductions
    def sum_term(self, inner: list[Val], outer: list[Val], red: set[str], out_axes: tuple[str, ...],
                 mask: tuple | None, sec: Section) -> tuple[str, tuple[str, ...], list[Val]]:
        ops = [(self.num(v), v.axes) for v in inner]
        scalars = [v for v in outer if v.scalar and v.kind != "bool"]
        if len(ops) >= 2 and scalars:
            # fold scalar factors (scale) into the smallest operand, not the score tile
            k = min(range(len(ops)), key=lambda i: (bool(self.kset & set(ops[i][1])),
                                                    bool(self.qset & set(ops[i][1])), len(ops[i][1])))
            c, ax = ops[k]
            factor = " * ".join(v.code for v in scalars)
            if self.in_loop and not self.kset & set(ax) and c in self.hoistable:
                key = (c, factor)
                if key not in self.hoisted:
                    name = f"{c}_x_{scalars[0].code}" if len(scalars) == 1 and scalars[0].code.isidentifier() \
                        else self.fresh(f"{c}_x")
                    self.query_loads.add(f"{name} = {c} * {factor}")
                    self.hoisted[key] = name
                ops[k] = (self.hoisted[key], ax)
            else:
                ops[k] = (f"{paren(c)} * {factor}", ax)
            outer = [v for v in outer if v not in scalars]
        if mask is not None:
            m, max_ = mask
            cover = next((k for k, (_, ax) in enumerate(ops) if set(max_) <= set(ax)), None)
            if cover is None:  # no factor spans the mask: form the product (rare)
                axes = self.canon([x for _, ax in ops for x in ax] + list(max_))
                prod = " * ".join(self.align(c, ax, axes) for c, ax in ops) or "1.0"
                ops = [(self.select(self.align(m, max_, axes), prod, "0.0"), axes)]
            else:
                c, ax = ops[cover]
                key = (c, m)
                if key not in self.masked_cse:
                    name = self.fresh((c if c.isidentifier() else "x") + "_m")
                    sec.add(f"{name} = {self.select(self.align(m, max_, ax), c, '0.0')}")
                    self.masked_cse[key] = name
                ops[cover] = (self.masked_cse[key], ax)
        term_axes = self.canon([x for _, ax in ops for x in ax if x not in red])
        if len(ops) == 1:
            c, ax = ops[0]
            dims = [ax.index(x) for x in ax if x in red]
            term = f"{paren(c)}.sum({dims[0] if len(dims) == 1 else tuple(dims)})"
        else:
            subs = ",".join("".join(self.letters[x] for x in ax) for _, ax in ops)
            out = "".join(self.letters[x] for x in term_axes)
            term = f"torch.einsum(\"{subs}->{out}\", {', '.join(c for c, _ in ops)})"
        return term, term_axes, outer

    # ------------------------------------------------------------------ Einsums by class
    def map_or_reduce(self, e: Einsum, sec: Section, where_mask: tuple | None) -> tuple:
        """Emit `e` (no key reduction) and return its presence (code, axes) or (None, ())."""
        axes = self.axes_of[e.name]
        red = {x for v in e.reduced for x in self.var_axes(v)}
        if e.reduced:
            if e.reduce != "sum":
                raise LoweringError(f"{e.name}: a {e.reduce} over ranks {', '.join(e.reduced)} inside a "
                                    f"tile is not emitted on the CPU")
            vals_pres = self._operand_pres(e, sec)
            mask = None
            parts = ([vals_pres] if vals_pres[0] else [])
            if where_mask and set(where_mask[1]) & red:
                parts.append(where_mask)
            if parts:
                mask = self.conjunction(parts)
            code = self.reduce_sum(e, sec, red, mask)
            pres = (None, ())
            if mask is not None:
                pres = self.reduce("any", *mask, red)
            if where_mask and not set(where_mask[1]) & red:
                pres = self.conjunction([p for p in (pres, where_mask) if p[0]])
        else:
            v = self.emit(e.expr, sec)
            code = self.align(self.num(v), v.axes, axes)
            if set(v.axes) != set(axes):
                if v.scalar:
                    code = f"torch.full({self.shape(axes)}, {code}, dtype=DT)"
                else:
                    code = f"{code}.expand({self.shape(axes)[1:-1]})"
            pres = (v.pres, v.pres_axes)
            if where_mask:
                pres = self.conjunction([p for p in (pres, where_mask) if p[0]])
        sec.add(f"{e.name} = {code}")
        if pres[0] and not is_simple(pres[0]):
            name = f"{e.name}_pres"
            sec.add(f"{name} = {pres[0]}")
            pres = (name, pres[1])
        return pres

    def _operand_pres(self, e: Einsum, sec: Section) -> tuple:
        parts = []
        for f in accesses(e.expr):
            if f.tensor in self.local and f.tensor not in self.s.loads:
                if self.in_loop and self.masked and f.tensor in self.mask_of:
                    parts.append(self.mask_of[f.tensor])
                elif not self.in_loop and f.tensor in self.pres_after and self.pres_after[f.tensor][0]:
                    parts.append(self.pres_after[f.tensor])
        return self.conjunction(list(dict.fromkeys(parts)))

    def where_mask(self, e: Einsum, sec: Section) -> tuple | None:
        if e.where is None:
            return None
        key = repr(e.where)
        if key in self.pred_cse:
            return self.pred_cse[key]
        w = self.emit(e.where, sec)
        code = self.truth(w)
        if not w.axes:
            raise LoweringError(f"{e.name}: a predicate with no tile axis is not emitted on the CPU")
        if not is_simple(code):
            name = f"{e.name}_where"
            sec.add(f"{name} = {code}")
            code = name
        self.pred_cse[key] = (code, w.axes)
        return (code, w.axes)

    def stream_einsum(self, e: Einsum, sec: Section) -> None:
        wm = self.where_mask(e, sec) if self.masked else None
        pres = self.map_or_reduce(e, sec, wm)
        if self.masked and pres[0]:
            self.mask_of[e.name] = pres

    def carried_einsum(self, e: Einsum, sec: Section) -> None:
        axes = self.axes_of[e.name]
        red = {x for v in e.reduced for x in self.var_axes(v)}
        mask = None
        if self.masked:
            parts = []
            op = self._operand_pres(e, sec)
            if op[0]:
                parts.append(op)
            wm = self.where_mask(e, sec)
            if wm:
                parts.append(wm)
            if parts:
                code, pax = self.conjunction(parts)
                if not is_simple(code):
                    name = f"{e.name}_mask"
                    sec.add(f"{name} = {code}")
                    code = name
                mask = (code, pax)
        if e.reduce == "max":
            self.carried_max(e, red, mask, sec)
        elif e.reduce == "sum":
            self.carried_sum(e, self.reduce_sum(e, sec, red, mask), sec)
        else:
            raise LoweringError(f"{e.name}: a {e.reduce} over the key rank is not emitted")
        if self.track_any:
            if mask is None:
                sec.add(f"{e.name}_any.fill_(True)")
            else:
                x, rest = self.reduce("any", *mask, red)
                sec.add(f"{e.name}_any |= {self.align(x, rest, axes)}")

    def select(self, cond: str, a: str, b: str) -> str:
        return f"torch.where({cond}, {a}, {b})"

    def maximum(self, a: str, b: str) -> str:
        return f"torch.maximum({a}, {b})"

    def reduce(self, op: str, code: str, axes: tuple[str, ...], red) -> tuple[str, tuple[str, ...]]:
        dims = [axes.index(a) for a in axes if a in red]
        if dims:
            code = f"{paren(code)}.{'amax' if op == 'max' else op}({dims[0] if len(dims) == 1 else tuple(dims)})"
        return code, tuple(a for a in axes if a not in red)

    def exp(self, v: Val, sec: Section) -> Val:
        # a rescale factor is one small tile per key tile: plain torch.exp (readable), not in place
        return Val(f"torch.exp({paren(v.code)})" if v.axes else f"math.exp({v.code})", v.axes)

    def after_loop_einsum(self, e: Einsum, sec: Section) -> None:
        pres = self.map_or_reduce(e, sec, None)
        self.pres_after[e.name] = pres

    # ------------------------------------------------------------------ the stage function
    def _tile_positions(self, ranks, side: str, indent: str) -> list[str]:
        """Per rank of a tile: its length, and its positions when the cascade reads them as values."""
        lines = []
        for r in ranks:
            lines.append(f"{indent}_n_{r} = {side}_hi_{r} - {side}_lo_{r} + 1")
            if r in self.used_index_values:
                lines.append(f"{indent}{r} = torch.arange({side}_lo_{r}, {side}_hi_{r} + 1)")
        return lines

    def generate(self) -> str:
        s, c = self.s, self.c
        for e in s.einsums:
            self.axes_of[e.name] = self.canon([x for v in e.lhs_vars for x in self.var_axes(v)])
        self.view_of: dict = {}
        self.first_view: dict = {}
        self.view_lines: list[str] = []
        self.loaded: dict = {}
        self.hoistable: set[str] = set()
        self.hoisted: dict = {}
        self.full_inputs: set[str] = set()
        self.gathers: dict = {}
        self.stage_loads, self.query_loads, self.key_loads = Section(indent=1), Section(indent=2), Section(indent=3)
        self.pres_after: dict[str, tuple] = {}
        self.mask_of: dict[str, tuple] = {}
        self.pred_cse: dict = {}
        self.masked_cse: dict = {}
        self.finalize: list[str] = []
        self.alpha: dict = {}

        # -- per query tile: prologue and accumulators
        qsec = Section(indent=2)
        self.in_loop = False
        for e in s.einsums:
            if s.kind[e.name] == "prologue":
                self.after_loop_einsum(e, qsec)
        carried = [e for e in s.einsums if s.kind[e.name] == "carried"]
        for e in carried:
            axes = self.axes_of[e.name]
            init = "-math.inf" if e.reduce == "max" else "0.0"
            qsec.add(f"{e.name} = torch.full({self.shape(axes)}, {init}, dtype=DT)")
            if self.track_any:
                qsec.add(f"{e.name}_any = torch.zeros({self.shape(axes)}, dtype=torch.bool)")

        # -- key loop bodies
        body = [e for e in s.einsums if s.kind[e.name] in ("stream", "key_side", "carried")]
        self.in_loop = True

        def emit_body(masked: bool, indent: int) -> list[str]:
            self.masked = masked
            self.mask_of, self.finalize, self.alpha = {}, [], {}
            self.pred_cse, self.masked_cse, self.gathers = {}, {}, {}
            sec = Section(indent=indent)
            if masked and s.predicate is not None:
                # the stage predicate guards every carried reduction: an empty tile is skipped
                w = self.emit(s.predicate, sec)
                code = self.truth(w)
                sec.add(f"_live = {code}")
                self.pred_cse[repr(s.predicate)] = ("_live", w.axes)
                for g in s.einsums:
                    if g.where is not None and repr(g.where) == repr(s.predicate):
                        self.pred_cse[repr(g.where)] = ("_live", w.axes)
                sec.add("if not bool(_live.any()):")
                sec.add("    _stats['empty'] += 1")
                sec.add("    continue")
            for e in body:
                if s.kind[e.name] == "carried":
                    self.carried_einsum(e, sec)
                else:
                    self.stream_einsum(e, sec)
            for line in self.finalize:
                sec.add(line)
            tiles = {e.name for e in body if s.kind[e.name] in ("stream", "key_side")}
            return _free_dead(sec.lines, tiles, indent)

        full = _skip_code(s.skip.full) if s.skip.dnf else "True"
        wheres = {repr(e.where) for e in body if e.where is not None}
        if wheres and not wheres <= {repr(x) for x in _conjuncts(s.predicate)}:
            full = "False"  # a predicate the skipping plan does not cover: mask every tile
        if full == "True":
            loop_body = ["            _stats['full'] += 1"] + emit_body(False, 3)
        elif full == "False":
            loop_body = ["            _stats['partial'] += 1"] + emit_body(True, 3)
        else:
            unmasked = emit_body(False, 4)
            masked = emit_body(True, 4)
            loop_body = [f"            if {full}:", "                _stats['full'] += 1"] + unmasked + \
                        ["            else:", "                _stats['partial'] += 1"] + masked
        self.in_loop = False
        self.masked = False

        # -- epilogue and stores
        post = Section(indent=2)
        for e in carried:
            self.pres_after[e.name] = (f"{e.name}_any", self.axes_of[e.name]) if self.track_any else (None, ())
        for e in s.einsums:
            if s.kind[e.name] == "epilogue":
                self.after_loop_einsum(e, post)
        for t in s.stores:
            self.store(t, post)

        # -- assemble
        args = self.arg_names()
        head = (f"def {self.name}({', '.join(args['tensors'])}, *, {', '.join(args['scalars'])}, "
                f"BLOCK_Q, BLOCK_S, DT, _stats):")
        lines = [head]
        kinds = ", ".join(f"{e.name}: {s.kind[e.name]}" for e in s.einsums)
        lines.append(f'    """Stage {s.index}: stream {",".join(s.stream)} | query {",".join(s.query)} | '
                     f'grid {",".join(s.grid) or "-"} | features {",".join(s.features) or "-"}.')
        lines.append(f"    {kinds}")
        lines.append(f'    Skipping: {s.skip.describe()}."""')
        for k in s.stream:
            lines.append(f"    KEYS_{k} = {rank_of(k)}")
        for t in sorted(self.full_inputs):
            info = c.tensors[t]
            if t in c.input_names and (info.dtype == "bool" or info.dtype.startswith("int")):
                continue
            lines.append(f"    {t}_all = {t}_all.to(DT)")
        lines += ["    " + ln for ln in self.view_lines]
        for v in sorted(self.used_index_values):
            if v in s.grid or v in s.features:
                lines.append(f"    {v} = torch.arange({rank_of(v)})")
        lines += self.stage_loads.lines
        lines += _block_split("    ", "BLOCK_Q", "_bq", s.query)
        lines += _block_split("    ", "BLOCK_S", "_bs", s.stream)
        if len(s.query) == 1:
            q = s.query[0]
            lines.append(f"    for q_lo_{q}, q_hi_{q} in _tiles({rank_of(q)}, BLOCK_Q):")
        else:
            heads = ", ".join(f"(q_lo_{q}, q_hi_{q})" for q in s.query)
            its = ", ".join(f"_tiles({rank_of(q)}, _bq_{q})" for q in s.query)
            lines.append(f"    for {heads} in itertools.product({its}):")
        lines += self._tile_positions(s.query, "q", "        ")
        lines += self.query_loads.lines
        lines += qsec.lines
        boxes = s.skip.ranges or [{}]
        if len(s.stream) == 1:
            k = s.stream[0]
            rs = []
            for box in boxes:
                lo, hi = box.get(k, ("0", f"KEYS_{k}"))
                rs.append(f"({_skip_code(lo)}, {_skip_code(hi)})")
            lines.append(f"        for k_lo_{k}, k_hi_{k} in _key_tiles([{', '.join(rs)}], KEYS_{k}, BLOCK_S):")
        else:
            if len(boxes) != 1:
                raise LoweringError("several key boxes over flattened key ranks: the CPU emitter "
                                    "expects the plan's hull")
            heads, its = [], []
            for k in s.stream:
                lo, hi = boxes[0].get(k, ("0", f"KEYS_{k}"))
                heads.append(f"(k_lo_{k}, k_hi_{k})")
                its.append(f"_key_tiles([({_skip_code(lo)}, {_skip_code(hi)})], KEYS_{k}, _bs_{k})")
            lines.append(f"        for {', '.join(heads)} in itertools.product({', '.join(its)}):")
        lines += self._tile_positions(s.stream, "k", "            ")
        lines += self.key_loads.lines
        lines += loop_body
        lines += post.lines
        return "\n".join(lines) + "\n"

    def store(self, t: str, sec: Section) -> None:
        axes = self.axes_of[t]
        e = self.local[t]
        vars_ = [i.name for i in e.target.indices]
        view, vaxes = self._make_view(t, vars_, store=True)
        assert vaxes == axes
        idx = [f"q_lo_{ax}:q_hi_{ax} + 1" if ax in self.qset else ":" for ax in vaxes]
        while idx and idx[-1] == ":":
            idx.pop()
        val = t
        pres, pax = self.pres_after.get(t, (None, ()))
        fill = next((o.fill for o in self.c.outputs if o.name == t), 0.0)
        if pres:
            val = f"torch.where({self.align(pres, pax, axes)}, {t}, {self.number(float(fill))})"
        target = f"{view}[{', '.join(idx)}]" if idx else view
        if not self.qset & set(axes):
            raise LoweringError(f"{t} has no query rank; the CPU emitter stores per query tile")
        sec.add(f"{target} = {val}")

    def arg_names(self) -> dict:
        c, s = self.c, self.s
        tensors = []
        for t in s.loads + s.stores:
            if f"{t}_all" not in tensors:
                tensors.append(f"{t}_all")
        scalars = list(c.dims) + [p.name for p in c.params]
        return {"tensors": tensors, "scalars": scalars}


def _block_split(pad: str, block: str, prefix: str, ranks: tuple[str, ...]) -> list[str]:
    """Tile sizes per rank when a tile axis spans several ranks: the fastest rank first."""
    if len(ranks) == 1:
        return []
    out, rest = [], block
    for v in reversed(ranks):
        out.append(f"{pad}{prefix}_{v} = max(1, min({rank_of(v)}, {rest}))")
        rest = f"({rest} // {prefix}_{v})"
    return out


_TEMP = re.compile(r"^(_live|\w+_m_\d+|\w+_(where|mask|pres)|[A-Z]\w*_\d+)$")


def _free_dead(lines: list[str], tiles: set[str], indent: int) -> list[str]:
    """Insert `del` after the last use of each tile-sized temporary of a loop body, so that at
    most a few score tiles are alive at once (and none survives into the next key tile)."""
    pad = "    " * indent
    defined = []
    for line in lines:
        if line.startswith(pad) and not line.startswith(pad + " ") and " = " in line:
            name = line.strip().split(" = ")[0]
            if name.isidentifier() and (name in tiles or _TEMP.match(name)) and name not in defined:
                defined.append(name)
    last: dict[int, list[str]] = {}
    for name in defined:
        pat = re.compile(rf"\b{re.escape(name)}\b")
        k = max(i for i, line in enumerate(lines) if pat.search(line))
        while k + 1 < len(lines) and lines[k + 1].startswith(pad + " "):
            k += 1  # after the whole block that uses it
        last.setdefault(k, []).append(name)
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        if i in last:
            out.append(f"{pad}del {', '.join(last[i])}")
    return out


def _conjuncts(pred) -> list:
    if pred is None:
        return []
    if isinstance(pred, Binary) and pred.op == "and":
        return _conjuncts(pred.lhs) + _conjuncts(pred.rhs) + [pred]
    return [pred]


def emit_plan(plan: Plan, cascade_text: str) -> tuple[str, list[StageEmitter]]:
    """The whole module: header comment with the cascade and plan, helpers, one function per stage."""
    head = module_header(plan, cascade_text,
                         "Generated by einsum-ir (codegen/cpu_emit.py): tiled PyTorch for the cascade",
                         ["import itertools", "import math", "", "import torch", ""])
    parts = [head, HELPERS]
    emitters = []
    for s in plan.stages:
        em = StageEmitter(plan, s, f"stage{s.index}")
        parts.append("\n" + em.generate())
        emitters.append(em)
    return "\n".join(parts), emitters


# --------------------------------------------------------------------------- the kernel

_COUNTER = itertools.count()


class CpuKernel:
    """`kern(**tensors_and_params)` -> one tensor or a tuple in output order, like `ei.interpret`.

    `kern.source()` is the generated Python; `kern.last_stats` counts the key tiles of the
    last call: `full` (no mask), `partial` (masked), `empty` (masked and skipped whole)."""

    backend = "cpu"

    def __init__(self, cascade: Cascade, block_q: int = DEFAULT_BLOCK_Q, block_s: int = DEFAULT_BLOCK_S):
        self.cascade = cascade
        self.plan: Plan = build_plan(cascade)
        self.block_q, self.block_s = block_q, block_s
        self._source, self.emitters = emit_plan(self.plan, str(cascade))
        filename = f"<einsum-ir cpu kernel {next(_COUNTER)}>"
        linecache.cache[filename] = (len(self._source), None, self._source.splitlines(True), filename)
        self._ns: dict = {"__name__": "einsum_ir_cpu_kernel"}
        exec(compile(self._source, filename, "exec"), self._ns)  # noqa: S102 - our own generated code
        self.last_stats: dict = {}

    # -- introspection
    def source(self, shapes: dict | None = None, device: str = "cpu") -> str:
        text = self._source
        if shapes:
            text = f"# tiles for {shapes}: BLOCK_Q={self.block_q}, BLOCK_S={self.block_s}\n" + text
        return text

    def resource_usage(self, shapes, dtype="bf16", target="sm_90"):
        raise LoweringError("the CPU backend generates PyTorch code; it has no compiled GPU kernel")

    def __call__(self, **args):
        tensors, extents, params = bind_arguments(self.cascade, dict(args))
        c = self.plan.cascade
        floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
        out_dtype = floats[0] if floats else torch.float32
        dt = torch.float64 if torch.float64 in floats else torch.float32
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        buffers = dict(tensors)
        for name in list(c.output_names) + list(self.plan.intermediates):
            if name in buffers:
                continue
            shape = [extents[r] for r in c.tensors[name].ranks]
            fill = next((o.fill for o in c.outputs if o.name == name), 0.0)
            buffers[name] = torch.full(shape, float(fill), dtype=dt, device=device)
        stats = {"full": 0, "partial": 0, "empty": 0}
        scal = {**extents, **params}
        for s, em in zip(self.plan.stages, self.emitters):
            names = em.arg_names()
            fn = self._ns[em.name]
            targs = [buffers[n[:-4]] for n in names["tensors"]]
            kw = {n: scal[n] for n in names["scalars"]}
            fn(*targs, **kw, BLOCK_Q=self.block_q, BLOCK_S=self.block_s, DT=dt, _stats=stats)
        self.last_stats = stats
        return collect_outputs(c, buffers, out_dtype)


def compile_cpu(cascade: Cascade, block_q: int = DEFAULT_BLOCK_Q, block_s: int = DEFAULT_BLOCK_S) -> CpuKernel:
    """The tiled CPU kernel of `cascade`; raises LoweringError (with the reason) when the plan
    has no fused lowering for it."""
    return CpuKernel(cascade, block_q=block_q, block_s=block_s)
