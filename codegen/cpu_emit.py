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
import math
import re
import string
from dataclasses import dataclass, field

import sympy
import torch

from einsum_ir.errors import BindError, LoweringError
from einsum_ir.ir import (
    Access,
    Binary,
    Call,
    Cascade,
    Einsum,
    Expr,
    Index,
    Name,
    Num,
    Unary,
    rank_of,
)
from lowering.exprs import expand
from lowering.plan import Plan, Stage, build_plan

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


def _fmt_num(v) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "math.inf" if v > 0 else "-math.inf"
    return repr(v)


def _skip_code(code: str) -> str:
    """A skipping-plan code string (written for Triton) as plain Python on ints."""
    code = code.replace("tl.minimum(", "min(").replace("tl.maximum(", "max(")
    code = code.replace("tl.where(", "_select(").replace("tl.cdiv(", "_cdiv(")
    if "tl." in code:
        raise LoweringError(f"the skipping plan uses {code!r}, which the CPU emitter cannot translate")
    return code


@dataclass
class Val:
    code: str
    axes: tuple[str, ...]
    kind: str = "f"  # f (float tensor or scalar) | int | bool
    pres: str | None = None  # presence mask code over pres_axes
    pres_axes: tuple[str, ...] = ()

    @property
    def scalar(self) -> bool:
        return not self.axes


@dataclass
class _Sec:
    lines: list[str] = field(default_factory=list)
    indent: int = 1

    def add(self, line: str) -> None:
        self.lines.append("    " * self.indent + line)


def _simple(code: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][A-Za-z_0-9]*(\[[^\[\]]*\])?|-?[0-9.e+-]+|math\.inf", code) is not None


def _paren(code: str) -> str:
    if _simple(code):
        return code
    if code.startswith("(") and code.endswith(")"):
        depth = 0
        for i, ch in enumerate(code):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and i < len(code) - 1:
                break
        else:
            return code
    return f"({code})"


