"""The CPU emitter: a kernel plan -> readable tiled PyTorch code (DESIGN section 6).

The same plan the Triton emitter reads becomes one Python function per stage, made of plain
torch calls, with the same key segments:

    for each query tile (all grid ranks B, H, ... at once: one vectorized tile)
        prologue      Einsums without the key rank; accumulators
        for each key segment (lowering.keyranges, in keys: the CPU slices exactly):
            for each key tile of the segment:
                full segment   -> the loop body with no mask and no presence tensor
                masked segment -> guards first, one sentinel fill per guarded value (or
                                  presence masks), then the same Einsums
        epilogue      Einsums after the loop; stores, absent rows take the output's fill

A stage whose mask reads a tensor tests each tile of its bounded range: skipped when nothing
is present, the full body when everything is, else the masked one.

The largest temporary is one score tile (grid x BLOCK_Q x BLOCK_S), never P x M: memory is
O(N). Values are named after the cascade's tensors; every value is a torch tensor whose dims
are its *tile axes* in one canonical order (grid ranks, query ranks, key ranks, then feature
ranks; one dim per rank), so broadcasting is only ever unsqueezing. Tiles are updated in place
where the plan says a value dies (a score tile becomes its exponential), sums of products are
`torch.matmul` when they are batched matrix products and `torch.einsum` otherwise.

Entry point: `compile_cpu(cascade) -> CpuKernel`; it raises `LoweringError` (with the plan's
reason) for cascades without a fused lowering, exactly like the Triton backend.
"""
from __future__ import annotations

import itertools
import linecache
import math
import re
import string

import sympy
import torch

from einsum_ir.codegen.autograd import record, wants_grad
from einsum_ir.codegen.block_emit import BlockEmitter, Section, Val, accesses, is_simple, join_terms, module_header, paren
from einsum_ir.codegen.outputs import collect_outputs, interpreted
from einsum_ir.codegen.derived import DerivedKernels
from einsum_ir.codegen.names import spell
from einsum_ir.codegen.scalar_code import GRID, PYTHON, print_int
from einsum_ir.errors import LoweringError
from einsum_ir.functions import FUNCTIONS
from einsum_ir.indirect import indirect_reads, position_bounds
from einsum_ir.ir import (
    Access, Binary, Cascade, Einsum, Expr, Index, Name, conjuncts, index_vars, product_terms, rank_of,
)
from einsum_ir.lowering.exprs import to_sympy
from einsum_ir.lowering.plan import Plan, Stage
from einsum_ir.lowering.strategy import build_plan
from einsum_ir.params import bind_arguments

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_S = 640  # the most keys per tile; fewer when the outputs are small (CpuKernel.key_tile)
MIN_BLOCK_S = 128
SCORE_TILE_FLOOR = 2 ** 16  # elements a score tile may hold whatever the outputs (256 KiB in fp32)
GATHER_TILE_ELEMENTS = 2 ** 20  # a key tile's copy of a tensor read through a page table (4 MiB in fp32)

