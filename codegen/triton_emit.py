"""The Triton emitter: a kernel plan -> readable Triton source in the FlashAttention-2 shape.

One mechanism for every variant. Each stage becomes one `@triton.jit` kernel whose grid is
(query tiles) x (grid ranks); with a causal-like mask the heaviest query tiles run first. Its
body is

    prologue   query tile, Einsums without the key rank, query-side loads, base pointers
    bounds     the plan's key-range bounds (lowering.keyranges), printed as scalar code
    segments   one branch-free loop per key segment: a full interior runs the body with no
               mask, masked prefixes and suffixes the masked body; key and value pointers
               advance by a tile per iteration, so Triton software-pipelines every loop
    epilogue   Einsums after the loop; stores (absent points take the output's fill)

A stage whose mask the bounds cannot describe (a block selection read from a tensor) gets a
block-list kernel first: it evaluates the mask per key tile and lists the full and the partial
tiles, and the attention kernel runs one loop over each list with the matching body.

Every value is a block over at most two *tile axes*: `Q` (the query tile, possibly several
flattened ranks), `S` (the key tile) and feature ranks (`e`, `f`, ...) held whole. A sum over
one axis of two 2-D factors is a `tl.dot` (accumulating into a running sum when it is one);
everything else is elementwise code from the expression tree and the function registry.
"""
from __future__ import annotations

import re

from einsum_ir.codegen.block_emit import BlockEmitter, Section, Val, module_header, paren
from einsum_ir.codegen.scalar_code import TRITON, print_int
from einsum_ir.errors import LoweringError
from einsum_ir.functions import FUNCTIONS, TRITON_HELPERS
from einsum_ir.indirect import indirect_reads, position_bounds
from einsum_ir.ir import Access, Binary, Einsum, Expr, Index, Name, product_terms, rank_of, walk
from einsum_ir.lowering.keyranges import Segment
from einsum_ir.lowering.plan import Plan, Stage, page_flag