class StageEmitter:
    """One stage of a plan -> one Python function over torch tensors."""

    def __init__(self, plan: Plan, stage: Stage, name: str):
        self.plan = plan
        self.c: Cascade = plan.cascade
        self.s = stage
        self.name = name
        self.order = list(stage.grid) + list(stage.query) + list(stage.stream) + list(stage.features)
        self.qset, self.kset = set(stage.query), set(stage.stream)
        self.local = {e.name: e for e in stage.einsums}
        self.axes_of: dict[str, tuple[str, ...]] = {}
        self.counter = 0
        self.letters = self._letters()
        self.track_any = any(e.where is not None for e in stage.einsums)
        self.used_index_values: set[str] = set()
        self.views: dict[str, tuple[str, ...]] = {}  # full tensor -> stage-view axes
        self.in_loop = False
        self.masked = False

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

    def var_axes(self, v: str) -> tuple[str, ...]:
        return (v,)

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
        return f"{_paren(code)}[{', '.join(idx)}]"

    def shape(self, axes) -> str:
        dims = []
        for a in axes:
            if a in self.qset or a in self.kset:
                dims.append(f"_n_{a}")
            else:
                dims.append(rank_of(a))
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}_{self.counter}"

    # ------------------------------------------------------------------ expressions
    def num(self, v: Val) -> str:
        """A float-able code for v."""
        if v.kind == "bool":
            return f"{_paren(v.code)}.to(DT)" if v.axes else f"float({v.code})"
        return v.code

    def truth(self, v: Val) -> str:
        if v.kind == "bool":
            return v.code
        return f"({v.code} != 0)"

    def combine_pres(self, vals: list[Val]) -> tuple[str | None, tuple]:
        parts, seen = [], set()
        for v in vals:
            if v.pres and v.pres not in seen:
                seen.add(v.pres)
                parts.append((v.pres, v.pres_axes))
        if not parts:
            return None, ()
        if len(parts) == 1:
            return parts[0]
        pax = self.canon([a for _, ax in parts for a in ax])
        return " & ".join(self.align(p, ax, pax) for p, ax in parts), pax

    def emit(self, expr: Expr, sec: _Sec) -> Val:
        if isinstance(expr, Num):
            v = expr.value
            return Val(_fmt_num(v), (), "f" if isinstance(v, float) else "int")
        if isinstance(expr, Name):
            p = self.c.param(expr.name)
            kind = "int" if p is None or p.type == "int" else "f"
            return Val(expr.name, (), kind)
        if isinstance(expr, Index):
            self.used_index_values.add(expr.name)
            return Val(expr.name, self.var_axes(expr.name), "int")
        if isinstance(expr, Access):
            return self.access(expr, sec)
        if isinstance(expr, Unary):
            v = self.emit(expr.operand, sec)
            if expr.op == "not":
                if v.scalar:
                    return Val(f"(not {self.truth(v)})", (), "bool")
                return Val(f"(~{_paren(self.truth(v))})", v.axes, "bool")
            return Val(f"(-{_paren(self.num(v))})", v.axes, "int" if v.kind == "int" else "f",
                       v.pres, v.pres_axes)
        if isinstance(expr, Binary):
            a, b = self.emit(expr.lhs, sec), self.emit(expr.rhs, sec)
            axes = self.canon(a.axes + b.axes)
            pres, pax = self.combine_pres([a, b])
            if expr.op in ("and", "or"):
                ac, bc = self.align(self.truth(a), a.axes, axes), self.align(self.truth(b), b.axes, axes)
                if not axes:
                    return Val(f"({ac} {expr.op} {bc})", (), "bool")
                return Val(f"({_paren(ac)} {'&' if expr.op == 'and' else '|'} {_paren(bc)})", axes, "bool")
            ac, bc = self.align(self.num(a), a.axes, axes), self.align(self.num(b), b.axes, axes)
            if expr.op in ("<", "<=", ">", ">=", "==", "!="):
                return Val(f"({ac} {expr.op} {bc})", axes, "bool", pres, pax)
            kind = "int" if a.kind == b.kind == "int" and expr.op != "/" else "f"
            return Val(f"({ac} {expr.op} {bc})", axes, kind, pres, pax)
        assert isinstance(expr, Call)
        args = [self.emit(a, sec) for a in expr.args]
        axes = self.canon([x for a in args for x in a.axes])
        if expr.fn == "nbhd":
            codes = [self.align(a.code, a.axes, axes) for a in args]
            return Val(f"_nbhd({', '.join(codes)})", axes, "bool")
        pres, pax = self.combine_pres(args)
        if expr.fn == "where":
            c = self.align(self.truth(args[0]), args[0].axes, axes)
            x = self.align(self.num(args[1]), args[1].axes, axes)
            y = self.align(self.num(args[2]), args[2].axes, axes)
            if not axes:
                return Val(f"({x} if {c} else {y})", (), "f", pres, pax)
            if args[1].scalar and args[2].scalar and args[0].axes != axes:
                c = f"{c}.expand({self.shape(axes)[1:-1]})"
            return Val(f"torch.where({c}, {x}, {y})", axes, "f", pres, pax)
        codes = [self.align(self.num(a), a.axes, axes) for a in args]
        if not axes:  # scalar math (params, dims)
            if expr.fn in MATH_UNARY:
                return Val(MATH_UNARY[expr.fn].format(codes[0]), (), "f", pres, pax)
            if expr.fn in ("max", "min"):
                return Val(f"{expr.fn}({codes[0]}, {codes[1]})", (), "f", pres, pax)
            if expr.fn == "pow":
                return Val(f"({codes[0]} ** {codes[1]})", (), "f", pres, pax)
            if expr.fn in ("softplus", "elu"):
                return Val(f"{TORCH_UNARY[expr.fn].format(f'torch.tensor(float({codes[0]}))')}.item()", (),
                           "f", pres, pax)
            raise LoweringError(f"function {expr.fn}() has no CPU lowering")
        if expr.fn in TORCH_UNARY:
            x = codes[0]
            if args[0].kind == "int":
                x = f"{_paren(x)}.to(DT)"
            elif expr.fn in INPLACE and not _simple(x) and set(args[0].axes) == set(axes):
                # the argument is a fresh temporary of the full tile: compute in place
                return Val(f"{_paren(x)}.{expr.fn}_()", axes, "f", pres, pax)
            return Val(TORCH_UNARY[expr.fn].format(x), axes, "f", pres, pax)
        if expr.fn == "pow":
            a, b = codes
            if args[0].scalar:
                return Val(f"torch.pow(float({a}), {b})", axes, "f", pres, pax)
            return Val(f"torch.pow({a}, {b})", axes, "f", pres, pax)
        if expr.fn in ("max", "min"):
            a, b = codes
            clamp = "min" if expr.fn == "max" else "max"
            if args[1].scalar:
                return Val(f"torch.clamp({a}, {clamp}={b})", axes, "f", pres, pax)
            if args[0].scalar:
                return Val(f"torch.clamp({b}, {clamp}={a})", axes, "f", pres, pax)
            return Val(f"torch.{'maximum' if expr.fn == 'max' else 'minimum'}({a}, {b})", axes, "f", pres, pax)
        raise LoweringError(f"function {expr.fn}() has no CPU lowering")

    # ------------------------------------------------------------------ accesses and loads
    def access(self, a: Access, sec: _Sec) -> Val:
        t = a.tensor
        if t in self.local and t not in self.s.loads:
            e = self.local[t]
            lhs = [i.name for i in e.target.indices]
            if [i.name if isinstance(i, Index) else None for i in a.indices] != lhs:
                raise LoweringError(f"{t} is read as {t}[{', '.join(map(str, a.indices))}]; only reads "
                                    f"with its own index variables are emitted")
            kind = self.s.kind[t]
            code = t
            if t in self.s.online and self.in_loop:
                code = f"{t}_use"
            pres, pax = None, ()
            if kind in ("stream", "key_side") and self.masked and t in self.mask_of:
                pres, pax = self.mask_of[t]
            if kind in ("carried", "epilogue", "prologue") and not self.in_loop:
                pres, pax = self.pres_after.get(t, (None, ()))
            return Val(code, self.axes_of[t], "f", pres, pax)
        return self.load(a, sec)

    def load(self, a: Access, sec: _Sec) -> Val:
        """A tile of a tensor that lives outside the stage (input or earlier stage's result)."""
        t = a.tensor
        info = self.c.tensors[t]
        kind = "f"
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
    def reduce_sum(self, e: Einsum, sec: _Sec, red: set[str], out_axes: tuple[str, ...],
                   mask: tuple | None) -> str:
        """Code for the sum over tile axes `red` of e.expr; `mask` (code, axes) removes points."""
        total = []
        for sign, factors in expand(e.expr):
            vals = []
            for rec, f in factors:
                v = self.emit(f, sec)
                if rec:
                    v = Val(f"(1.0 / {_paren(self.num(v))})", v.axes, "f", v.pres, v.pres_axes)
                vals.append(v)
            inner = [v for v in vals if set(v.axes) & red]
            outer = [v for v in vals if not set(v.axes) & red]
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
                    ops[k] = (f"{_paren(c)} * {factor}", ax)
                outer = [v for v in outer if v not in scalars]
            if mask is not None:
                m, max_ = mask
                cover = next((k for k, (_, ax) in enumerate(ops) if set(max_) <= set(ax)), None)
                if cover is None:  # no factor spans the mask: form the product (rare)
                    axes = self.canon([x for _, ax in ops for x in ax] + list(max_))
                    prod = " * ".join(self.align(c, ax, axes) for c, ax in ops) or "1.0"
                    ops = [(f"torch.where({self.align(m, max_, axes)}, {prod}, 0.0)", axes)]
                else:
                    c, ax = ops[cover]
                    key = (c, m)
                    if key not in self.masked_cse:
                        name = self.fresh((c if c.isidentifier() else "x") + "_m")
                        sec.add(f"{name} = torch.where({self.align(m, max_, ax)}, {c}, 0.0)")
                        self.masked_cse[key] = name
                    ops[cover] = (self.masked_cse[key], ax)
            term_axes = self.canon([x for _, ax in ops for x in ax if x not in red])
            if len(ops) == 1:
                c, ax = ops[0]
                dims = [ax.index(x) for x in ax if x in red]
                term = f"{_paren(c)}.sum({dims[0] if len(dims) == 1 else tuple(dims)})"
            else:
                subs = ",".join("".join(self.letters[x] for x in ax) for _, ax in ops)
                out = "".join(self.letters[x] for x in term_axes)
                term = f"torch.einsum(\"{subs}->{out}\", {', '.join(c for c, _ in ops)})"
            parts = [self.align(term, term_axes, out_axes)]
            for v in outer:
                parts.append(self.align(self.num(v), v.axes, out_axes))
            code = " * ".join(parts)
            if sign == 1.0:
                total.append("+ " + code)
            elif sign == -1.0:
                total.append("- " + code)
            else:
                total.append(f"+ {sign!r} * {code}")
        text = " ".join(total)
        return text[2:] if text.startswith("+ ") else "-" + text[2:]

    # ------------------------------------------------------------------ Einsums by class
    def map_or_reduce(self, e: Einsum, sec: _Sec, where_mask: tuple | None) -> tuple:
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
                pax = self.canon([a for _, ax in parts for a in ax])
                mask = (" & ".join(self.align(p, ax, pax) for p, ax in parts), pax)
            code = self.reduce_sum(e, sec, red, axes, mask)
            pres = (None, ())
            if mask is not None:
                m, max_ = mask
                dims = [max_.index(x) for x in max_ if x in red]
                rest = tuple(x for x in max_ if x not in red)
                pres = (f"{_paren(m)}.any({dims[0] if len(dims) == 1 else tuple(dims)})" if dims else m, rest)
            if where_mask and not set(where_mask[1]) & red:
                pres = self._and(pres, where_mask)
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
                pres = self._and(pres, where_mask)
        sec.add(f"{e.name} = {code}")
        if pres[0] and not _simple(pres[0]):
            name = f"{e.name}_pres"
            sec.add(f"{name} = {pres[0]}")
            pres = (name, pres[1])
        return pres

    def _and(self, a: tuple, b: tuple) -> tuple:
        if not a[0]:
            return b
        if not b[0]:
            return a
        pax = self.canon(a[1] + b[1])
        return (f"{self.align(a[0], a[1], pax)} & {self.align(b[0], b[1], pax)}", pax)

    def _operand_pres(self, e: Einsum, sec: _Sec) -> tuple:
        parts = []
        for f in _accesses(e.expr):
            if f.tensor in self.local and f.tensor not in self.s.loads:
                if self.in_loop and self.masked and f.tensor in self.mask_of:
                    parts.append(self.mask_of[f.tensor])
                elif not self.in_loop and f.tensor in self.pres_after and self.pres_after[f.tensor][0]:
                    parts.append(self.pres_after[f.tensor])
        parts = list(dict.fromkeys(parts))
        if not parts:
            return (None, ())
        pax = self.canon([a for _, ax in parts for a in ax])
        return (" & ".join(self.align(p, ax, pax) for p, ax in parts), pax)

    def where_mask(self, e: Einsum, sec: _Sec) -> tuple | None:
        if e.where is None:
            return None
        key = repr(e.where)
        if key in self.pred_cse:
            return self.pred_cse[key]
        w = self.emit(e.where, sec)
        code = self.truth(w)
        if not w.axes:
            raise LoweringError(f"{e.name}: a predicate with no tile axis is not emitted on the CPU")
        if not _simple(code):
            name = f"{e.name}_where"
            sec.add(f"{name} = {code}")
            code = name
        self.pred_cse[key] = (code, w.axes)
        return (code, w.axes)

    def stream_einsum(self, e: Einsum, sec: _Sec) -> None:
        wm = self.where_mask(e, sec) if self.masked else None
        pres = self.map_or_reduce(e, sec, wm)
        if self.masked and pres[0]:
            self.mask_of[e.name] = pres

    def carried_einsum(self, e: Einsum, sec: _Sec) -> None:
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
                pax = self.canon([a for _, ax in parts for a in ax])
                code = " & ".join(self.align(p, ax, pax) for p, ax in parts)
                if not _simple(code):
                    name = f"{e.name}_mask"
                    sec.add(f"{name} = {code}")
                    code = name
                mask = (code, pax)
        if e.reduce == "max":
            v = self.emit(e.expr, sec)
            cur = v.axes
            x = self.num(v)
            if mask is not None:
                cur = self.canon(cur + mask[1])
                x = f"torch.where({self.align(mask[0], mask[1], cur)}, {self.align(x, v.axes, cur)}, -math.inf)"
            dims = [cur.index(a) for a in cur if a in red]
            if dims:
                x = f"{_paren(x)}.amax({dims[0] if len(dims) == 1 else tuple(dims)})"
            cur = tuple(a for a in cur if a not in red)
            x = self.align(x, cur, axes)
            if e.name in self.s.online:
                sec.add(f"{e.name}_new = torch.maximum({e.name}, {x})")
                sec.add(f"{e.name}_use = torch.where({e.name}_new == -math.inf, 0.0, {e.name}_new)")
                self.finalize.append(f"{e.name} = {e.name}_new")
            else:
                sec.add(f"{e.name} = torch.maximum({e.name}, {x})")
        elif e.reduce == "sum":
            contrib = self.reduce_sum(e, sec, red, axes, mask)
            ratio = self.s.rescale.get(e.name, sympy.Integer(1))
            if ratio != 1:
                key = str(ratio)
                if key not in self.alpha:
                    name = "alpha" if not self.alpha else f"alpha_{len(self.alpha)}"
                    code, aaxes = self._sympy_code(ratio)
                    sec.add(f"{name} = {code}")
                    self.alpha[key] = (name, aaxes)
                name, aaxes = self.alpha[key]
                sec.add(f"{e.name} = {e.name} * {self.align(name, aaxes, axes)} + {contrib}")
            else:
                sec.add(f"{e.name} = {e.name} + {contrib}")
        else:
            raise LoweringError(f"{e.name}: a {e.reduce} over the key rank is not emitted")
        if self.track_any:
            if mask is None:
                sec.add(f"{e.name}_any.fill_(True)")
            else:
                m, max_ = mask
                dims = [max_.index(a) for a in max_ if a in red]
                rest = tuple(a for a in max_ if a not in red)
                x = f"{_paren(m)}.any({dims[0] if len(dims) == 1 else tuple(dims)})" if dims else m
                sec.add(f"{e.name}_any |= {self.align(x, rest, axes)}")

    def _sympy_code(self, e: sympy.Expr) -> tuple[str, tuple[str, ...]]:
        """A rescale factor (sympy, over G_<max> and G_<max>_new) as torch code and its axes."""
        if isinstance(e, sympy.Symbol):
            n = e.name
            if n.startswith("G_") and n.endswith("_new"):
                t = n[2:-4]
                return f"{t}_use", self.axes_of[t]
            if n.startswith("G_"):
                return n[2:], self.axes_of[n[2:]]
            return n, ()
        if e.is_Number:
            return repr(float(e)), ()
        if isinstance(e, sympy.exp):
            c, ax = self._sympy_code(e.args[0])
            return (f"torch.exp({c})" if ax else f"math.exp({c})"), ax
        if isinstance(e, sympy.Add):
            parts = []
            for a in e.args:
                neg = isinstance(a, sympy.Mul) and a.args[0] == -1
                parts.append((neg,) + self._sympy_code(-a if neg else a))
            axes = self.canon([x for _, _, ax in parts for x in ax])
            text = ""
            for k, (neg, c, ax) in enumerate(parts):
                code = self.align(c, ax, axes)
                text += (" - " if neg else " + " if k else "") + code
            return f"({text[3:] if text.startswith(' - ') and False else text})", axes
        if isinstance(e, sympy.Mul):
            parts = [self._sympy_code(a) for a in e.args]
            axes = self.canon([x for _, ax in parts for x in ax])
            op = " + " if isinstance(e, sympy.Add) else " * "
            return "(" + op.join(self.align(c, ax, axes) for c, ax in parts) + ")", axes
        if isinstance(e, sympy.Pow):
            b, x = e.args
            bc, bax = self._sympy_code(b)
            xc, xax = self._sympy_code(x)
            axes = self.canon(bax + xax)
            if x == -1:
                return f"(1.0 / {_paren(bc)})", bax
            return f"torch.pow({self.align(bc, bax, axes)}, {self.align(xc, xax, axes)})", axes
        raise LoweringError(f"cannot emit rescale factor {e} on the CPU")

    def after_loop_einsum(self, e: Einsum, sec: _Sec) -> None:
        pres = self.map_or_reduce(e, sec, None)
        self.pres_after[e.name] = pres

    # ------------------------------------------------------------------ the stage function
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
        self.stage_loads, self.query_loads, self.key_loads = _Sec(indent=1), _Sec(indent=2), _Sec(indent=3)
        self.pres_after: dict[str, tuple] = {}
        self.mask_of: dict[str, tuple] = {}
        self.pred_cse: dict = {}
        self.masked_cse: dict = {}
        self.finalize: list[str] = []
        self.alpha: dict = {}

        # -- per query tile: prologue and accumulators
        qsec = _Sec(indent=2)
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
            sec = _Sec(indent=indent)
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
        post = _Sec(indent=2)
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
        for q in s.query:
            lines.append(f"        _n_{q} = q_hi_{q} - q_lo_{q} + 1")
            if q in self.used_index_values:
                lines.append(f"        {q} = torch.arange(q_lo_{q}, q_hi_{q} + 1)")
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
        for k in s.stream:
            lines.append(f"            _n_{k} = k_hi_{k} - k_lo_{k} + 1")
            if k in self.used_index_values:
                lines.append(f"            {k} = torch.arange(k_lo_{k}, k_hi_{k} + 1)")
        lines += self.key_loads.lines
        lines += loop_body
        lines += post.lines
        return "\n".join(lines) + "\n"

    def store(self, t: str, sec: _Sec) -> None:
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
            val = f"torch.where({self.align(pres, pax, axes)}, {t}, {_fmt_num(float(fill))})"
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