HELPERS = '''
def _tiles(lo, hi, block):
    """Tiles [first, last] covering [lo, hi): as few as `block` allows, of near-equal sizes
    (a segment that is one key longer than a tile gives two halves, not a one-key sliver)."""
    lo = max(lo, 0)
    n = -(-(hi - lo) // block)
    for k in range(max(n, 0)):
        yield lo + (hi - lo) * k // n, lo + (hi - lo) * (k + 1) // n - 1


def _key_tiles(segments, block, group=1, extent=None):
    """Key tiles (first, last, masked) over segments (lo, hi, masked) given in key order.
    Segments that touch are one run, cut into as few near-equal tiles as `block` allows; a tile
    is masked when it overlaps a masked segment. On a CPU few large tiles beat many small ones,
    so a masked edge shares its tile with the full keys next to it. `group` > 1: the keys come
    in groups of that many, which a tile holds whole (grouped reductions): runs widen to whole
    groups (within `extent` keys) and tiles start at multiples of `group`."""
    runs = []
    for lo, hi, masked in segments:
        if hi <= lo:
            continue
        if group > 1:
            lo, hi = lo - lo % group, min(hi + (-hi) % group, extent)
        if runs and runs[-1][-1][1] >= lo:  # touching (or, widened, overlapping): one run
            runs[-1].append((lo, max(hi, runs[-1][-1][1]), masked))
        else:
            runs.append([(lo, hi, masked)])
    for run in runs:
        masked_parts = [(lo, hi) for lo, hi, m in run if m]
        lo, hi = run[0][0], run[-1][1]
        if group > 1:  # near-equal tiles of whole groups
            tiles = ((lo + a * group, min(lo + (b + 1) * group, hi) - 1)
                     for a, b in _tiles(0, -(-(hi - lo) // group), max(1, block // group)))
        else:
            tiles = _tiles(lo, hi, block)
        for first, last in tiles:
            yield first, last, any(lo <= last and first < hi for lo, hi in masked_parts)


def _group_max(x, dim, groups, n):
    """The maximum of x over each group of its dim `dim` (`groups`: each position's group, of n)."""
    shape = list(x.shape)
    shape[dim] = n
    index = groups.view([-1 if d == dim else 1 for d in range(x.dim())]).expand(x.shape)
    return torch.full(shape, -math.inf, dtype=x.dtype).scatter_reduce_(dim, index, x, "amax")


def _min(a, b):
    """min of two bounds, ints or per-program values (tensors over the grid ranks)."""
    if isinstance(a, torch.Tensor):
        return torch.minimum(a, b) if isinstance(b, torch.Tensor) else a.clamp_max(b)
    return b.clamp_max(a) if isinstance(b, torch.Tensor) else min(a, b)


def _max(a, b):
    """max of two bounds, ints or per-program values (tensors over the grid ranks)."""
    if isinstance(a, torch.Tensor):
        return torch.maximum(a, b) if isinstance(b, torch.Tensor) else a.clamp_min(b)
    return b.clamp_min(a) if isinstance(b, torch.Tensor) else max(a, b)


def _select(cond, a, b):
    """`a if cond else b` for a condition per program."""
    if isinstance(cond, torch.Tensor):
        return torch.where(cond, torch.as_tensor(a), torch.as_tensor(b))
    return a if cond else b


def _grid_segments(segments):
    """Segments (lo, hi, masked) whose integer ends hold one value per program (tensors over
    the grid ranks; an int is every program's), as disjoint segments for every program at once,
    in key order: this tile runs all the programs together, so it visits a key some program
    visits, and a key is full only where it lies in a full segment of every program.

    Plain Python on the ends' values (one tolist per end): a decode step has a few programs
    and a few segments, where a dozen tiny torch ops cost more than the whole sweep."""
    ends = [x for lo, hi, _ in segments for x in (lo, hi)]
    tensors = torch.broadcast_tensors(*(x for x in ends if isinstance(x, torch.Tensor)))
    programs = tensors[0].numel() if tensors else 1
    lists = iter([t.reshape(-1).tolist() for t in tensors])
    values = iter([next(lists) if isinstance(x, torch.Tensor) else [x] * programs for x in ends])
    per_program = [(next(values), next(values), masked) for _, _, masked in segments]
    cuts = sorted({v for lo, hi, _ in per_program for v in lo + hi})
    at = {c: k for k, c in enumerate(cuts)}
    # Between consecutive cuts every program is in or out of a segment whole. For piece k
    # (cuts[k] to cuts[k + 1]), count the programs that visit it and those that visit it in a
    # full segment, as changes at the cuts: +1 where a program's visit starts, -1 where it ends.
    seen, full = [0] * len(cuts), [0] * len(cuts)
    for p in range(programs):
        visits = [(at[lo[p]], at[hi[p]]) for lo, hi, _ in per_program]
        full_visits = [(at[lo[p]], at[hi[p]]) for lo, hi, masked in per_program if not masked]
        for count, spans in ((seen, visits), (full, full_visits)):
            for a, b in _union(spans):  # overlapping segments of one program count it once
                count[a] += 1
                count[b] -= 1
    out = []
    n_seen = n_full = 0
    for k in range(len(cuts) - 1):
        n_seen, n_full = n_seen + seen[k], n_full + full[k]
        if not n_seen:
            continue
        lo, hi, masked = cuts[k], cuts[k + 1], n_full < programs
        if out and out[-1][1] == lo and out[-1][2] == masked:
            out[-1] = (out[-1][0], hi, masked)
        else:
            out.append((lo, hi, masked))
    return out


def _union(spans):
    """The union of spans (a, b), each covering a <= x < b, as disjoint [a, b] in order."""
    out = []
    for a, b in sorted(spans):
        if a >= b:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _scratch(bufs, name, shape, dtype):
    """A contiguous tensor of `shape` in the call's own buffer for `name`, grown as needed: key
    tiles of varying sizes reuse one allocation instead of fragmenting the heap."""
    numel = 1
    for n in shape:
        numel *= n
    buf = bufs.get(name)
    if buf is None or buf.numel() < numel:
        buf = bufs[name] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


_ALL = slice(None)


def _gather(t, *idx, inside=False):
    """t[idx...] for integer index tensors (broadcast together) and whole dims (`_ALL`); reads
    outside t are 0. Index tensors at adjacent positions put their dims there, between the
    whole dims (torch's rule), else first. Index tensors that lead whole dims read rows
    (`_take_rows`). `inside`: the tile's bounds say every index is inside t (nothing to test)."""
    lead = next((k for k, i in enumerate(idx) if i is _ALL), len(idx))
    if 0 < lead < len(idx) and all(i is _ALL for i in idx[lead:]) and t.is_contiguous() and \
            any(isinstance(i, torch.Tensor) for i in idx[:lead]):
        return _take_rows(t, _row_index(t, *idx[:lead], inside=inside))
    if inside and any(isinstance(i, torch.Tensor) for i in idx):
        return t[idx]
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
    if bool(valid.all()):  # no read outside t (the mask is over the index tensors: small)
        return out
    gathered = [k for k, i in enumerate(idx) if i is not _ALL]
    if len(gathered) < len(idx):  # the mask's dims sit where the index tensors' dims went
        before = gathered[0] if gathered == list(range(gathered[0], gathered[-1] + 1)) else 0
        valid = valid.reshape((1,) * before + tuple(valid.shape) + (1,) * (out.dim() - before - valid.dim()))
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype))


def _row_index(t, *idx, inside=False):
    """The rows t[idx..., :] reads, for integer index tensors (broadcast together) and ints at
    t's leading positions (a paged cache's pages and slots): (how many positions, the linear
    row of each point, the points inside t or None when all are). It depends on t's leading
    extents only, so the tensors that share them share it (a paged cache's Kc and Vc).
    `inside`: the tile's bounds say every index is inside t (nothing to test or clamp)."""
    valid, linear = None, 0
    for pos, i in enumerate(idx):
        if isinstance(i, torch.Tensor) and not inside:
            ok = (i >= 0) & (i < t.shape[pos])
            valid = ok if valid is None else valid & ok
            i = i.clamp(0, t.shape[pos] - 1)
        linear = linear * t.shape[pos] + i
    return len(idx), torch.as_tensor(linear), None if valid is None or bool(valid.all()) else valid


def _take_rows(t, rows, into=None):
    """The whole rows `_row_index` found in t (contiguous), 0 outside it: index_select copies
    each row at once where advanced indexing computes an offset per element (3x faster for rows
    of G x E floats). `into` (buffers, name): copied into the call's scratch tensor of that
    name, which every key tile reuses (a fresh tile of MiBs per key tile costs a quarter of a
    paged decode step in page faults)."""
    lead, linear, valid = rows
    rest = tuple(t.shape[lead:])
    shape = tuple(linear.shape) + rest
    out = None if into is None else _scratch(into[0], into[1], (linear.numel(),) + rest, t.dtype)
    out = torch.index_select(t.reshape((-1,) + rest), 0, linear.reshape(-1), out=out).view(shape)
    if valid is None:
        return out
    valid = valid.reshape((1,) * (linear.dim() - valid.dim()) + tuple(valid.shape) + (1,) * len(rest))
    return out.masked_fill_(~valid, 0.0)  # index_select's rows are this call's own, scratch or fresh
'''

_METHOD = re.compile(r"torch\.(\w+)\(\{0\}\)")
_INPLACE_OPS = {"+": "add_", "-": "sub_", "*": "mul_", "/": "div_"}