class StageEmitter(BlockEmitter):
    """One stage of a plan -> one `@triton.jit` kernel (or, in list mode, its block-list kernel)."""

    pos_inf, neg_inf = 'float("inf")', 'float("-inf")'
    in_page = False  # emitting the loops where every key tile lies in one page

    def __init__(self, plan: Plan, stage: Stage, name: str, list_mode: bool = False):
        super().__init__(plan, stage, name)
        self.grouping = stage.grouping
        self.order = ["Q", "S"] + ([self.grouping.var] if self.grouping else []) + list(stage.features)
        self.list_mode = list_mode
        self.cache: dict = {}
        self.body_id = 0
        self.pointers: dict[str, tuple[str, list[tuple[str, str]]]] = {}  # name -> (base, [(key var, stride)])
        self.placed = False
        # indirect reads and their tables' reads: the readers' predicates bound their positions
        self.paged_reads = {n for e in stage.einsums for r in indirect_reads(e.expr)
                            for n in [r] + [x for i in r.indices for x in walk(i) if isinstance(x, Access)]}
        self.load_names: dict[tuple, str] = {}

    # ------------------------------------------------------------------ axes and alignment
    def var_axes(self, v: str) -> tuple[str, ...]:
        if v in self.s.grid:
            return ()
        if v in self.s.query:
            return ("Q",)
        if v in self.s.stream:
            return ("S",)
        return (v,)

    def canon(self, axes) -> tuple[str, ...]:
        axes = set(axes)
        out = tuple(a for a in self.order if a in axes)
        if len(out) > 2:
            raise LoweringError(f"a value spans three tile axes ({', '.join(self._axis_name(a) for a in out)}); "
                                f"only 2-D tiles are emitted")
        return out

    def _axis_name(self, a: str) -> str:
        return {"Q": "/".join(self.s.query), "S": "/".join(self.s.stream)}.get(a, a)

    def align(self, code: str, frm: tuple[str, ...], to: tuple[str, ...]) -> str:
        if frm == to or not frm:
            return code
        code = paren(code)
        if len(frm) == 1 and len(to) == 2:
            return f"{code}[:, None]" if frm[0] == to[0] else f"{code}[None, :]"
        if len(frm) == 2 and frm == (to[1], to[0]):
            return f"tl.trans({code})"
        raise LoweringError(f"cannot broadcast a {frm} tile to {to}")

    def broadcast(self, code: str, frm: tuple[str, ...], to: tuple[str, ...]) -> str:
        return f"({self.align(code, frm, to)} + {self.fill(to, '0.0')})"

    def block(self, a: str) -> str:
        if self.grouping is not None and a == self.grouping.var:
            return "BLOCK_G"  # the key tile's groups: BLOCK_S // GROUP
        return {"Q": "BLOCK_Q", "S": "BLOCK_S"}.get(a, f"BLOCK_{a.upper()}")

    def group_reduce(self, op: str, code: str, axes: tuple[str, ...], g) -> str:
        """The key axis split into (groups, keys of a group), then reduced over the latter."""
        k = axes.index("S")
        dims = [self.block(a) for a in axes]
        split = ", ".join(dims[:k] + ["BLOCK_G", "GROUP"] + dims[k + 1:])
        if op == "any":
            return f"(tl.max(tl.reshape({paren(code)}.to(tl.int32), [{split}]), axis={k + 1}) > 0)"
        return f"tl.{op}(tl.reshape({code}, [{split}]), axis={k + 1})"

    def group_read(self, code: str, axes: tuple[str, ...], g) -> str:
        """Each group's value repeated over its keys: (groups, keys of a group) as the key axis."""
        k = axes.index(g.var)
        dims = [self.block(a) for a in axes]
        wide = ", ".join(dims[:k] + ["BLOCK_G", "GROUP"] + dims[k + 1:])
        out = ", ".join(dims[:k] + ["BLOCK_S"] + dims[k + 1:])
        at = ", ".join([":"] * (k + 1) + ["None"] + [":"] * (len(axes) - k - 1))
        return f"tl.reshape(tl.broadcast_to({paren(code)}[{at}], [{wide}]), [{out}])"

    def shape(self, axes) -> str:
        return "[" + ", ".join(self.block(a) for a in axes) + "]"

    def fill(self, axes: tuple[str, ...], value: str, dtype: str = "float") -> str:
        return f"tl.full({self.shape(axes)}, {value}, {'tl.int32' if dtype == 'int' else 'tl.float32'})"

    # ------------------------------------------------------------------ expressions
    def num(self, v: Val) -> str:
        return f"{v.code}.to(tl.float32)" if v.kind in ("native", "bool") else v.code

    def as_int(self, mask: str) -> str:
        return f"{paren(mask)}.to(tl.int32)"

    def logical_not(self, v: Val) -> Val:
        return Val(f"({self.truth(v)} == 0)", v.axes, "bool")

    def logical(self, op: str, a: Val, b: Val, axes: tuple[str, ...]) -> Val:
        ac, bc = self.align(self.truth(a), a.axes, axes), self.align(self.truth(b), b.axes, axes)
        return Val(f"({ac} {'&' if op == 'and' else '|'} {bc})", axes, "bool")

    def select(self, cond: str, a: str, b: str) -> str:
        return f"tl.where({cond}, {a}, {b})"

    def maximum(self, a: str, b: str) -> str:
        return f"tl.maximum({a}, {b})"

    def reduce(self, op: str, code: str, axes: tuple[str, ...], red) -> tuple[str, tuple[str, ...]]:
        for ax in sorted((a for a in red if a in axes), key=axes.index, reverse=True):
            code = f"tl.{op}({code}, axis={axes.index(ax)})"
            axes = tuple(a for a in axes if a != ax)
        return code, axes

    def float_quotient(self, code: str) -> str:
        return f"({code}).to(tl.float32)"

    def where(self, args: list[Val], axes: tuple[str, ...], pres: str | None, pax: tuple) -> Val:
        c = self.align(self.truth(args[0]), args[0].axes, axes)
        ints = args[1].kind == args[2].kind == "int"
        a = self.align(args[1].code if ints else self.num(args[1]), args[1].axes, axes)
        b = self.align(args[2].code if ints else self.num(args[2]), args[2].axes, axes)
        return Val(self.select(c, a, b), axes, "int" if ints else "float", pres, pax)

    def call(self, fn: str, args: list[Val], axes: tuple[str, ...], pres: str | None, pax: tuple,
             sec: Section, spelling: str | None = None) -> Val:
        if fn in ("min", "max") and all(a.kind == "int" for a in args):  # index arithmetic
            codes = [self.align(a.code, a.axes, axes) for a in args]
            return Val(f"tl.{'minimum' if fn == 'min' else 'maximum'}({codes[0]}, {codes[1]})", axes, "int")
        codes = []
        for a in args:
            if a.kind == "int":  # index positions convert; an int scalar (2, a param) may be a Python int
                x = self.float_quotient(a.code) if a.axes else f"({a.code} * 1.0)"
            else:
                x = self.num(a)
            codes.append(self.align(x, a.axes, axes))
        return Val(self.fill_spelling(spelling or FUNCTIONS[fn].triton, codes, sec), axes, "float", pres, pax)

    # ------------------------------------------------------------------ loads
    def _plain_stream(self, a: Access) -> bool:
        """A read at the tensor's own index variables that moves with the key tile: its pointers
        are a base plus a per-tile offset."""
        names = [i.name if isinstance(i, Index) else None for i in a.indices]
        return (None not in names and len(set(names)) == len(names) and bool(set(names) & set(self.s.stream))
                and not self.list_mode)

    def load(self, a: Access, sec: Section) -> Val:
        t = a.tensor
        idx_vals = [self.emit(i, sec) for i in a.indices]
        axes = self.canon([x for v in idx_vals for x in v.axes])
        # hoisted out of the loop unless it moves with the key tile (a page id is one value per tile)
        moves = any(isinstance(n, Index) and n.name in self.s.stream for i in a.indices for n in walk(i))
        target = self.pre if (self.in_loop and "S" not in axes and not moves) else sec
        where = "pre" if target is self.pre else (self.body_id, self.masked)
        key = (t, tuple(map(repr, a.indices)), where)
        if key in self.cache:
            return self.cache[key]
        info = self.c.tensors[t]
        stream_ptr = self.in_loop and self._plain_stream(a)
        offsets, per_tile, masks = [], [], []
        for k, (idx, v) in enumerate(zip(a.indices, idx_vals)):
            stride = f"stride_{t}_{k}"
            rank = info.ranks[k]
            if isinstance(idx, Index) and idx.name in self.s.stream:
                var = idx.name
                if stream_ptr:  # the position inside the tile; the tile's start is added per tile
                    offsets.append(f"{self.align(self.box_position('S', var, 'r_k'), ('S',), axes)} * {stride}")
                    per_tile.append((var, stride))
                else:
                    offsets.append(f"{self.align(v.code, v.axes, axes)} * {stride}")
                if self.masked or not self.in_loop or self.list_mode:
                    masks.append(self.align(f"({var} < {rank})", ("S",), axes))
                continue
            if isinstance(idx, Index):
                offsets.append(f"{self.align(v.code, v.axes, axes)} * {stride}")
                if idx.name in self.s.query:
                    masks.append(self.align("q_valid", ("Q",), axes))
                elif idx.name in self.s.features:
                    masks.append(self.align(self.feature_mask(idx.name), (idx.name,), axes))
            elif not v.axes and moves and a in self.paged_reads:
                # one position per key tile (a page id, its table slot): clamped into the rank
                # rather than masked, as the reader's predicate states these bounds already
                # (einsum_ir.indirect): a point read out of range is absent there
                code = v.code
                for b in position_bounds(self.c, idx, rank):
                    code = f"tl.maximum({code}, 0)" if b.op == ">=" else f"tl.minimum({code}, {rank} - 1)"
                offsets.append(f"{code} * {stride}")
            else:  # an index expression (a page id, m % T, p // BS): inside the rank only
                offsets.append(f"{self.align(v.code, v.axes, axes)} * {stride}")
                halves = [f"(({v.code}) >= 0)" if b.op == ">=" else f"(({v.code}) < {rank})"
                          for b in position_bounds(self.c, idx, rank)]
                if halves:
                    masks.append(self.align(" & ".join(halves), v.axes, axes))
        # one name per access, the same in every body (so bodies share their key pointers)
        akey = (t, tuple(map(repr, a.indices)))
        if akey not in self.load_names:
            self.load_names[akey] = t if not any(k[0] == t for k in self.load_names) else self.fresh(t)
        name = self.load_names[akey]
        if stream_ptr:
            ptr = f"{name}_ptrs"
            if ptr not in self.pointers:
                self.pre.add(f"{name}_base = {t}_ptr + {' + '.join(offsets)}")
                self.pointers[ptr] = (f"{name}_base", per_tile)
            if self.placed:  # a box or listed tile: the pointers of this tile from its start
                sec.add(f"{ptr} = {name}_base + {self.tile_offset(per_tile)}")
            ptr_code = ptr
        else:
            ptr_code = " + ".join([f"{t}_ptr"] + offsets)
        mask = " & ".join(dict.fromkeys(masks))
        target.add(f"{name} = tl.load({ptr_code}" + (f", mask={mask}, other=0)" if mask else ")"))
        dtype = info.dtype if t in self.c.input_names else "fp32"
        val = Val(name, axes, "int" if dtype in ("bool", "int8", "int16", "int32", "int64") else "native")
        self.cache[key] = val
        return val

    def query_bound(self) -> tuple | None:
        return ("q_valid", ("Q",))

    def tile_pointers(self, e: Einsum, masks: list[str]) -> tuple[str, str]:
        """(pointers, mask) of this tile of an output written inside the loop; `masks` start the mask."""
        t, axes = e.name, self.axes_of[e.name]
        ptr = [f"{t}_ptr"]
        for k, v in enumerate(i.name for i in e.target.indices):
            ptr.append(f"{self.align(v, self.var_axes(v), axes)} * stride_{t}_{k}")
            if v in self.s.stream and self.masked:
                masks.append(self.align(f"({v} < {rank_of(v)})", ("S",), axes))
            elif v in self.s.features:
                masks.append(self.align(self.feature_mask(v), (v,), axes))
        return " + ".join(ptr), " & ".join(dict.fromkeys(masks))

    def tile_store(self, e: Einsum, presence: tuple | None, sec: Section) -> None:
        t, axes = e.name, self.axes_of[e.name]
        ptr, mask = self.tile_pointers(e, [self.align("q_valid", ("Q",), axes)])
        val, across = t, t in self.s.atomic  # summed over a grid rank: each program adds its share
        if presence is not None:
            fill = 0.0 if across else next(o.fill for o in self.c.outputs if o.name == t)
            val = self.select(self.align(presence[0], presence[1], axes), t, self.number(float(fill)))
        if across:
            sec.add(f"tl.atomic_add({ptr}, {val}, mask={mask})")
        else:
            sec.add(f"tl.store({ptr}, ({val}).to({t}_ptr.dtype.element_ty), mask={mask})")

    def add_to_tile(self, e: Einsum, code: str, sec: Section) -> None:
        ptr, mask = self.tile_pointers(e, [])
        sec.add(f"tl.atomic_add({ptr}, {code}" + (f", mask={mask})" if mask else ")"))

    def feature_mask(self, v: str) -> str:
        """`v < extent` over a feature rank's block, folded away when the block is the extent."""
        return f"_below({v}, {rank_of(v)}, {self.block(v)})"

    # ------------------------------------------------------------------ reductions
    def sum_term(self, inner: list[Val], outer: list[Val], red_axes: set[str], out_axes: tuple[str, ...],
                 mask: tuple | None, sec: Section) -> tuple[str, tuple[str, ...], list[Val]]:
        ops = self._dot_operands(inner, red_axes, out_axes, mask)
        if ops is not None:
            name = self.fresh("dot")
            sec.add(f"{name} = tl.dot({ops[0]}, {ops[1]})")
            return name, out_axes, outer
        have = [x for v in inner for x in v.axes]
        # a reduced index the term does not depend on sums identical values: over a feature
        # rank that is a factor of its extent; over the key tile the term is broadcast so the
        # mask counts the present keys
        extent_factors = [rank_of(v) for v in red_axes if v not in have and v not in ("Q", "S")]
        if "S" in red_axes and "S" not in have:
            have.append("S")
            if mask is not None:
                have += list(mask[1])
        axes = self.canon(have)
        prod = " * ".join(self.align(self.num(v), v.axes, axes) for v in inner) or "1.0"
        if "S" in axes and not any("S" in v.axes for v in inner):
            ones = self.fill(axes, "1.0")
            prod = ones if prod == "1.0" else f"{ones} * ({prod})"
        prod = " * ".join([prod] + extent_factors)
        if mask is not None:
            m, max_ = mask
            prod = self.select(self.align(m, max_, axes), prod, "0.0")
        term, term_axes = self.reduce("sum", prod, axes, red_axes)
        return term, term_axes, outer

    def _dot_operands(self, inner: list[Val], red_axes: set[str], out_axes, mask) -> tuple[str, str] | None:
        """(A, B) code when the term is a matrix product over one tile axis, else None."""
        if len(red_axes) != 1 or len(out_axes) != 2:
            return None
        r = next(iter(red_axes))
        x, y = out_axes
        A = [v for v in inner if x in v.axes]
        B = [v for v in inner if y in v.axes]
        rest = [v for v in inner if v not in A and v not in B]
        if not A or not B or any(v in B for v in A) or not all(set(v.axes) <= {x, r} for v in A) \
                or not all(set(v.axes) <= {r, y} for v in B):
            return None
        A = A + rest
        a_axes, b_axes = self.canon((x, r)), self.canon((r, y))
        if mask is not None and set(mask[1]) <= set(a_axes):  # the mask selects A: B's absent points are 0
            B = [self.absent_as_zero(v) for v in B]
        elif mask is not None:
            A = [self.absent_as_zero(v) for v in A]

        def operand(vs, axes):
            if len(vs) == 1 and vs[0].kind == "native":
                return vs[0].code, vs[0]
            return " * ".join(self.align(self.num(v), v.axes, axes) for v in vs), None

        a_code, a_nat = operand(A, a_axes)
        b_code, b_nat = operand(B, b_axes)
        a_bound, b_bound = _bound(A), _bound(B)  # a mask's select keeps them: absent points are 0
        if mask is not None:
            m, max_ = mask
            if set(max_) <= set(a_axes):
                a_code, a_nat = f"tl.where({self.align(m, max_, a_axes)}, {a_code}, 0.0)", None
            elif set(max_) <= set(b_axes):
                b_code, b_nat = f"tl.where({self.align(m, max_, b_axes)}, {b_code}, 0.0)", None
            else:
                return None
        if a_nat is None and b_nat is not None:
            a_code, b_code = _mixed_operands(a_code, a_bound, b_code, b_nat)
        elif b_nat is None and a_nat is not None:
            b_code, a_code = _mixed_operands(b_code, b_bound, a_code, a_nat)
        if a_axes != (x, r):
            a_code = f"tl.trans({a_code})"
        if b_axes != (r, y):
            b_code = f"tl.trans({b_code})"
        return a_code, b_code

    def update_sum(self, e: Einsum, alpha: str | None, sec: Section, red: set[str], mask) -> None:
        """A running sum whose contribution is one matrix product accumulates inside tl.dot."""
        terms = product_terms(e.expr, distribute=True)
        if len(terms) == 1 and terms[0][0] == 1.0:
            vals = [self.emit(f, sec) for rec, f in terms[0][1] if not rec]
            if len(vals) == len(terms[0][1]) and all(set(v.axes) & red for v in vals):
                ops = self._dot_operands(vals, red, self.axes_of[e.name], mask)
                if ops is not None:
                    acc = e.name if alpha is None else f"{e.name} * {alpha}"
                    sec.add(f"{e.name} = tl.dot({ops[0]}, {ops[1]}, {acc})")
                    return
        super().update_sum(e, alpha, sec, red, mask)

    # ------------------------------------------------------------------ outside the loop
    def after_loop_einsum(self, e: Einsum, sec: Section) -> None:
        axes = self.axes_of[e.name]
        if e.name in self.s.atomic:
            own = {x for v in e.reduced for x in self.var_axes(v)}  # this program's share: its rows summed
            if own:
                code = self.reduce_sum(e, sec, own, self.query_bound())
            else:
                v = self.emit(e.expr, sec)
                code = self.align(self.num(v), v.axes, axes)
            sec.add(f"{e.name} = {code}")
            self.pres_after[e.name] = (None, ())
            return
        red = {x for v in e.reduced for x in self.var_axes(v)}
        if e.reduced:
            if e.reduce != "sum":
                raise LoweringError(f"{e.name}: a {e.reduce} over feature ranks outside the loop is not emitted")
            code, pres = self.reduce_sum(e, sec, red, None), (None, ())
        else:
            v = self.emit(e.expr, sec)
            code = self.align(self.num(v), v.axes, axes)
            if not v.axes and axes:
                code = self.fill(axes, code)
            pres = (v.pres, v.pres_axes)
        sec.add(f"{e.name} = {code}")
        self.pres_after[e.name] = pres

    # ------------------------------------------------------------------ tiles
    def sub_block(self, axis: str, v: str) -> str:
        ranks = self.s.query if axis == "Q" else self.s.stream
        return ("BLOCK_Q" if axis == "Q" else "BLOCK_S") + ("" if len(ranks) == 1 else f"_{v}")

    def box_position(self, axis: str, v: str, r: str) -> str:
        """The offset along rank v of each position `r` of a box tile (per-rank blocks flattened
        into one tile axis, the last rank fastest)."""
        ranks = self.s.query if axis == "Q" else self.s.stream
        i = ranks.index(v)
        later = [self.sub_block(axis, w) for w in ranks[i + 1:]]
        pos = r if not later else f"({r} // ({' * '.join(later)}))"
        return f"({pos} % {self.sub_block(axis, v)})" if i > 0 else pos

    def grid_and_query_tile(self, pre: Section) -> None:
        s = self.s
        if s.loop.heavy_last and not self.list_mode:
            pre.add("# the query tiles that visit the most key tiles run first")
            pre.add("pid_q = tl.num_programs(0) - 1 - tl.program_id(0)")
        else:
            pre.add("pid_q = tl.program_id(0)")
        pre.add("pid_g = tl.program_id(1)")
        if s.grid:
            pre.add("# grid ranks as int64: their offsets reach past 2**31 on large batches")
            pre.add("pid_g = pid_g.to(tl.int64)")
        rest = "pid_g"
        for v in reversed(s.grid):
            R = rank_of(v)
            if v == s.grid[0]:
                pre.add(f"{v} = {rest}")
            else:
                pre.add(f"{v} = {rest} % {R}")
                rest = f"({rest} // {R})"
        qs = s.query
        pre.add("r_q = tl.arange(0, BLOCK_Q)")
        rest, tiles = "pid_q", {}
        for v in reversed(qs):
            R, blk = rank_of(v), self.sub_block("Q", v)
            if v == qs[0]:
                tiles[v] = rest
            else:
                pre.add(f"nt_{v} = ({R} + {blk} - 1) // {blk}")
                tiles[v] = f"{rest} % nt_{v}"
                rest = f"({rest} // nt_{v})"
        for v in qs:
            R, blk = rank_of(v), self.sub_block("Q", v)
            pre.add(f"q_lo_{v} = ({tiles[v]}) * {blk}")
            pre.add(f"q_hi_{v} = tl.minimum(q_lo_{v} + {blk}, {R}) - 1")
            pre.add(f"{v} = q_lo_{v} + {self.box_position('Q', v, 'r_q')}")
        pre.add("q_valid = " + " & ".join(f"({v} < {rank_of(v)})" for v in qs))
        for f in s.features:
            pre.add(f"{f} = tl.arange(0, {self.block(f)})")
        pre.add("r_k = tl.arange(0, BLOCK_S)")

    def grid_values(self) -> None:
        """The per-program values the bounds read, once per program before them: a scalar load
        at the grid indices (the masks' reads of it, hoisted out of the loop, reuse it)."""
        for name, e in self.s.loop.values:
            if isinstance(e, Index):
                self.pre.add(f"{name} = {e.name}")
                continue
            self.load_names[(e.tensor, tuple(map(repr, e.indices)))] = name
            self.load(e, self.pre)

    def start_body(self, sec: Section) -> None:
        for k in self.s.stream:
            start = f"j_{k} * {self.sub_block('S', k)}"
            # a page id's load is masked by a test of the tile start: a tensor, also where the
            # loop index is a Python int (the interpreter)
            sec.add(f"k_lo_{k} = " + (f"tl.cast({start}, tl.int32)" if self.in_page else start))
            sec.add(f"{k} = k_lo_{k} + {self.box_position('S', k, 'r_k')}")

    def body_lines(self, masked: bool, indent: int, placed: bool = False) -> list[str]:
        """A loop body; `placed` bodies compute their key pointers from the tile start (box and
        listed tiles), the others read pointers the loop advances."""
        self.body_id += 1
        self.placed = placed
        sec = Section(indent=indent)
        self.body(masked, sec)
        self.placed = False
        return sec.lines

    def tile_offset(self, per_tile) -> str:
        return " + ".join(f"tl.cast(k_lo_{k}, tl.int64) * {stride}" for k, stride in per_tile)

    def segment_loop(self, seg: Segment, bodies: dict, loop: Section) -> None:
        """One branch-free loop over a segment's key tiles; pointers advance by a tile (one key
        rank) or are placed per tile (a box)."""
        bounds = [(k, print_int(lo, TRITON), print_int(hi, TRITON)) for k, lo, hi in seg.box]
        loop.add(f"# {'masked' if seg.masked else 'full'} key tiles")
        if len(bounds) == 1:
            k, lo, hi = bounds[0]
            for ptr, (base, per_tile) in self.pointers.items():
                start = "" if lo == "0" else f" + tl.cast({paren(lo)} * BLOCK_S, tl.int64) * {per_tile[0][1]}"
                loop.add(f"{ptr} = {base}{start}")
            loop.add(f"for j_{k} in range({lo}, {hi}):")
            loop.lines += bodies[seg.masked, False]
            for ptr, (_, per_tile) in self.pointers.items():
                loop.add(f"    {ptr} += BLOCK_S * {per_tile[0][1]}")
            return
        for k, lo, hi in bounds:
            loop.add(f"n_{k} = tl.maximum({hi} - {paren(lo)}, 0)")
        loop.add("for t in range(0, " + " * ".join(f"n_{k}" for k, _, _ in bounds) + "):")
        rest = "t"
        for k, lo, _ in reversed(bounds):
            if k == bounds[0][0]:
                loop.add(f"    j_{k} = {paren(lo)} + {rest}")
            else:
                loop.add(f"    j_{k} = {paren(lo)} + {rest} % n_{k}")
                rest = f"({rest} // n_{k})"
        loop.lines += bodies[seg.masked, True]

    def list_loop(self, which: str, body: list[str], loop: Section) -> None:
        k = self.s.stream[0]
        loop.add(f"# the {which} key tiles of this query tile, listed by the block-list kernel")
        loop.add(f"n_{which} = tl.load({which.upper()[0]}C_ptr + blk_row)")
        loop.add(f"for t in range(0, n_{which}):")
        loop.add(f"    j_{k} = tl.load({which.upper()[0]}L_ptr + blk_row * KT + t)")
        loop.lines += body

    # ------------------------------------------------------------------ the kernel
    def generate(self) -> str:
        s = self.s
        for e in s.einsums:
            self.axes_of[e.name] = self.canon([x for v in e.lhs_vars for x in self.var_axes(v)])
        self.pre, self.post = Section(), Section()
        self.in_loop = False
        self.grid_and_query_tile(self.pre)
        if self.list_mode:
            return self.generate_list()
        for e in s.of_kind("prologue"):
            self.after_loop_einsum(e, self.pre)
        for e in s.of_kind("carried"):
            init = self.neg_inf if e.reduce == "max" else "0.0"
            axes = self.axes_of[e.name]
            self.pre.add(f"{e.name} = {self.fill(axes, init) if axes else init}")
        for name, axes in self.counter_init():
            self.pre.add(f"{name} = {self.fill(axes, '0', 'int') if axes else '0'}")
        self.grid_values()
        if s.page_sizes and not s.loop.block_list:
            # the flag is a constexpr: one branch is compiled, and the loops stay branch-free
            flags = " and ".join(page_flag(d) for d in s.page_sizes)
            bounds = Section()
            for sym, e in s.loop.key_defs + s.loop.tile_defs:  # the same bounds for both branches
                bounds.add(f"{sym.name} = {print_int(e, TRITON)}")
            self.in_page = True
            paged = self.key_loops(2, bounds=False)
            self.in_page = False
            loops = [*bounds.lines, f"    if {flags}:  # every key tile lies in one page: one page-table read per tile",
                     *paged, "    else:", *self.key_loops(2, bounds=False)]
        else:
            loops = self.key_loops(1)
        self.presence_after_loop()
        for e in s.of_kind("epilogue"):
            self.after_loop_einsum(e, self.post)
        for t in s.stores:
            self.store(t, self.post)
        return self.render(self.pre.lines + loops + self.post.lines)

    def key_loops(self, indent: int, bounds: bool = True) -> list[str]:
        """The loops over the key tiles, at `indent`: per segment (after the bounds' definitions,
        unless `bounds` is False), or over the block lists."""
        s = self.s
        self.in_loop = True
        placed = s.loop.block_list or len(s.stream) > 1
        bodies = {(m, placed): self.body_lines(m, indent + 1, placed) for m in (False, True)}
        self.in_loop = False
        loop = Section(indent=indent)
        if s.loop.block_list:
            loop.add("blk_row = pid_g * NQT + pid_q")
            self.list_loop("full", bodies[False, True], loop)
            self.list_loop("partial", bodies[True, True], loop)
        else:
            for sym, e in (s.loop.key_defs + s.loop.tile_defs) if bounds else ():
                loop.add(f"{sym.name} = {print_int(e, TRITON)}")
            for seg in s.loop.tile_segments:
                self.segment_loop(seg, bodies, loop)
        return loop.lines

    def emit(self, expr: Expr, sec: Section) -> Val:
        """As the base emitter's, but where each key tile lies in one page (`in_page`) the page
        of key m, `m // T`, is one value per tile and its slot `m % T` the tile's offset in the
        page plus the lane."""
        if (self.in_page and isinstance(expr, Binary) and expr.op in ("//", "%") and isinstance(expr.rhs, Name)
                and expr.rhs.name in self.s.page_sizes and expr.lhs == Index(self.s.stream[0])):
            k, size = self.s.stream[0], expr.rhs.name
            if expr.op == "//":
                return Val(f"(k_lo_{k} // {size})", (), "int")
            return Val(f"(k_lo_{k} % {size} + r_k)", ("S",), "int")
        return super().emit(expr, sec)

    def generate_list(self) -> str:
        """The block-list kernel: per query tile, the key tiles whose mask is full, and those with
        some present point, each listed in order with a count (no branch in the loop)."""
        s, k = self.s, self.s.stream[0]
        pre = self.pre
        pre.add("blk_row = pid_g * NQT + pid_q")
        pre.add("n_full = 0")
        pre.add("n_partial = 0")
        self.grid_values()
        for sym, e in s.loop.key_defs + s.loop.tile_defs:
            pre.add(f"{sym.name} = {print_int(e, TRITON)}")
        (seg,) = s.loop.tile_segments
        _, lo, hi = seg.box[0]
        # the loop line goes after whatever the masks hoist into `pre` (a query-side tensor read)
        head = Section()
        head.add(f"for j_{k} in range({print_int(lo, TRITON)}, {print_int(hi, TRITON)}):")
        self.in_loop, self.masked = True, True
        sec = Section(indent=2)
        self.start_body(sec)
        live, axes = self.named_mask("live", s.predicate, sec)
        valid, vaxes = self.named_mask("k_valid", self.key_bound(), sec)
        tile = self.canon(("Q", "S"))
        live = f"{paren(self.align(live, axes, tile))} & {paren(self.align(valid, vaxes, tile))}"
        sec.add(f"some = tl.max(({live} & q_valid[:, None]).to(tl.int32))")
        sec.add(f"full = tl.min(({live} | (q_valid[:, None] == 0)).to(tl.int32))")
        sec.add(f"tl.store(FL_ptr + blk_row * KT + n_full, j_{k})")
        sec.add(f"tl.store(PL_ptr + blk_row * KT + n_partial, j_{k})")
        sec.add("n_full += full")
        sec.add("n_partial += some - full")
        self.post.add("tl.store(FC_ptr + blk_row, n_full)")
        self.post.add("tl.store(PC_ptr + blk_row, n_partial)")
        return self.render(pre.lines + head.lines + sec.lines + self.post.lines,
                           doc=f"Block list for stage {s.index}: the full and the partial key tiles of each query tile.")

    def store(self, t: str, sec: Section) -> None:
        e = self.local[t]
        axes = self.axes_of[t]
        ptr, masks = [f"{t}_ptr"], []
        for k, v in enumerate(i.name for i in e.target.indices):
            ptr.append(f"{self.align(v, self.var_axes(v), axes)} * stride_{t}_{k}")
            if v in self.s.query:
                masks.append(self.align("q_valid", ("Q",), axes))
            elif v in self.s.features:
                masks.append(self.align(self.feature_mask(v), (v,), axes))
        val = t
        pres, pax = self.pres_after.get(t, (None, ()))
        fill = next(o.fill for o in self.c.outputs if o.name == t) if t in self.c.output_names else 0.0
        across = t in self.s.atomic and self.s.kind(t) == "carried"  # a sum across programs adds what it saw
        if pres and not across:
            val = f'tl.where({self.align(pres, pax, axes)}, {t}, {self.number(float(fill))})'
        mask = " & ".join(masks)
        tail = f", mask={mask})" if mask else ")"
        if t in self.s.atomic:
            sec.add(f"tl.atomic_add({' + '.join(ptr)}, {val}{tail}")
        else:
            sec.add(f"tl.store({' + '.join(ptr)}, ({val}).to({t}_ptr.dtype.element_ty){tail}")

    def arg_names(self) -> list[tuple[str, str]]:
        """Kernel arguments as (name, kind): ptr, stride, dim, param, blist_ptr, blist_dim, constexpr."""
        c, s = self.c, self.s
        args = [(f"{t}_ptr", "ptr") for t in s.tensors]
        for t in s.tensors:
            args += [(f"stride_{t}_{k}", "stride") for k in range(len(c.tensors[t].ranks))]
        feats = {rank_of(f) for f in s.features}
        args += [(d, "dim") for d in c.dims if d not in feats]
        args += [(p.name, "param_int" if p.type == "int" else "param") for p in c.params]
        if s.loop.block_list:
            args += [(n, "blist_ptr") for n in ("FL_ptr", "PL_ptr", "FC_ptr", "PC_ptr")]
            args += [("KT", "blist_dim"), ("NQT", "blist_dim")]
        args += [(d, "constexpr") for d in c.dims if d in feats]
        args += [("BLOCK_Q", "constexpr"), ("BLOCK_S", "constexpr")]
        if len(s.query) > 1:
            args += [(f"BLOCK_Q_{v}", "constexpr") for v in s.query]
        if len(s.stream) > 1:
            args += [(f"BLOCK_S_{v}", "constexpr") for v in s.stream]
        args += [(self.block(f), "constexpr") for f in s.features]
        args += [(page_flag(d), "constexpr") for d in s.page_sizes]
        if self.grouping is not None:  # keys per group and groups per key tile (codegen.tiles.group_tiles)
            args += [("GROUP", "constexpr"), ("BLOCK_G", "constexpr")]
        return args

    def render(self, lines: list[str], doc: str | None = None) -> str:
        args = self.arg_names()
        sig = [f"{n}: tl.constexpr" if k == "constexpr" else n for n, k in args]
        # Extents and int params are run-time values that Triton must not specialize on (it
        # would recompile when a length's divisibility by 16 changes): one binary per bucket.
        runtime = [n for n, k in args if k in ("dim", "param_int", "blist_dim")]
        out = [f"@triton.jit(do_not_specialize={runtime!r})", f"def {self.name}("]
        for k in range(0, len(sig), 6):
            out.append("    " + ", ".join(sig[k:k + 6]) + ",")
        out.append("):")
        if doc:
            out.append(f'    """{doc}"""')
        else:
            kinds = ", ".join(f"{e.name}: {self.s.kind(e.name)}" for e in self.s.einsums)
            out.append(f'    """Stage {self.s.index}: stream {",".join(self.s.stream)}, query '
                       f'{",".join(self.s.query)}, grid {",".join(self.s.grid) or "-"}.')
            out.append(f"    {kinds}")
            out.append(f'    Keys: {self.s.loop.describe()}."""')
        return "\n".join(out + lines) + "\n"