def _accesses(expr) -> list[Access]:
    from einsum_ir.ir import walk

    return [n for n in walk(expr) if isinstance(n, Access)]


def emit_plan(plan: Plan, cascade_text: str) -> tuple[str, list[StageEmitter]]:
    """The whole module: header comment with the cascade and plan, helpers, one function per stage."""
    head = ["# Generated by einsum-ir (codegen/cpu_emit.py): tiled PyTorch for the cascade", "#"]
    head += ["#   " + line if line else "#" for line in cascade_text.rstrip().splitlines()]
    head += ["#", "# Lowered cascade (after division deferral):", "#"]
    head += ["#   " + line for line in str(plan.cascade).rstrip().splitlines() if not line.startswith("#")]
    head += ["#", "# Plan:"] + ["#   " + line for line in plan.summary().splitlines()]
    head += ["", "import itertools", "import math", "", "import torch", ""]
    parts = ["\n".join(head), HELPERS]
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

    # -- binding
    def bind(self, args: dict):
        c = self.cascade
        tensors, extents, where = {}, {}, {}
        for d in c.inputs:
            if d.name not in args:
                raise BindError(f"missing input tensor {d.name}; the cascade takes {', '.join(c.input_names)}")
            t = args.pop(d.name)
            if not isinstance(t, torch.Tensor):
                raise BindError(f"input {d.name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != len(d.indices):
                raise BindError(f"input {d.name}[{', '.join(d.indices)}] has {len(d.indices)} dims, but the "
                                f"tensor given has shape {tuple(t.shape)}")
            for k, idx in enumerate(d.indices):
                r = rank_of(idx)
                if r in extents and extents[r] != t.shape[k]:
                    raise BindError(f"rank {r} is {extents[r]} in {where[r]} but {t.shape[k]} in {d.name} (dim {k})")
                extents[r], where[r] = int(t.shape[k]), f"{d.name} (dim {k})"
            tensors[d.name] = t
        for d in c.dims:
            if d in args:
                size = int(args.pop(d))
                if d in extents and extents[d] != size:
                    raise BindError(f"rank {d}={size} given, but {where[d]} has {extents[d]}")
                extents[d] = size
        unbound = [d for d in c.dims if d not in extents]
        if unbound:
            raise BindError(f"rank(s) {', '.join(unbound)} not bound by any input; pass e.g. {unbound[0]}=128")
        env: dict = dict(extents)
        params = {}
        for p in c.params:
            if p.type is not None:
                if p.name not in args:
                    raise BindError(f"missing param {p.name} ({p.type})")
                v = args.pop(p.name)
                v = v.item() if isinstance(v, torch.Tensor) else v
                params[p.name] = int(v) if p.type == "int" else float(v)
            else:
                if p.name in args:
                    raise BindError(f"param {p.name} is derived in the spec and cannot be passed")
                params[p.name] = _scalar(p.expr, env)
            env[p.name] = params[p.name]
        for s in c.splits:
            args.pop(s.inner, None)
        if args:
            raise BindError(f"unexpected argument(s) {', '.join(args)}")
        return tensors, extents, params

    def __call__(self, **args):
        tensors, extents, params = self.bind(dict(args))
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
        outs = []
        for name in c.output_names:
            t = buffers[name]
            outs.append(t.to(out_dtype) if t.dtype != out_dtype else t)
        return outs[0] if len(outs) == 1 else tuple(outs)


_MATH = {"exp": math.exp, "log": math.log, "log1p": math.log1p, "sqrt": math.sqrt,
         "rsqrt": lambda x: 1 / math.sqrt(x), "tanh": math.tanh, "abs": abs, "max": max, "min": min,
         "pow": math.pow, "sigmoid": lambda x: 1 / (1 + math.exp(-x))}


def _scalar(expr, env: dict):
    if isinstance(expr, Num):
        return expr.value
    if isinstance(expr, Name):
        return env[expr.name]
    if isinstance(expr, Unary):
        return -_scalar(expr.operand, env)
    if isinstance(expr, Binary):
        a, b = _scalar(expr.lhs, env), _scalar(expr.rhs, env)
        return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
                "/": lambda: a / b if b else math.inf, "//": lambda: a // b, "%": lambda: a % b}[expr.op]()
    if isinstance(expr, Call) and expr.fn in _MATH:
        return _MATH[expr.fn](*[_scalar(a, env) for a in expr.args])
    raise BindError(f"cannot evaluate param expression {expr}")


def compile_cpu(cascade: Cascade, block_q: int = DEFAULT_BLOCK_Q, block_s: int = DEFAULT_BLOCK_S) -> CpuKernel:
    """The tiled CPU kernel of `cascade`; raises LoweringError (with the reason) when the plan
    has no fused lowering for it."""
    return CpuKernel(cascade, block_q=block_q, block_s=block_s)