class StageEmitter(BlockEmitter):
    """One stage of a plan -> one Python function over torch tensors."""

    def __init__(self, plan: Plan, stage: Stage, name: str):
        super().__init__(plan, stage, name)
        self.grouping = stage.grouping
        # the keys per group, as Python code (a parameter's name or a number)
        self.group_size = print_int(to_sympy(self.grouping.size, None), PYTHON) if self.grouping else None
        groups = [self.grouping.var] if self.grouping else []  # the key tile's groups sit beside its keys
        self.order = list(stage.grid) + list(stage.query) + list(stage.stream) + groups + list(stage.features)
        self.qset, self.kset, self.gset = set(stage.query), set(stage.stream), set(groups)
        self.letters = self._letters()
        self.used_index_values: set[str] = set()
        self.current: Einsum | None = None
        self.buffers = 0
        self.scratch: str | None = None  # the in-loop Einsum whose matrix products get buffers
        # a tile tests the bounds left to the masks and runs full where they hold (Stage.tile_checks)
        self.keys = stage.checked_loop or stage.loop
        self.held: frozenset[Expr] = frozenset()  # predicate atoms true at every point of the tile being emitted

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

    def arrange(self, code: str, frm: tuple[str, ...], to: tuple[str, ...]) -> str:
        """`align`, for dims `frm` in any order: permuted into `to`'s order first."""
        order = tuple(x for x in to if x in frm)
        if order != frm:
            code = f"{paren(code)}.permute({', '.join(str(frm.index(x)) for x in order)})"
        return self.align(code, order, to)

    def dims(self, axes) -> list[str]:
        """Each axis's size as code: a tile's extent for tiled ranks, else the rank's."""
        return [f"_n_{a}" if a in self.qset | self.kset | self.gset else rank_of(a) for a in axes]

    def shape(self, axes) -> str:
        dims = self.dims(axes)
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    def fill(self, axes: tuple[str, ...], value: str, dtype: str = "float") -> str:
        return f"torch.full({self.shape(axes)}, {value}, dtype={'torch.int32' if dtype == 'int' else 'DT'})"

    def broadcast(self, code: str, frm: tuple[str, ...], to: tuple[str, ...]) -> str:
        return f"{paren(self.align(code, frm, to))}.expand({self.shape(to)[1:-1]})"

    # ------------------------------------------------------------------ expressions
    def num(self, v: Val) -> str:
        if v.kind == "bool":
            return f"{paren(v.code)}.to(DT)" if v.axes else f"float({v.code})"
        return v.code

    def as_int(self, mask: str) -> str:
        return mask

    def float_quotient(self, code: str) -> str:
        return f"{paren(code)}.to(DT)"

    def int_operand(self, code: str) -> str:
        return f"{paren(code)}.to(DT)"

    def index(self, name: str) -> Val:
        self.used_index_values.add(name)  # the stage function defines only the index tiles it reads
        return super().index(name)

    def in_tile(self, expr: Expr | None) -> Expr | None:
        """A CPU key tile is a slice inside the keys' extents: the key bound always holds."""
        if expr is None:
            return None
        if isinstance(expr, Binary) and expr.op == "and":
            a, b = self.in_tile(expr.lhs), self.in_tile(expr.rhs)
            return a if b is None else b if a is None else Binary("and", a, b)
        bound = [Binary("<", Index(k), Name(rank_of(k))) for k in self.s.stream]
        return None if expr in bound else expr

    def logical_not(self, v: Val) -> Val:
        if v.scalar:
            return Val(f"(not {self.truth(v)})", (), "bool")
        return Val(f"(~{paren(self.truth(v))})", v.axes, "bool")

    def logical(self, op: str, a: Val, b: Val, axes: tuple[str, ...]) -> Val:
        ac, bc = self.align(self.truth(a), a.axes, axes), self.align(self.truth(b), b.axes, axes)
        if not axes:
            return Val(f"({ac} {op} {bc})", (), "bool")
        return Val(f"({paren(ac)} {'&' if op == 'and' else '|'} {paren(bc)})", axes, "bool")

    def _reusable(self, v: Val, axes: tuple[str, ...]) -> bool:
        """A tile this Einsum may overwrite: a fresh temporary, or a stream value that dies here,
        of the result's whole shape."""
        if v.axes != axes or v.kind not in ("float",) or not axes:
            return False
        if v.fresh:
            return True
        e = self.current
        if e is None or not self.in_loop or v.code not in self.local or self.s.kind(v.code) not in ("stream", "key_side"):
            return False
        if v.code in self.views:
            return False
        reads = sum(1 for a in accesses(e.expr) if a.tensor == v.code)
        return self.s.last_use.get(v.code) == e.name and reads == 1 and v.code not in self.s.online

    def arith(self, op: str, a: Val, ac: str, bc: str, axes: tuple[str, ...]) -> str:
        if op in _INPLACE_OPS and self._reusable(a, axes) and ac == a.code:
            return f"{paren(ac)}.{_INPLACE_OPS[op]}({bc})"
        return f"({ac} {op} {bc})"

    def where(self, args: list[Val], axes: tuple[str, ...], pres: str | None, pax: tuple) -> Val:
        c = self.align(self.truth(args[0]), args[0].axes, axes)
        ints = args[1].kind == args[2].kind == "int"
        x = self.align(args[1].code if ints else self.num(args[1]), args[1].axes, axes)
        y = self.align(args[2].code if ints else self.num(args[2]), args[2].axes, axes)
        if not axes:
            return Val(f"({x} if {c} else {y})", (), "int" if ints else "float", pres, pax)
        if args[1].scalar and args[2].scalar and args[0].axes != axes:
            c = f"{c}.expand({self.shape(axes)[1:-1]})"
        return Val(self.select(c, x, y), axes, "int" if ints else "float", pres, pax, fresh=True)

    def call(self, fn: str, args: list[Val], axes: tuple[str, ...], pres: str | None, pax: tuple,
             sec: Section, spelling: str | None = None) -> Val:
        if fn in ("min", "max") and all(a.kind == "int" for a in args):  # index arithmetic
            codes = [self.align(a.code, a.axes, axes) for a in args]
            if not axes:
                return Val(f"{fn}({codes[0]}, {codes[1]})", (), "int")
            return Val(f"torch.{'minimum' if fn == 'min' else 'maximum'}(torch.as_tensor({codes[0]}), "
                       f"torch.as_tensor({codes[1]}))", axes, "int")
        codes = []
        for a in args:
            x = self.align(self.num(a), a.axes, axes)
            if a.kind == "int" or not a.axes:  # torch functions take tensors of the compute dtype
                x = f"torch.as_tensor({x}, dtype=DT)"
            codes.append(x)
        spelling = spelling or FUNCTIONS[fn].torch
        method = _METHOD.fullmatch(spelling)
        if method and hasattr(torch.Tensor, method.group(1) + "_") and self._reusable(args[0], axes):
            return Val(f"{paren(codes[0])}.{method.group(1)}_()", axes, "float", pres, pax, fresh=True)
        return Val(self.fill_spelling(spelling, codes, sec), axes, "float", pres, pax, fresh=bool(axes))

    def select(self, cond: str, a: str, b: str) -> str:
        return f"torch.where({cond}, {a}, {b})"

    def maximum(self, a: str, b: str) -> str:
        return f"torch.maximum({a}, {b})"

    def reduce(self, op: str, code: str, axes: tuple[str, ...], red) -> tuple[str, tuple[str, ...]]:
        dims = [axes.index(a) for a in axes if a in red]
        if dims:
            code = f"{paren(code)}.{'amax' if op == 'max' else op}({dims[0] if len(dims) == 1 else tuple(dims)})"
        return code, tuple(a for a in axes if a not in red)

    def assign_guarded(self, name: str, code: str, mask: str, value: float, sec: Section, fresh: bool) -> None:
        """-inf at absent points is added as a bias of the mask's own (small) shape: torch adds a
        broadcast tensor several times faster than it fills through a broadcast mask."""
        if value != float("-inf") or not fresh:  # another value, or a view: a select
            super().assign_guarded(name, code, mask, value, sec, fresh)
            return
        sec.add(f"{name}_bias = _scratch(_bufs, {name + '_bias'!r}, {mask}.shape, DT).fill_(0.0)"
                f".masked_fill_(~{paren(mask)}, -math.inf)")
        sec.add(f"{name} = {paren(code)}.add_({name}_bias)")

    # ------------------------------------------------------------------ loads
    def load(self, a: Access, sec: Section) -> Val:
        """A tile of a tensor that lives outside the stage (input or earlier stage's result)."""
        t = a.tensor
        info = self.c.tensors[t]
        kind = "float"
        if t in self.c.input_names and info.dtype == "bool":
            kind = "bool"
        elif t in self.c.input_names and info.dtype.startswith("int"):
            kind = "int"
        vars_ = [i.name if isinstance(i, Index) else None for i in a.indices]
        if None not in vars_ and len(set(vars_)) == len(vars_):
            view, vaxes = self.view(t, vars_)
            where = "S" if self.kset & set(vaxes) else "Q" if self.qset & set(vaxes) else "stage"
            key = (t, tuple(vars_))
            if key not in self.loaded:
                name = t + {"S": "_j", "Q": "_i", "stage": ""}[where]
                if any(k[0] == t for k in self.loaded):
                    name = self.fresh(name)
                idx = [f"q_lo_{ax}:q_hi_{ax} + 1" if ax in self.qset else
                       f"k_lo_{ax}:k_hi_{ax} + 1" if ax in self.kset else ":" for ax in vaxes]
                while idx and idx[-1] == ":":
                    idx.pop()
                code = f"{view}[{', '.join(idx)}]" if idx else view
                target = {"S": self.key_loads, "Q": self.query_loads, "stage": self.stage_loads}[where]
                target.add(f"{name} = {code}")
                self.loaded[key] = name
            return Val(self.loaded[key], vaxes, kind)
        # a gather: index expressions (Sel[b, h, p // BS, m // BS])
        idx_vals = [self.emit(i, sec) for i in a.indices]
        axes = self.canon([x for v in idx_vals for x in v.axes])
        key = (t, tuple(map(repr, a.indices)), self.body_id)
        if key not in self.gathers:
            name = self.fresh(t)
            sec.add(f"{name} = {self.gather(a, idx_vals, axes, name, sec)}")
            self.full_inputs.add(t)
            self.gathers[key] = Val(name, axes, kind)
        return self.gathers[key]

    def gather(self, a: Access, idx_vals: list[Val], axes: tuple[str, ...], name: str, sec: Section) -> str:
        """The code of the gathered tile `name` over `axes`. A position read at a grid or feature rank's
        own variable is taken whole (a slice): a paged cache's Kc[Tbl[b, m // T], m % T, g, e]
        indexes two dims and copies rows of G x E, rather than index tensors for every element."""
        t, ranks = a.tensor, self.c.tensors[a.tensor].ranks
        tiled = self.qset | self.kset
        bounds = [b for i, r in zip(a.indices, ranks) for b in position_bounds(self.c, i, r)]
        inside = ", inside=True" if bounds and all(b in self.held for b in bounds) else ""
        whole = [isinstance(i, Index) and i.name not in tiled and rank_of(i.name) == r and a.indices.count(i) == 1
                 for i, r in zip(a.indices, ranks)]
        tail = next((n for n in range(len(whole), 0, -1) if all(whole[-n:])), 0)
        if 0 < tail < len(whole) and axes[-1] == a.indices[-1].name:
            # rows of the trailing whole dims (a paged cache's G x E floats of one token), the
            # other positions index tensors in key-major order: the tile is the view of rows
            # (m, b, ...) as (b, ..., m, e), whose grid ranks stay one batch stride for torch's
            # matrix products (rows in (b, m) order would make einsum copy the tile first)
            rows = [x.name for x in a.indices[-tail:]]
            lead = tuple(x for x in axes if x in self.kset) + tuple(x for x in axes if x not in self.kset and x not in rows)
            codes = [self.arrange(v.code, v.axes, lead) if v.axes else v.code for v in idx_vals[:-tail]]
            if not any(v.axes for v in idx_vals[:-tail]):
                return f"_gather({t}_all, {', '.join(codes)}, {', '.join(['_ALL'] * tail)}{inside})"
            key = (ranks[:-tail], tuple(codes), self.body_id)  # equal leading ranks: equal extents
            if key not in self.row_indices:
                self.row_indices[key] = self.fresh(f"{t}_rows")
                sec.add(f"{self.row_indices[key]} = _row_index({t}_all, {', '.join(codes)}{inside})")
            code = f"_take_rows({t}_all, {self.row_indices[key]}, (_bufs, {name!r}))"
            got = list(lead) + rows
            perm = [got.index(x) for x in axes]
            return code if perm == sorted(perm) else f"{code}.permute({', '.join(map(str, perm))})"
        indexed = [k for k, w in enumerate(whole) if not w]
        if not any(whole) or not indexed or any(not idx_vals[k].axes for k in indexed):
            codes = [self.align(v.code, v.axes, axes) if v.axes else v.code for v in idx_vals]
            return f"_gather({t}_all, {', '.join(codes)}{inside})"
        inner = self.canon([x for k in indexed for x in idx_vals[k].axes])
        codes = ["_ALL" if w else self.align(v.code, v.axes, inner) for w, v in zip(whole, idx_vals)]
        kept = [(k, a.indices[k].name) for k, w in enumerate(whole) if w]
        if indexed == list(range(indexed[0], indexed[-1] + 1)):  # torch puts the indexed dims in place
            got = [v for k, v in kept if k < indexed[0]] + list(inner) + [v for k, v in kept if k > indexed[-1]]
        else:
            got = list(inner) + [v for _, v in kept]
        code = f"_gather({t}_all, {', '.join(codes)}{inside})"
        perm = [got.index(x) for x in axes]
        return code if perm == sorted(perm) else f"{code}.permute({', '.join(map(str, perm))})"

    def view(self, t: str, vars_: list[str], store: bool = False) -> tuple[str, tuple[str, ...]]:
        """The stage view of tensor t: its dims permuted to the canonical tile order (a view, so
        stores write through)."""
        if not store:
            self.full_inputs.add(t)
        vaxes = self.canon(vars_)
        perm = [vars_.index(a) for a in vaxes]
        if perm == list(range(len(vars_))):
            return f"{t}_all", vaxes
        name = f"{t}_v"
        line = f"{name} = {t}_all.permute({', '.join(map(str, perm))})"
        if line not in self.view_lines:
            self.view_lines.append(line)
        return name, vaxes

    # ------------------------------------------------------------------ reductions
    def sum_term(self, inner: list[Val], outer: list[Val], red: set[str], out_axes: tuple[str, ...],
                 mask: tuple | None, sec: Section) -> tuple[str, tuple[str, ...], list[Val]]:
        if mask is not None:  # the mask selects the first factor it fits; the others' absent points are 0
            cover = next((k for k, v in enumerate(inner) if set(mask[1]) <= set(v.axes)), None)
            inner = [v if k == cover else self.absent_as_zero(v) for k, v in enumerate(inner)]
        ops = [(self.int_operand(v.code) if v.kind == "int" else self.num(v), v.axes) for v in inner]
        scalars = [v for v in outer if v.scalar and v.kind != "bool"]
        if len(ops) >= 2 and scalars:
            # fold scalar factors (scale) into the smallest operand, not the score tile; a query
            # operand takes them once per query tile
            k = min(range(len(ops)), key=lambda i: (bool(self.kset & set(ops[i][1])),
                                                    bool(self.qset & set(ops[i][1])), len(ops[i][1])))
            c, ax = ops[k]
            factor = scalars[0].code if len(scalars) == 1 else "(" + " * ".join(v.code for v in scalars) + ")"
            if self.in_loop and not self.kset & set(ax) and c in self.loaded.values():
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
                ops[cover] = (self.select(self.align(m, max_, ax), c, "0.0"), ax)
        term_axes = self.canon([x for _, ax in ops for x in ax if x not in red])
        # a reduced axis no factor has sums identical values: as many as the tile holds
        have = {x for _, ax in ops for x in ax}
        count = "".join(f" * {f'_n_{x}' if x in self.qset | self.kset else rank_of(x)}" for x in sorted(red - have))
        if not ops:
            return f"(1.0{count})", term_axes, outer
        if len(ops) == 1:
            c, ax = ops[0]
            dims = [ax.index(x) for x in ax if x in red]
            total = f"{paren(c)}.sum({dims[0] if len(dims) == 1 else tuple(dims)})" if dims else c
            return total + count, term_axes, outer
        return self.contraction(ops, term_axes) + count, term_axes, outer

    def contraction(self, ops: list[tuple[str, tuple]], out: tuple[str, ...]) -> str:
        """A sum of a product: `torch.matmul` when it is a batched matrix product (same leading
        axes, one contracted axis at an end of both operands, the first operand's other axes
        flattened into matrix rows), else `torch.einsum`: matmul skips einsum's per-call
        planning, which costs more than the product itself at a decode step's sizes."""
        for (a, aa), (b, ba) in ([ops, ops[::-1]] if len(ops) == 2 else []):
            red = set(aa) & set(ba) - set(out)
            batch = tuple(x for x in aa if x in ba and x not in red)
            nb = len(batch)
            if len(red) != 1 or not aa[:nb] == ba[:nb] == batch:
                continue
            r = red.pop()
            rows, cols = tuple(x for x in aa[nb:] if x != r), tuple(x for x in ba[nb:] if x != r)
            if (not rows or len(cols) != 1 or aa[nb:] not in (rows + (r,), (r,) + rows)
                    or ba[nb:] not in (cols + (r,), (r,) + cols) or out != batch + rows + cols):
                continue
            lhs = a
            if len(rows) > 1:  # matmul takes one row rank
                first = nb + (aa[nb] == r)
                lhs = f"{paren(a)}.flatten({first}, {first + len(rows) - 1})"
            lhs = lhs if aa[-1] == r else f"{paren(lhs)}.transpose(-1, -2)"
            rhs = b if ba[nb] == r else f"{paren(b)}.transpose(-1, -2)"
            dims = self.dims(out)
            flat = "(" + ", ".join(dims[:nb] + ["*".join(dims[nb:-1]), dims[-1]]) + ")"
            unflatten = f".view({self.shape(out)})" if len(rows) > 1 else ""
            if self.scratch is not None:  # in the loop: a buffer per product of the Einsum
                self.buffers += 1
                dest = f"_scratch(_bufs, {self.scratch + '_' + str(self.buffers)!r}, {flat}, DT)"
                return f"torch.matmul({lhs}, {rhs}, out={dest}){unflatten}"
            return f"torch.matmul({lhs}, {rhs}){unflatten}"
        subs = ",".join("".join(self.letters[x] for x in ax) for _, ax in ops)
        res = "".join(self.letters[x] for x in out)
        return f"torch.einsum(\"{subs}->{res}\", {', '.join(c for c, _ in ops)})"

    # A query tile's accumulators start as None and take the first key tile's values as they
    # are: no fill, no rescale of zeros (a decode step runs one key tile, where those ops were a
    # third of its work). After the loop, those of a row range no tile visited are filled.
    def running_max(self, name: str, x: str) -> str:
        return f"{x} if {name} is None else {self.maximum(name, x)}"

    def rescale_line(self, name: str, code: str, ratio: sympy.Expr) -> str:
        old = sorted(s.name[2:] for s in ratio.free_symbols if s.name.startswith("G_") and not s.name.endswith("_new"))
        return f"{name} = None if {old[0]} is None else {code}" if old else f"{name} = {code}"

    def update_sum(self, e: Einsum, alpha: str | None, sec: Section, red: set[str], mask) -> None:
        """Accumulators are this query tile's own tensors: updated in place."""
        buffers = self.buffers
        terms = self.sum_terms(e, sec, red, mask)
        head = e.name if alpha is None else f"{e.name}.mul_({alpha})"
        if all(sign == "-" for sign, _ in terms):
            update = f"{head}.sub_({' + '.join(code for _, code in terms)})"
        else:
            update = f"{head}.add_({join_terms(terms)})"
        first = join_terms(terms)
        if not self.spans(e, red):  # a term constant along some axis: broadcast into a full one
            first = f"{self.fill(self.axes_of[e.name], '0.0')}.add_({first})"
        elif self.buffers > buffers:  # a product in a scratch buffer, which the next tile reuses
            first = f"{paren(first)}.clone()"
        sec.add(f"{e.name} = {first} if {e.name} is None else {update}")

    def spans(self, e: Einsum, red: set[str]) -> bool:
        """Whether every term of a carried sum's summand varies along all the sum's axes (so
        its value has the accumulator's shape)."""
        want = set(self.axes_of[e.name])
        return all(want <= {x for _, f in factors for v in index_vars(f) for x in self.var_axes(v)} - red
                   for _, factors in product_terms(e.expr, distribute=True))

    def count_presence(self, g, mask: tuple | None, sec: Section) -> None:
        if mask is None:  # a full tile: every row, no tensor needed
            sec.add(f"{g.counter}_full = True")
            return
        code, axes = mask
        rows = self.row_axes(g.members[0])
        seen, left = self.reduce("any", code, axes, [a for a in axes if a not in rows])
        sec.add(f"{g.counter} |= {self.align(seen, left, rows)}")

    def counter_presence(self, g) -> str:
        return f"({g.counter} | {g.counter}_full)"

    # ------------------------------------------------------------------ Einsums
    def stream_einsum(self, e: Einsum, sec: Section) -> None:
        """Matrix products in the loop write into the call's scratch buffers (one per call
        site, reused by every key tile): no allocation per tile, no heap growth."""
        self.current, self.scratch, self.buffers = e, e.name, 0
        super().stream_einsum(e, sec)
        self.current, self.scratch = None, None

    def carried_einsum(self, e: Einsum, sec: Section) -> None:
        self.current, self.scratch, self.buffers = e, e.name, 0
        super().carried_einsum(e, sec)
        self.current, self.scratch = None, None

    def after_einsum(self, e: Einsum, sec: Section) -> None:
        """Tiles whose last reader this is are freed: at most a few score tiles stay alive."""
        dead = [t for t, last in self.s.last_use.items() if last == e.name and t in self.local
                and self.s.kind(t) in ("stream", "key_side")]
        if e.name not in self.s.last_use and self.s.kind(e.name) in ("stream", "key_side"):
            dead.append(e.name)
        if dead:
            sec.add(f"del {', '.join(dead)}")

    def after_loop_einsum(self, e: Einsum, sec: Section) -> None:
        axes = self.axes_of[e.name]
        red = {x for v in e.reduced for x in self.var_axes(v)}
        if e.reduced:
            if e.reduce != "sum":
                raise LoweringError(f"{e.name}: a {e.reduce} over ranks {', '.join(e.reduced)} inside a "
                                    f"tile is not emitted on the CPU")
            pres = self.combine_pres([self.access(a, sec) for a in accesses(e.expr)
                                      if a.tensor in self.local and a.tensor not in self.s.loads])
            mask = pres if pres[0] else None
            code = self.reduce_sum(e, sec, red, mask)
            pres = self.reduce("any", *mask, red) if mask else (None, ())
        else:
            v = self.emit(e.expr, sec)
            code = self.align(self.num(v), v.axes, axes)
            if set(v.axes) != set(axes):
                code = self.fill(axes, code) if v.scalar else self.broadcast(code, v.axes, axes)
            pres = (v.pres, v.pres_axes)
        sec.add(f"{e.name} = {code}")
        if pres[0] and not is_simple(pres[0]):
            sec.add(f"{e.name}_pres = {pres[0]}")
            pres = (f"{e.name}_pres", pres[1])
        self.pres_after[e.name] = pres

    def group_reduce(self, op: str, code: str, axes: tuple[str, ...], g) -> str:
        dim, out = axes.index(g.key), tuple(g.var if a == g.key else a for a in axes)  # key axis: its variable
        if op == "any":
            return f"torch.zeros({self.shape(out)}, dtype=torch.int32).index_add_({dim}, _grp, {paren(code)}.int()) > 0"
        if op == "sum":
            return f"torch.zeros({self.shape(out)}, dtype=DT).index_add_({dim}, _grp, {code})"
        return f"_group_max({code}, {dim}, _grp, _n_{g.var})"

    def group_read(self, code: str, axes: tuple[str, ...], g) -> str:
        return f"{paren(code)}.index_select({axes.index(g.var)}, _grp)"

    # ------------------------------------------------------------------ the stage function
    def start_body(self, sec: Section) -> None:
        pass

    def body_lines(self, masked: bool, indent: int, fresh: bool = True) -> list[str]:
        """A loop body's lines; `fresh` False: it reuses the gathers of the lines just before it."""
        self.body_id += fresh
        sec = Section(indent=indent)
        sec.add(f"_stats['{'partial' if masked else 'full'}'] += 1")
        self.body(masked, sec)
        return sec.lines

    def _positions(self, ranks, side: str, indent: str) -> list[str]:
        """Per rank of a tile: its length, and its positions when the cascade reads them as values
        (a key tile of groups: how many it holds, and each key's group among them)."""
        lines = []
        for r in ranks:
            lines.append(f"{indent}_n_{r} = {side}_hi_{r} - {side}_lo_{r} + 1")
            if r in self.used_index_values:
                lines.append(f"{indent}{r} = torch.arange({side}_lo_{r}, {side}_hi_{r} + 1)")
            g = self.grouping
            if g is not None and side == "k" and r == g.key:
                size = self.group_size
                lines.append(f"{indent}_n_{g.var} = k_hi_{r} // {size} - k_lo_{r} // {size} + 1")
                lines.append(f"{indent}_grp = torch.arange(k_lo_{r}, k_hi_{r} + 1) // {size} - k_lo_{r} // {size}")
        return lines

    def generate(self) -> str:
        s, c = self.s, self.c
        for e in s.einsums:
            self.axes_of[e.name] = self.canon([x for v in e.lhs_vars for x in self.var_axes(v)])
        self.view_lines: list[str] = []
        self.loaded: dict = {}
        self.hoisted: dict = {}
        self.full_inputs: set[str] = set()
        self.gathers: dict = {}
        self.row_indices: dict = {}  # (leading ranks, index codes, body) -> its `_row_index`
        self.body_id = 0
        self.stage_loads, self.query_loads, self.key_loads = Section(indent=1), Section(indent=2), Section(indent=3)

        qsec = Section(indent=2)  # per query tile: prologue and accumulators
        self.in_loop = False
        for e in s.of_kind("prologue"):
            self.after_loop_einsum(e, qsec)
        carried = s.of_kind("carried")
        if carried:
            qsec.add(f"{' = '.join(e.name for e in carried)} = None  # the first key tile's values")
        for name, axes in self.counter_init():
            qsec.add(f"{name} = torch.zeros({self.shape(axes)}, dtype=torch.bool)")
            qsec.add(f"{name}_full = False")

        values = self.grid_values()
        loop = Section(indent=2)
        for sym, e in self.keys.key_defs:
            loop.add(f"{sym.name} = {print_int(e, GRID if self.keys.values else PYTHON)}")
        if self.keys.block_list:
            self.tested_loop(loop)
        elif len(s.stream) == 1:
            self.run_loop(loop)
        else:
            self.in_loop = True
            bodies = {m: self.body_lines(m, 3) for m in (False, True)}
            self.in_loop = False
            for seg in self.keys.key_segments:
                self.segment_loop(seg, bodies[seg.masked], loop)

        post = Section(indent=2)
        if carried:
            post.add(f"if {carried[0].name} is None:  # no key tile: every row absent")
            for e in carried:
                init = "-math.inf" if e.reduce == "max" else "0.0"
                post.add(f"    {e.name} = torch.full({self.shape(self.axes_of[e.name])}, {init}, dtype=DT)")
        self.presence_after_loop()
        for e in s.of_kind("epilogue"):
            self.after_loop_einsum(e, post)
        for t in s.stores:
            self.store(t, post)

        args = self.arg_names()
        signature = [*args["tensors"], "*", *args["scalars"], "BLOCK_Q", "BLOCK_S", "DT", "_stats"]
        lines = [f"def {self.name}({', '.join(signature)}):"]
        kinds = ", ".join(f"{e.name}: {s.kind(e.name)}" for e in s.einsums)
        lines.append(f'    """Stage {s.index}: stream {",".join(s.stream)} | query {",".join(s.query)} | '
                     f'grid {",".join(s.grid) or "-"} | features {",".join(s.features) or "-"}.')
        lines.append(f"    {kinds}")
        lines.append(f'    Keys: {self.keys.describe()}."""')
        lines.append("    _bufs = {}")
        for t in sorted(self.full_inputs):
            info = c.tensors[t]
            if not (t in c.input_names and (info.dtype == "bool" or info.dtype.startswith("int"))):
                lines.append(f"    {t}_all = {t}_all.to(DT)")  # no copy when it already is
        lines += ["    " + ln for ln in self.view_lines]
        for v in sorted(self.used_index_values):
            if v in s.grid or v in s.features:
                lines.append(f"    {v} = torch.arange({rank_of(v)})")
        lines += self.stage_loads.lines
        lines += values.lines
        lines += _block_split("    ", "BLOCK_Q", "_bq", s.query)
        lines += _block_split("    ", "BLOCK_S", "_bs", s.stream)
        if len(s.query) == 1:
            q = s.query[0]
            lines.append(f"    for q_lo_{q}, q_hi_{q} in _tiles(0, {rank_of(q)}, BLOCK_Q):")
        else:
            heads = ", ".join(f"(q_lo_{q}, q_hi_{q})" for q in s.query)
            its = ", ".join(f"_tiles(0, {rank_of(q)}, _bq_{q})" for q in s.query)
            lines.append(f"    for {heads} in itertools.product({its}):")
        lines += self._positions(s.query, "q", "        ")
        lines += self.query_loads.lines
        lines += qsec.lines
        lines += loop.lines
        lines += post.lines
        return "\n".join(lines) + "\n"

    def _tile_loop(self, box, loop: Section) -> None:
        """The loop header over the key tiles of a box [lo, hi) per key rank, and the tile's
        positions and loads."""
        ks = self.s.stream
        if len(ks) == 1 and self.keys.values:  # bounds per program: the keys some program visits
            (k, lo, hi), = box
            loop.add(f"for k_lo_{k}, k_hi_{k}, _ in _key_tiles(_grid_segments([({print_int(lo, PYTHON)}, "
                     f"{print_int(hi, PYTHON)}, True)]), BLOCK_S):")
        elif len(ks) == 1:
            (k, lo, hi), = box
            loop.add(f"for k_lo_{k}, k_hi_{k} in _tiles({print_int(lo, PYTHON)}, {print_int(hi, PYTHON)}, BLOCK_S):")
        else:
            heads = ", ".join(f"(k_lo_{k}, k_hi_{k})" for k, _, _ in box)
            its = ", ".join(f"_tiles({print_int(lo, PYTHON)}, {print_int(hi, PYTHON)}, _bs_{k})" for k, lo, hi in box)
            loop.add(f"for {heads} in itertools.product({its}):")
        loop.lines += self._positions(ks, "k", "            ")
        loop.lines += self.key_loads.lines

    def run_loop(self, loop: Section) -> None:
        """One key rank: every segment's tiles in one loop, each tile running the full or the
        masked body (the plan's segments decide which)."""
        self.in_loop = True
        check = Section(indent=4)
        self.held = frozenset(conjuncts(self.s.predicate))  # a full tile's bounds hold
        if self.s.tile_checks is not None:  # its gathers (the tile's page ids) serve the full body
            self.body_id += 1
            inside, _ = self.named_mask("_reads_inside", self.s.tile_checks, check)
            check.add(f"_masked = not bool({inside}.all())")
            self.held |= frozenset(conjuncts(self.s.tile_checks))
        full = self.body_lines(False, 4, fresh=self.s.tile_checks is None)
        self.held = frozenset()
        masked = self.body_lines(True, 4)
        self.in_loop = False
        k = self.s.stream[0]
        segs = "[" + ", ".join(f"({print_int(lo, PYTHON)}, {print_int(hi, PYTHON)}, {seg.masked})"
                               for seg in self.keys.key_segments for _, lo, hi in seg.box) + "]"
        loop.add("# the key segments' tiles: full ones unmasked, masked ones tested")
        if self.keys.values:
            loop.add("# bounds per program: every program's keys at once, full where full for all")
            segs = f"_grid_segments({segs})"
        groups = ""
        if self.grouping is not None:  # tiles of whole groups
            groups = f", {self.group_size}, {rank_of(k)}"
        loop.add(f"for k_lo_{k}, k_hi_{k}, _masked in _key_tiles({segs}, BLOCK_S{groups}):")
        loop.lines += self._positions((k,), "k", "            ")
        loop.lines += self.key_loads.lines
        sec = Section(indent=3)
        if check.lines:
            sec.add("if not _masked:  # full by the bounds: full where the tile's reads are inside their tensors")
            loop.lines += sec.lines + check.lines
            sec.lines = []
        sec.add("if _masked:")
        loop.lines += sec.lines + masked
        sec.lines = []
        sec.add("else:")
        loop.lines += sec.lines + full

    def segment_loop(self, seg, body: list[str], loop: Section) -> None:
        loop.add(f"# {'masked' if seg.masked else 'full'} key tiles")
        self._tile_loop(seg.box, loop)
        loop.lines += body

    def tested_loop(self, loop: Section) -> None:
        """A mask read from a tensor: each tile of the bounded range is tested first; the bodies
        reuse the tested mask."""
        (seg,) = self.keys.key_segments
        test = Section(indent=3)
        self.in_loop, self.masked = True, True
        self.body_id += 1
        live = self.named_mask("_live", self.s.predicate, test)
        self.seeds = {repr(self.in_tile(self.s.predicate)): live}
        full, masked = self.body_lines(False, 4), self.body_lines(True, 4)
        self.in_loop, self.seeds = False, {}
        loop.add("# every tile of the bounded range, tested against the mask first")
        self._tile_loop(seg.box, loop)
        loop.lines += test.lines
        for line in (f"if not bool({live[0]}.any()):", "    _stats['empty'] += 1", "    continue",
                     f"if bool({live[0]}.all()):"):
            test.lines = []
            test.add(line)
            loop.lines += test.lines
        loop.lines += full
        test.lines = []
        test.add("else:")
        loop.lines += test.lines + masked

    def grid_values(self) -> Section:
        """The per-program values the bounds read, every program's at once: a tensor over the
        grid ranks (the bounds of one tile are then the loosest over the programs)."""
        sec = Section(indent=1)
        grid = self.canon(self.s.grid)
        for name, e in self.keys.values:
            v = self.index(e.name) if isinstance(e, Index) else self.emit(e, sec)
            sec.add(f"{name} = {self.align(v.code, v.axes, grid)}")
        return sec

    def store(self, t: str, sec: Section) -> None:
        axes = self.axes_of[t]
        e = self.local[t]
        view, vaxes = self.view(t, [i.name for i in e.target.indices], store=True)
        across = bool(set(e.reduced) & self.qset)  # summed over every query tile: accumulate
        if not self.qset & set(axes) and not across:
            raise LoweringError(f"{t} has no query rank; the CPU emitter stores per query tile")
        idx = [f"q_lo_{ax}:q_hi_{ax} + 1" if ax in self.qset else ":" for ax in vaxes]
        while idx and idx[-1] == ":":
            idx.pop()
        val = t
        pres, pax = self.pres_after.get(t, (None, ()))
        fill = 0.0 if across else next((o.fill for o in self.c.outputs if o.name == t), 0.0)
        if pres and not across:  # a sum across query tiles adds only what it saw
            val = f"torch.where({self.align(pres, pax, axes)}, {t}, {self.number(float(fill))})"
        target = f"{view}[{', '.join(idx)}]" if idx else f"{view}[...]"
        sec.add(f"{target} {'+=' if across else '='} {val}")

    def tile_store(self, e: Einsum, presence: tuple | None, sec: Section) -> None:
        t, axes = e.name, self.axes_of[e.name]
        view, vaxes = self.view(t, [i.name for i in e.target.indices], store=True)
        idx = [f"q_lo_{ax}:q_hi_{ax} + 1" if ax in self.qset else f"k_lo_{ax}:k_hi_{ax} + 1" if ax in self.kset
               else ":" for ax in vaxes]
        val = t
        if presence is not None:
            fill = next(o.fill for o in self.c.outputs if o.name == t)
            val = self.select(self.align(presence[0], presence[1], axes), t, self.number(float(fill)))
        sec.add(f"{view}[{', '.join(idx)}] = {val}")  # a sum over a grid rank is whole here: the batch is one tile

    def add_to_tile(self, e: Einsum, code: str, sec: Section) -> None:
        view, vaxes = self.view(e.name, [i.name for i in e.target.indices], store=True)
        idx = [f"k_lo_{ax}:k_hi_{ax} + 1" if ax in self.kset else ":" for ax in vaxes]
        sec.add(f"{view}[{', '.join(idx)}] += {code}")

    def tile_sum(self, e: Einsum, sec: Section) -> None:
        self.current, self.scratch, self.buffers = e, e.name, 0
        super().tile_sum(e, sec)
        self.current, self.scratch = None, None

    def arg_names(self) -> dict:
        return {"tensors": [f"{t}_all" for t in self.s.tensors], "scalars": list(self.c.dims) + [p.name for p in self.c.params]}


