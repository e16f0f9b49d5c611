"""The Triton emitter: a kernel plan -> readable Triton source (DESIGN section 6).

One mechanism for every variant. Each stage becomes one `@triton.jit` kernel whose grid is
(query tiles) x (grid ranks) and whose body is

    prologue   Einsums without the key rank, computed once per query tile
    loop       over the key tiles the skipping plan allows:
                 stream / key-side Einsums -> tile values (named after the cascade's tensors)
                 carried reductions        -> loop-carried accumulators (online max rescaling)
               emitted twice: unmasked for full tiles, masked for partial ones
    epilogue   Einsums after the loop; stores (absent points take the output's fill)

Every value is a block over at most two *tile axes*: `Q` (the query tile, possibly several
flattened ranks), `S` (the key tile) and feature ranks (`e`, `f`, ...) held whole. A sum over
one axis of two 2-D factors is a `tl.dot`; everything else is elementwise `tl.*` code derived
from the expression tree.
"""
from __future__ import annotations

from einsum_ir.codegen.block_emit import (
    BlockEmitter,
    Section,
    Val,
    accesses,
    is_simple,
    module_header,
    paren,
)
from einsum_ir.errors import LoweringError
from einsum_ir.ir import Access, Call, Einsum, Index, rank_of, walk
from einsum_ir.lowering.plan import Plan, Stage

NBHD_HELPERS = '''
@triton.jit
def _nbhd_start(q, L, w, s):
    """First key of the GNA window of query q (Hassani et al. 2025): monotone in q."""
    left = w // 2
    right = w // 2 + w % 2 - 1
    leader = tl.minimum((q // s) * s + s // 2, L - 1)
    start = tl.maximum(leader - left, 0) + tl.where(leader + right >= L, L - right - leader - 1, 0)
    return tl.maximum(start, 0)


@triton.jit
def _nbhd(q, k, L, w, s, d):
    """True where key k lies in the (strided, dilated) neighborhood of query q."""
    group = q % d
    glen = (L - group + d - 1) // d
    start = _nbhd_start(q // d, glen, w, s)
    kk = k // d
    return ((k % d) == group) & (kk >= start) & (kk < start + w)
'''

UNARY = {
    "exp": "tl.exp({0})", "log": "tl.log({0})", "log1p": "tl.log(1.0 + {0})", "sqrt": "tl.sqrt({0})",
    "rsqrt": "tl.rsqrt({0})", "tanh": "(2.0 * tl.sigmoid(2.0 * {0}) - 1.0)", "sigmoid": "tl.sigmoid({0})",
    "softplus": "tl.where({0} > 20.0, {0}, tl.log(1.0 + tl.exp(tl.minimum({0}, 20.0))))",
    "relu": "tl.maximum({0}, 0.0)", "elu": "tl.where({0} > 0, {0}, tl.exp(tl.minimum({0}, 0.0)) - 1.0)",
    "abs": "tl.abs({0})",
}
BINARY_FN = {"pow": "tl.exp({1} * tl.log({0}))", "max": "tl.maximum({0}, {1})", "min": "tl.minimum({0}, {1})"}