FP16_MAX = 65504.0


def _bound(vals: list[Val]) -> float | None:
    """A bound on |product of vals|, when each factor has one."""
    out = 1.0
    for v in vals:
        if v.bound is None:
            return None
        out *= v.bound
    return out


def _mixed_operands(computed: str, bound: float | None, loaded: str, load: Val) -> tuple[str, str]:
    """A dot of a computed fp32 tile with a loaded one, as (computed, loaded) operand code. The
    computed tile goes to the load's dtype when its values fit fp16 (softmax probabilities);
    otherwise `_wide` keeps it fp32 beside an fp16 load (widened: the dot runs in fp32, TF32 on
    a GPU) and casts it only to dtypes with fp32's exponent range (bf16)."""
    if bound is not None and bound <= FP16_MAX:
        return f"({computed}).to({load.code}.dtype)", loaded
    return f"_wide({computed}, {load.code})", f"_partner({loaded})"


def stage_emitters(plan: Plan) -> list[StageEmitter]:
    """One emitter per stage (with its block-list emitter), not yet generated: enough to know
    each kernel's name and arguments, which is all a launch needs when the source is cached."""
    emitters = []
    for s in plan.stages:
        em = StageEmitter(plan, s, f"stage{s.index}_kernel")
        em.list_emitter = StageEmitter(plan, s, f"stage{s.index}_blocks", list_mode=True) \
            if s.loop.block_list else None
        emitters.append(em)
    return emitters