def _block_split(pad: str, block: str, prefix: str, ranks: tuple[str, ...]) -> list[str]:
    """Tile sizes per rank when a tile axis spans several ranks: the fastest rank first."""
    if len(ranks) == 1:
        return []
    out, rest = [], block
    for v in reversed(ranks):
        out.append(f"{pad}{prefix}_{v} = max(1, min({rank_of(v)}, {rest}))")
        rest = f"({rest} // {prefix}_{v})"
    return out


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


class GeneratedPython(DerivedKernels):
    """What the CPU path's kernels share: their generated module, run in this process, and the
    binding of a call's arguments. `self.cascade`, `spelled`, `fp32` and `_source` are set by
    the subclass."""

    backend = "cpu"

    def load(self, label: str) -> None:
        """Compile `_source` into `_ns`, registered with linecache so tracebacks show its lines."""
        filename = f"<einsum-ir {label} {next(_COUNTER)}>"
        linecache.cache[filename] = (len(self._source), None, self._source.splitlines(True), filename)
        self._ns: dict = {"__name__": "einsum_ir_" + label.replace(" ", "_")}
        exec(compile(self._source, filename, "exec"), self._ns)  # noqa: S102 - our own generated code

    def resource_usage(self, shapes, dtype="bf16", target="sm_90"):
        raise LoweringError("the CPU backend generates PyTorch code; it has no compiled GPU kernel")

    def __call__(self, **args):
        if wants_grad(args):
            return record(self, self.training, self.run, args)
        splits = self.splits_for(args)
        if splits > 1:
            return self.run_split(args, splits)
        return self.run(args)

    def bind_call(self, args: dict):
        """(tensors, extents, params, output dtype, compute dtype) of a call, spelled; None for a
        call with an empty rank, which `interpreted` answers."""
        tensors, extents, params = (self.spelled.args(x) for x in bind_arguments(self.cascade, dict(args), self.fp32))
        if 0 in extents.values():
            return None
        floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
        out_dtype = floats[0] if floats else torch.float32
        return tensors, extents, params, out_dtype, torch.float64 if torch.float64 in floats else torch.float32

    def buffers(self, tensors: dict, extents: dict, dt: torch.dtype, filled: bool) -> dict:
        """The call's tensors and a buffer for every output and intermediate of the plan not
        among them: `filled` with the output's fill (a key loop leaves absent rows unwritten),
        else uninitialized (a scan writes every position)."""
        c = self.plan.cascade
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        out = dict(tensors)
        for name in list(c.output_names) + list(self.plan.intermediates):
            if name in out:
                continue
            shape = [extents[r] for r in c.tensors[name].ranks]
            if filled:
                fill = next((o.fill for o in c.outputs if o.name == name), 0.0)
                out[name] = torch.full(shape, float(fill), dtype=dt, device=device)
            else:
                out[name] = torch.empty(shape, dtype=dt, device=device)
        return out