class StageEmitter(BlockEmitter):
    """One stage of a plan -> one `@triton.jit` kernel (or, in list mode, its block-list kernel)."""

    # prologue values are read after the loop without presence
    after_loop_kinds = ("carried", "epilogue")
    pos_inf, neg_inf = 'float("inf")', 'float("-inf")'

    def __init__(self, plan: Plan, stage: Stage, name: str):
        super().__init__(plan, stage, name)
        self.order = ["Q", "S"] + list(stage.features)
        self.cache: dict = {}
        self.prerun = False
        self.list_mode = False
        self.body_id = 0
        self.group_of: dict = {}
        self.groups: dict = {}
        self.updated: set = set()

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

    def block(self, a: str) -> str:
        return {"Q": "BLOCK_Q", "S": "BLOCK_S"}.get(a, f"BLOCK_{a.upper()}")

    def shape(self, axes) -> str:
        return "[" + ", ".join(self.block(a) for a in axes) + "]"

    # ------------------------------------------------------------------ expressions
    def num(self, v: Val) -> str:
        return f"{v.code}.to(tl.float32)" if v.kind in ("native", "bool") else v.code

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

    def nbhd(self, args: list[Val]) -> Val:
        args = args + [Val("1", (), "int")] * (6 - len(args))
        axes = self.canon(args[0].axes + args[1].axes)
        q = self.align(args[0].code, args[0].axes, axes)
        k = self.align(args[1].code, args[1].axes, axes)
        return Val(f"_nbhd({q}, {k}, {', '.join(a.code for a in args[2:])})", axes, "bool")

    def where(self, args: list[Val], axes: tuple[str, ...], pres: str | None, pax: tuple) -> Val:
        c = self.align(self.truth(args[0]), args[0].axes, axes)
        a = self.align(self.num(args[1]), args[1].axes, axes)
        b = self.align(self.num(args[2]), args[2].axes, axes)
        return Val(self.select(c, a, b), axes, "float", pres, pax)

    def call(self, fn: str, args: list[Val], axes: tuple[str, ...], pres: str | None, pax: tuple,
             sec: Section) -> Val:
        codes = [self.align(self.float_quotient(a.code) if a.kind == "int" else self.num(a), a.axes, axes)
                 for a in args]
        if fn in UNARY:
            x = codes[0]
            if UNARY[fn].count("{0}") > 1 and not is_simple(x):
                name = self.fresh("t")
                sec.add(f"{name} = {x}")
                x = name
            return Val(UNARY[fn].format(x), axes, "float", pres, pax)
        if fn in BINARY_FN:
            return Val(BINARY_FN[fn].format(*codes), axes, "float", pres, pax)
        raise LoweringError(f"function {fn}() has no Triton lowering")

    # ------------------------------------------------------------------ loads
    def load(self, a: Access, sec: Section) -> Val:
        t = a.tensor
        idx_vals = [self.emit(i, sec) for i in a.indices]
        axes = self.canon([x for v in idx_vals for x in v.axes])
        target = self.pre if (self.in_loop and "S" not in axes) else sec
        key = (t, tuple(map(repr, a.indices)), "pre" if target is self.pre else (self.body_id, id(sec), self.masked))
        if key in self.cache:
            return self.cache[key]
        info = self.c.tensors[t]
        ptr = [f"{t}_ptr"]
        masks = []
        for k, (idx, v) in enumerate(zip(a.indices, idx_vals)):
            ptr.append(f"{self.align(v.code, v.axes, axes)} * stride_{t}_{k}")
            rank = info.ranks[k]
            if isinstance(idx, Index):
                var = idx.name
                if var in self.s.query:
                    masks.append(self.align("q_valid", ("Q",), axes))
                elif var in self.s.stream:
                    if self.masked or not self.in_loop:
                        masks.append(self.align("k_valid", ("S",), axes))
                elif var in self.s.features:
                    masks.append(self.align(f"({var} < {rank})", (var,), axes))
            else:
                masks.append(self.align(f"(({v.code}) >= 0) & (({v.code}) < {rank})", v.axes, axes))
        name = t if not any(k[0] == t for k in self.cache) else self.fresh(t)
        mask = " & ".join(dict.fromkeys(masks))
        ptr_code = " + ".join(ptr)
        if mask:
            target.add(f"{name} = tl.load({ptr_code}, mask={mask}, other=0)")
        else:
            target.add(f"{name} = tl.load({ptr_code})")
        dtype = info.dtype if t in self.c.input_names else "fp32"
        if dtype in ("bool", "int8", "int16", "int32", "int64"):
            kind = "int"
        else:
            kind = "native"
        val = Val(name, axes, kind)
        self.cache[key] = val
        return val

    # ------------------------------------------------------------------ reductions
    def sum_term(self, inner: list[Val], outer: list[Val], red_axes: set[str], out_axes: tuple[str, ...],
                 mask: tuple | None, sec: Section) -> tuple[str, tuple[str, ...], list[Val]]:
        term = self._dot(inner, red_axes, out_axes, mask, sec)
        if term is not None:
            return term, out_axes, outer
        have = [x for v in inner for x in v.axes]
        # a reduced index the term does not depend on sums identical values: over a
        # feature rank that is a factor of its extent; over the key tile the term is
        # broadcast so the mask counts the present keys
        extent_factors = [rank_of(v) for v in red_axes if v not in have and v not in ("Q", "S")]
        if "S" in red_axes and "S" not in have:
            have.append("S")
            if mask is not None:
                have += list(mask[1])
        axes = self.canon(have)
        prod = " * ".join(self.align(self.num(v), v.axes, axes) for v in inner) or "1.0"
        if "S" in axes and not any("S" in v.axes for v in inner):
            ones = f"tl.full({self.shape(axes)}, 1.0, tl.float32)"
            prod = ones if prod == "1.0" else f"{ones} * ({prod})"
        prod = " * ".join([prod] + extent_factors)
        if mask is not None:
            m, max_ = mask
            prod = self.select(self.align(m, max_, axes), prod, "0.0")
        term, term_axes = self.reduce("sum", prod, axes, red_axes)
        return term, term_axes, outer

    def _dot(self, inner: list[Val], red_axes: set[str], out_axes, mask, sec) -> str | None:
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

        def operand(vs, axes, want):
            if len(vs) == 1 and vs[0].kind == "native":
                code, native = vs[0].code, vs[0]
            else:
                code = " * ".join(self.align(self.num(v), v.axes, axes) for v in vs)
                native = None
            return code, native

        a_code, a_nat = operand(A, a_axes, (x, r))
        b_code, b_nat = operand(B, b_axes, (r, y))
        if mask is not None:
            m, max_ = mask
            if set(max_) <= set(a_axes):
                a_code, a_nat = f"tl.where({self.align(m, max_, a_axes)}, {a_code}, 0.0)", None
            elif set(max_) <= set(b_axes):
                b_code, b_nat = f"tl.where({self.align(m, max_, b_axes)}, {b_code}, 0.0)", None
            else:
                return None
        if a_nat is None and b_nat is not None:
            a_code = f"({a_code}).to({b_nat.code}.dtype)"
        elif b_nat is None and a_nat is not None:
            b_code = f"({b_code}).to({a_nat.code}.dtype)"
        if a_axes != (x, r):
            a_code = f"tl.trans({a_code})"
        if b_axes != (r, y):
            b_code = f"tl.trans({b_code})"
        name = self.fresh("dot")
        sec.add(f"{name} = tl.dot({a_code}, {b_code})")
        return name

    # ------------------------------------------------------------------ Einsums by class
    def stream_einsum(self, e: Einsum, sec: Section) -> None:
        axes = self.axes_of[e.name]
        if self.masked:  # the presence mask first, so a tile test can skip the work after it
            parts = []
            for f in accesses(e.expr):
                if f.tensor in self.mask_of:
                    parts.append(self.mask_of[f.tensor])
            if e.where is not None:
                w = self.emit(e.where, sec)
                parts.append((self.truth(w), w.axes))
                if "S" in axes and not parts[:-1]:
                    parts.append(("k_valid", ("S",)))
            if not parts and "S" in axes:
                parts.append(("k_valid", ("S",)))
            parts = list(dict.fromkeys(parts))
            if parts:
                if len(parts) == 1 and parts[0][0].isidentifier():
                    self.mask_of[e.name] = parts[0]
                else:
                    mcode, pax = self.conjunction(parts)
                    sec.add(f"{e.name}_mask = {mcode}")
                    self.mask_of[e.name] = (f"{e.name}_mask", pax)
        in_tile_red = {x for v in e.reduced for x in self.var_axes(v)}
        if e.reduced:
            if e.reduce != "sum":
                raise LoweringError(f"{e.name}: a {e.reduce} over feature ranks is not emitted")
            code = self.reduce_sum(e, sec, in_tile_red, None)
        else:
            v = self.emit(e.expr, sec)
            code = self.align(self.num(v), v.axes, axes) if v.axes else v.code
            if not v.axes and axes:
                code = f"tl.full({self.shape(axes)}, {code}, tl.float32)"
        sec.add(f"{e.name} = {code}")

    def carried_einsum(self, e: Einsum, sec: Section) -> None:
        red = {x for v in e.reduced for x in self.var_axes(v)}
        mask = None
        if self.masked:
            vals = []
            for f in accesses(e.expr):
                if f.tensor in self.mask_of:
                    vals.append(Val("", (), pres=self.mask_of[f.tensor][0], pres_axes=self.mask_of[f.tensor][1]))
            parts = [(v.pres, v.pres_axes) for v in vals]
            if e.where is not None:
                w = self.emit(e.where, sec)
                parts.append((self.truth(w), w.axes))
            parts.append(("k_valid", ("S",)))
            uniq = list(dict.fromkeys(parts))
            if len(uniq) > 1 and ("k_valid", ("S",)) in uniq and len(uniq) > 1 and any(p[0] != "k_valid" for p in uniq):
                # stream masks already include k_valid unless the summand reads loads only
                if vals:
                    uniq.remove(("k_valid", ("S",)))
            mcode, pax = self.conjunction(uniq)
            if len(uniq) > 1:
                mname = f"{e.name}_mask"
                sec.add(f"{mname} = {mcode}")
                mcode = mname
            mask = (mcode, pax)
        if e.reduce == "max":
            self.carried_max(e, red, mask, sec)
        else:
            self.carried_sum(e, self.reduce_sum(e, sec, red, mask), sec)
        if self.track_any:
            self.presence_update(e, mask, sec)

    def presence_update(self, e: Einsum, mask, sec: Section) -> None:
        """Carried reductions sharing a mask share presence: a max in the group answers it
        (present iff > -inf), else one counter per group records whether any point was seen."""
        if self.prerun:
            if mask is not None:
                self.group_of[e.name] = mask
            return
        key = self.group_of.get(e.name)
        group = self.groups.get(key)
        if group is None or group["max"] is not None or group["tracker"] in self.updated:
            return
        tracker = group["tracker"]
        self.updated.add(tracker)
        if mask is None:
            sec.add(f"{tracker} = tl.maximum({tracker}, 1)")
            return
        m, max_ = mask
        x, _ = self.reduce("max", f"{m}.to(tl.int32)", max_, [a for a in max_ if a not in group["axes"]])
        sec.add(f"{tracker} = tl.maximum({tracker}, {x})")

    def epilogue_einsum(self, e: Einsum, sec: Section) -> None:
        axes = self.axes_of[e.name]
        if e.name in self.s.grid_reduce:
            v = self.emit(e.expr, sec)
            code = self.align(self.num(v), v.axes, axes)
            sec.add(f"{e.name} = {code}")
            self.pres_after[e.name] = (None, ())
            return
        red = {x for v in e.reduced for x in self.var_axes(v)}
        if e.reduced:
            if e.reduce != "sum":
                raise LoweringError(f"{e.name}: a {e.reduce} over feature ranks after the loop is not emitted")
            code = self.reduce_sum(e, sec, red, None)
            pres = (None, ())
        else:
            v = self.emit(e.expr, sec)
            code = self.align(self.num(v), v.axes, axes)
            if not v.axes and axes:
                code = f"tl.full({self.shape(axes)}, {code}, tl.float32)"
            pres = (v.pres, v.pres_axes)
        sec.add(f"{e.name} = {code}")
        self.pres_after[e.name] = pres

    # ------------------------------------------------------------------ the kernel
    def generate(self) -> str:
        s = self.s
        for e in s.einsums:
            self.axes_of[e.name] = self.canon([x for v in e.lhs_vars for x in self.var_axes(v)])
        self.loads_here = set(s.loads)
        self.pre, self.post = Section(), Section()
        self.mask_of: dict[str, tuple] = {}
        self.pres_after: dict[str, tuple] = {}
        self.finalize: list[str] = []
        self.in_loop = False
        pre = self.pre
        # grid
        pre.add("pid_q = tl.program_id(0)")
        pre.add("pid_g = tl.program_id(1)")
        rest = "pid_g"
        if s.grid:
            pre.add("# grid ranks as int64: their offsets reach past 2**31 on large batches")
            pre.add("pid_g = pid_g.to(tl.int64)")
        for v in reversed(s.grid):
            R = rank_of(v)
            if v == s.grid[0]:
                pre.add(f"{v} = {rest}")
            else:
                pre.add(f"{v} = {rest} % {R}")
                rest = f"({rest} // {R})"
        self.query_tile(pre)
        for f in s.features:
            pre.add(f"{f} = tl.arange(0, {self.block(f)})")
        # prologue
        for e in s.einsums:
            if s.kind[e.name] == "prologue" and not self.list_mode:
                self.epilogue_einsum(e, pre)
        # accumulators
        carried = [e for e in s.einsums if s.kind[e.name] == "carried"]
        for e in carried:
            axes = self.axes_of[e.name]
            init = 'float("-inf")' if e.reduce == "max" else "0.0"
            if axes:
                pre.add(f"{e.name} = tl.full({self.shape(axes)}, {init}, tl.float32)")
            else:
                pre.add(f"{e.name} = {init}")
        # loop bounds and key tile
        loop = Section(indent=2)
        blist = s.skip.block_list and not self.list_mode
        loop_head = self.key_loop(pre, loop, from_list=blist)
        body_einsums = [e for e in s.einsums if s.kind[e.name] in ("stream", "key_side", "carried")]
        full = s.skip.full
        self.in_loop = True
        in_bounds = " & ".join(f"(k_hi_{k} < KEYS_{k})" for k in s.stream)
        full_cond = in_bounds + ("" if full == "True" else f" & ({full})")

        def body(masked: bool, indent: int) -> list[str]:
            self.masked = masked
            self.mask_of = {}
            self.finalize = []
            self.alpha = {}
            self.updated = set()
            self.body_id += 1
            sec = Section(indent=indent)
            if masked:
                sec.add("k_valid = " + " & ".join(f"({k} < KEYS_{k})" for k in s.stream))
            for e in body_einsums:
                if s.kind[e.name] == "carried":
                    self.carried_einsum(e, sec)
                else:
                    self.stream_einsum(e, sec)
            for line in self.finalize:
                sec.add(line)
            return sec.lines

        # presence groups: a dry run of the masked body finds which carried reductions share a mask
        self.prerun, self.group_of, self.groups = True, {}, {}
        if self.track_any:
            body(True, 3)
        self.prerun = False
        for e in carried:
            if e.name not in self.group_of:
                continue
            key = self.group_of[e.name]
            g = self.groups.setdefault(key, {"max": None, "tracker": None, "members": [],
                                             "axes": ("Q",) if "Q" in self.axes_of[e.name] else ()})
            g["members"].append(e.name)
            if e.reduce == "max" and g["max"] is None and self.axes_of[e.name] == g["axes"]:
                g["max"] = e.name
        for g in self.groups.values():
            if g["max"] is None:
                g["tracker"] = f"{g['members'][0]}_any"
                pre.add(f"{g['tracker']} = tl.zeros([BLOCK_Q], dtype=tl.int32)" if g["axes"]
                        else f"{g['tracker']} = 0")
        if self.list_mode:
            return self.render_list(loop_head, loop, body(True, 2))
        if full == "False":
            masked_lines = body(True, 2)
            if s.skip.tensor_test and not blist:
                loop.lines += _tensor_test(masked_lines, self, 2)
            else:
                loop.lines += masked_lines
        else:
            loop.add(f"if {full_cond}:")
            loop.lines += body(False, 3)
            loop.add("else:")
            ml = body(True, 3)
            loop.lines += _tensor_test(ml, self, 3) if s.skip.tensor_test else ml
        self.in_loop = False
        self.masked = False
        # epilogue
        post = self.post
        for e in carried:
            g = self.groups.get(self.group_of.get(e.name))
            if g is None:
                self.pres_after[e.name] = (None, ())
            elif g["max"] is not None:
                self.pres_after[e.name] = (f'({g["max"]} > float("-inf"))', g["axes"])
            else:
                self.pres_after[e.name] = (f"({g['tracker']} > 0)", g["axes"])
        for e in s.einsums:
            if s.kind[e.name] == "epilogue":
                self.epilogue_einsum(e, post)
        for t in s.stores:
            self.store(t, post)
        return self.render(loop_head, loop)

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

    def query_tile(self, pre: Section) -> None:
        """The query tile: a box over the query ranks (one rank: a run of BLOCK_Q queries)."""
        qs = self.s.query
        pre.add("r_q = tl.arange(0, BLOCK_Q)")
        rest = "pid_q"
        tiles = {}
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
        for k in self.s.stream:
            pre.add(f"KEYS_{k} = {rank_of(k)}")

    def key_loop(self, pre: Section, loop: Section, from_list: bool = False) -> str:
        """Loop header over the key tiles the skipping plan allows; sets k_lo_/k_hi_ and the
        key index variables inside the loop."""
        ks = self.s.stream
        ranges = self.s.skip.ranges
        if from_list:
            k = ks[0]
            pre.add("# the live key tiles of this query tile, from the block-list kernel")
            pre.add("blk_row = pid_g * NQT + pid_q")
            pre.add("n_blk = tl.load(BC_ptr + blk_row)")
            head = "for t in range(0, n_blk):"
            loop.add(f"j_{k} = tl.load(BL_ptr + blk_row * KT + t)")
        elif len(ranges) == 2 and len(ks) == 1:
            k = ks[0]
            (lo1, hi1), (lo2, hi2) = ranges[0][k], ranges[1][k]
            pre.add("j_lo1 = " + ("0" if lo1 == "0" else f"tl.maximum({lo1}, 0) // BLOCK_S"))
            pre.add(f"j_hi1 = tl.maximum((tl.minimum({hi1}, KEYS_{k}) + BLOCK_S - 1) // BLOCK_S, j_lo1)")
            pre.add("j_lo2 = " + ("0" if lo2 == "0" else f"tl.maximum({lo2}, 0) // BLOCK_S"))
            pre.add(f"j_hi2 = tl.maximum((tl.minimum({hi2}, KEYS_{k}) + BLOCK_S - 1) // BLOCK_S, j_lo2)")
            pre.add("# visit the two key ranges in order, each tile once")
            pre.add("first = j_lo1 <= j_lo2")
            pre.add("ja_lo = tl.where(first, j_lo1, j_lo2)")
            pre.add("ja_hi = tl.where(first, j_hi1, j_hi2)")
            pre.add("jb_lo = tl.maximum(tl.where(first, j_lo2, j_lo1), ja_hi)")
            pre.add("jb_hi = tl.maximum(tl.where(first, j_hi2, j_hi1), jb_lo)")
            pre.add("n_a = ja_hi - ja_lo")
            head = "for t in range(0, n_a + jb_hi - jb_lo):"
            loop.add(f"j_{k} = tl.where(t < n_a, ja_lo + t, jb_lo + t - n_a)")
        else:
            box = ranges[0] if ranges else {}
            for k in ks:
                blk = self.sub_block("S", k)
                if k in box:
                    lo, hi = box[k]
                    pre.add(f"k_start_{k} = " + ("0" if lo == "0" else f"tl.maximum({lo}, 0)"))
                    pre.add(f"k_end_{k} = tl.minimum({hi}, KEYS_{k})")
                    pre.add(f"j_start_{k} = k_start_{k} // {blk}")
                    pre.add(f"j_end_{k} = tl.maximum((k_end_{k} + {blk} - 1) // {blk}, j_start_{k})")
                else:
                    pre.add(f"j_start_{k} = 0")
                    pre.add(f"j_end_{k} = (KEYS_{k} + {blk} - 1) // {blk}")
            if len(ks) == 1:
                k = ks[0]
                head = f"for j_{k} in range(j_start_{k}, j_end_{k}):"
            else:
                for k in ks:
                    pre.add(f"n_{k} = j_end_{k} - j_start_{k}")
                head = "for t in range(0, " + " * ".join(f"n_{k}" for k in ks) + "):"
                rest = "t"
                for k in reversed(ks):
                    if k == ks[0]:
                        loop.add(f"j_{k} = j_start_{k} + {rest}")
                    else:
                        loop.add(f"j_{k} = j_start_{k} + {rest} % n_{k}")
                        rest = f"({rest} // n_{k})"
        pre.add("r_k = tl.arange(0, BLOCK_S)")
        for k in ks:
            blk = self.sub_block("S", k)
            loop.add(f"k_lo_{k} = j_{k} * {blk}")
            loop.add(f"k_hi_{k} = k_lo_{k} + {blk} - 1")
            loop.add(f"{k} = k_lo_{k} + {self.box_position('S', k, 'r_k')}")
        return head

    def store(self, t: str, sec: Section) -> None:
        e = self.local[t]
        axes = self.axes_of[t]
        ptr, masks = [f"{t}_ptr"], []
        store_vars = [i.name for i in e.target.indices]
        if t in self.s.grid_reduce:
            store_vars = [v for v in store_vars]
        for k, v in enumerate(store_vars):
            va = self.var_axes(v)
            ptr.append(f"{self.align(v, va, axes)} * stride_{t}_{k}")
            if v in self.s.query:
                masks.append(self.align("q_valid", ("Q",), axes))
            elif v in self.s.features:
                masks.append(self.align(f"({v} < {rank_of(v)})", (v,), axes))
        val = t
        pres, pax = self.pres_after.get(t, (None, ()))
        fill = next(o.fill for o in self.c.outputs if o.name == t) if t in self.c.output_names else 0.0
        if pres:
            val = f'tl.where({self.align(pres, pax, axes)}, {t}, {self.number(float(fill))})'
        mask = " & ".join(masks)
        if t in self.s.grid_reduce:
            sec.add(f"tl.atomic_add({' + '.join(ptr)}, {val}" + (f", mask={mask})" if mask else ")"))
        else:
            sec.add(f"tl.store({' + '.join(ptr)}, ({val}).to({t}_ptr.dtype.element_ty)" + (f", mask={mask})" if mask else ")"))

    def arg_names(self) -> list[tuple[str, str]]:
        """Kernel arguments as (name, kind): ptr, stride, dim, param, constexpr."""
        c, s = self.c, self.s
        args = []
        for t in s.loads + s.stores:
            args.append((f"{t}_ptr", "ptr"))
        for t in s.loads + s.stores:
            for k in range(len(c.tensors[t].ranks)):
                args.append((f"stride_{t}_{k}", "stride"))
        feats = {rank_of(f) for f in s.features}
        for d in c.dims:
            if d not in feats:
                args.append((d, "dim"))
        for p in c.params:
            args.append((p.name, "param_int" if p.type == "int" else "param"))
        if s.skip.block_list:
            args += [("BL_ptr", "blist_ptr"), ("BC_ptr", "blist_ptr"), ("KT", "blist_dim"),
                     ("NQT", "blist_dim")]
        for d in c.dims:
            if d in feats:
                args.append((d, "constexpr"))
        args.append(("BLOCK_Q", "constexpr"))
        args.append(("BLOCK_S", "constexpr"))
        if len(s.query) > 1:
            args += [(f"BLOCK_Q_{v}", "constexpr") for v in s.query]
        if len(s.stream) > 1:
            args += [(f"BLOCK_S_{v}", "constexpr") for v in s.stream]
        for f in s.features:
            args.append((self.block(f), "constexpr"))
        return args

    def render_list(self, loop_head: str, loop: Section, masked: list[str]) -> str:
        """The block-list kernel: per query tile, the key tiles with a present point."""
        cut = []
        for line in masked:
            cut.append(line)
            if line.strip().split(" = ")[0].endswith("_mask"):
                mask = line.strip().split(" = ")[0]
                break
        else:
            raise LoweringError("no mask to build a block list from")
        pad = "    " * 2
        body = list(loop.lines) + cut + [
            f"{pad}if tl.max({mask}.to(tl.int32)) > 0:",
            f"{pad}    tl.store(BL_ptr + blk_row * KT + n_blk, j_{self.s.stream[0]})",
            f"{pad}    n_blk += 1",
        ]
        self.pre.lines = [line for line in self.pre.lines if "tl.full(" not in line]
        self.pre.add("blk_row = pid_g * NQT + pid_q")
        self.pre.add("n_blk = 0")
        self.post = Section()
        self.post.add("tl.store(BC_ptr + blk_row, n_blk)")
        return self.render(loop_head, Section(lines=body), doc="Block list for stage "
                           f"{self.s.index}: the key tiles where the mask has a present point.")

    def render(self, loop_head: str, loop: Section, doc: str | None = None) -> str:
        args = self.arg_names()
        sig = []
        for n, k in args:
            sig.append(f"{n}: tl.constexpr" if k == "constexpr" else n)
        # Extents and int params are run-time values that Triton must not specialize on (it
        # would recompile when a length's divisibility by 16 changes): one binary per bucket.
        runtime = [n for n, k in args if k in ("dim", "param_int", "blist_dim")]
        lines = [f"@triton.jit(do_not_specialize={runtime!r})", f"def {self.name}("]
        for k in range(0, len(sig), 6):
            lines.append("    " + ", ".join(sig[k:k + 6]) + ",")
        lines.append("):")
        kinds = ", ".join(f"{e.name}: {self.s.kind[e.name]}" for e in self.s.einsums)
        if doc:
            lines.append(f'    """{doc}"""')
        else:
            lines.append(f'    """Stage {self.s.index}: stream {",".join(self.s.stream)}, query '
                         f'{",".join(self.s.query)}, grid {",".join(self.s.grid) or "-"}.')
            lines.append(f"    {kinds}")
            lines.append(f'    Skipping: {self.s.skip.describe()}."""')
        lines += self.pre.lines
        lines.append("    " + loop_head)
        lines += loop.lines
        lines += self.post.lines
        return "\n".join(lines) + "\n"