HELPERS = '''
@triton.jit
def _below(i, n: tl.constexpr, block: tl.constexpr):
    """i < n for the positions i of a block of a head dim n; no mask at all when they match."""
    if n == block:
        return tl.full(i.shape, 1, tl.int1)
    else:
        return i < n
'''

# Called helpers a module carries (with the registry's, einsum_ir.functions.TRITON_HELPERS).
DOT_HELPERS = {
    "_wide": '''@triton.jit
def _wide(x, like):
    """An fp32 tile for a dot with `like`: in like's dtype when that has fp32's exponent range
    (bf16), kept fp32 beside fp16 (whose 65504 it may exceed)."""
    if like.dtype == tl.float16:
        return x
    else:
        return x.to(like.dtype)
''',
    "_partner": '''@triton.jit
def _partner(y):
    """The loaded partner of a `_wide` tile: fp16 widened to fp32, so the dot runs in fp32."""
    if y.dtype == tl.float16:
        return y.to(tl.float32)
    else:
        return y
''',
}


def called_helpers(code: str) -> str:
    """The jit helpers `code` calls, with the helpers they call, in dependency order."""
    table = {**TRITON_HELPERS, **DOT_HELPERS}
    need: set[str] = set()
    frontier = code
    while True:
        new = {n for n in table if n not in need and re.search(rf"\b{n}\(", frontier)}
        if not new:
            return "\n\n".join(table[n] for n in table if n in need)
        need |= new
        frontier = "".join(table[n] for n in new)


def emit_plan(plan: Plan, cascade_text: str) -> tuple[str, list[StageEmitter]]:
    """The whole module: header comment with the cascade and plan, one kernel per stage."""
    head = module_header(plan, cascade_text, "Generated by einsum-ir (codegen/triton_emit.py) from the cascade:",
                         ["import triton", "import triton.language as tl", ""])
    kernels = []
    emitters = stage_emitters(plan)
    for em in emitters:
        if em.list_emitter is not None:
            kernels.append("\n" + em.list_emitter.generate())
        kernels.append("\n" + em.generate())
    called = called_helpers("".join(kernels))
    return "\n".join([head, HELPERS] + (["\n" + called] if called else []) + kernels), emitters