class CpuKernel(GeneratedPython):
    """`kern(**tensors_and_params)` -> one tensor or a tuple in output order, like `ei.interpret`.

    `kern.source()` is the generated Python; `kern.last_stats` counts the key tiles of the
    last call: `full` (no mask), `partial` (masked), `empty` (tested and skipped whole)."""

    def __init__(self, cascade: Cascade, block_q: int = DEFAULT_BLOCK_Q, block_s: int | None = None,
                 fp32: frozenset = frozenset(), plan: Plan | None = None):
        """`plan`: a key-loop plan of the spelled cascade to run instead of the chosen one (a
        linear form's quadratic key loop, beside its chunked scan)."""
        self.cascade = cascade
        self.fp32 = frozenset(fp32)  # held in fp32 whatever the dtype: saved outputs, saved inputs
        self.spelled = spell(cascade)  # the names generated code uses (codegen/names.py)
        self.plan: Plan = plan or build_plan(self.spelled.cascade)
        self.block_q, self.block_s = block_q, block_s
        self._source, self.emitters = emit_plan(self.plan, str(self.spelled.cascade))
        # per tensor a key tile gathers through an indirect index: the tile's other index variables
        self.gathered = tuple(frozenset(index_vars(a)) - set(s.stream) for s in self.plan.stages
                              for e in s.einsums for a in indirect_reads(e.expr))
        self.load("cpu kernel")
        self.last_stats: dict = {}

    def source(self, shapes: dict | None = None, device: str = "cpu") -> str:
        text = self._source
        if shapes:
            text = (f"# tiles for {shapes}: BLOCK_Q={self.block_q}, "
                    f"BLOCK_S={self.key_tile(self.spelled.args(shapes))}\n" + text)
        return text

    def key_tile(self, extents: dict) -> int:
        """BLOCK_S of a call: the one asked for, else DEFAULT_BLOCK_S, or fewer keys (down to
        MIN_BLOCK_S) where the outputs are small, so that a score tile (grid x query rows x
        BLOCK_S) holds at most a quarter of the outputs' elements or SCORE_TILE_FLOOR (at short
        sequences the few MiB of a large tile would otherwise outweigh the result, while a
        decode step's few query rows take a few hundred keys per tile), and where a tile copies
        pages of a cache (an indirect read's gather), so that each copy holds at most
        GATHER_TILE_ELEMENTS: it stays in the last-level cache for the products that read it."""
        if self.block_s is not None:
            return self.block_s
        c, first = self.plan.cascade, self.plan.stages[0]
        size = lambda vs: math.prod(extents.get(rank_of(v), 1) for v in vs)  # noqa: E731
        rows = max(1, min(self.block_q, size(first.query)))
        outputs = sum(math.prod(extents.get(r, 1) for r in c.tensors[o].ranks) for o in c.output_names)
        keys = max(outputs // 4, SCORE_TILE_FLOOR) // (max(size(first.grid), 1) * rows)
        if self.gathered:
            keys = min(keys, GATHER_TILE_ELEMENTS // max(size(vs) for vs in self.gathered))
        return max(MIN_BLOCK_S, min(DEFAULT_BLOCK_S, keys))

    def same_backend(self, cascade: Cascade, fp32: frozenset = frozenset()) -> "CpuKernel":
        return CpuKernel(cascade, self.block_q, self.block_s, fp32)

    def run(self, args: dict):
        bound = self.bind_call(args)
        if bound is None:
            return interpreted(self.cascade, args, self.fp32)
        tensors, extents, params, out_dtype, dt = bound
        c = self.plan.cascade
        buffers = self.buffers(tensors, extents, dt, filled=True)
        stats = {"full": 0, "partial": 0, "empty": 0}
        scal = {**extents, **params}
        block_s = self.key_tile(extents)
        for em in self.emitters:
            names = em.arg_names()
            fn = self._ns[em.name]
            targs = [buffers[n[:-4]] for n in names["tensors"]]
            kw = {n: scal[n] for n in names["scalars"]}
            fn(*targs, **kw, BLOCK_Q=self.block_q, BLOCK_S=block_s, DT=dt, _stats=stats)
        self.last_stats = stats
        return collect_outputs(c, buffers, out_dtype, self.spelled.set(self.fp32))


def compile_cpu(cascade: Cascade, block_q: int = DEFAULT_BLOCK_Q, block_s: int | None = None,
                fp32: frozenset = frozenset()) -> "CpuKernel | ScanCpuKernel":
    """The tiled CPU kernel of `cascade` (the chunked scan's, when that is the plan); raises
    LoweringError (with the reason) when the plan has no fused lowering for it."""
    from einsum_ir.lowering.chunked_scan import ScanPlan

    spelled = spell(cascade)
    plan = build_plan(spelled.cascade)
    if isinstance(plan, ScanPlan):
        from einsum_ir.codegen.scan_cpu import ScanCpuKernel

        return ScanCpuKernel(cascade, plan, spelled, fp32=fp32)
    return CpuKernel(cascade, block_q=block_q, block_s=block_s, fp32=fp32)