def _tensor_test(lines: list[str], em: StageEmitter, indent: int) -> list[str]:
    """Guard a masked body by an any-present test of the tile (mask tensors: in-kernel block list)."""
    # the mask of the first guarded Einsum decides; compute it first, then the rest of the body
    pad = "    " * indent
    out, guard = [], None
    for k, line in enumerate(lines):
        out.append(line)
        if guard is None and line.strip().split(" = ")[0].endswith("_mask"):
            name = line.strip().split(" = ")[0]
            out.append(f"{pad}if tl.max({name}.to(tl.int32)) > 0:")
            guard = k
            rest = lines[k + 1:]
            out += ["    " + r for r in rest]
            return out
    return lines


def stage_emitters(plan: Plan) -> list[StageEmitter]:
    """One emitter per stage (with its block-list emitter), not yet generated: enough to know
    each kernel's name and arguments, which is all a launch needs when the source is cached."""
    emitters = []
    for s in plan.stages:
        em = StageEmitter(plan, s, f"stage{s.index}_kernel")
        em.list_emitter = None
        if s.skip.block_list:
            em.list_emitter = StageEmitter(plan, s, f"stage{s.index}_blocks")
            em.list_emitter.list_mode = True
        emitters.append(em)
    return emitters


def emit_plan(plan: Plan, cascade_text: str) -> tuple[str, list[StageEmitter]]:
    """The whole module: header comment with the cascade, helpers, one kernel per stage."""
    head = module_header(plan, cascade_text, "Generated by einsum-ir (codegen/triton_emit.py) from the cascade:",
                         ["import triton", "import triton.language as tl", ""])
    uses_nbhd = any(isinstance(n, Call) and n.fn == "nbhd"
                    for e in plan.cascade.einsums for x in (e.expr, e.where) if x is not None for n in walk(x))
    parts = [head] + [NBHD_HELPERS] * uses_nbhd  # only kernels with neighborhoods call these
    emitters = stage_emitters(plan)
    for em in emitters:
        parts.append("\n" + em.generate())
        if em.list_emitter is not None:
            parts.append("\n" + em.list_emitter.generate())
    return "\n".join(parts), emitters
