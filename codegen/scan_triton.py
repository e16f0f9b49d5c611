"""The Triton emitter of the chunked scan: a ScanPlan (lowering/chunked_scan.py) -> Triton.

One `@triton.jit` kernel per sweep, one program per grid point (B, H flattened), and, where
the sweep allows it, per block of one kept feature (the `split` feature, V's head dim F in a
causal scan, as flash-linear-attention splits it). Each program walks the chunks of its token
rank in order, BLOCK_C positions at a time:

    maps          per-token Einsums over [chunk, feature] tiles, zero past the last position
    reductions    each state (an fp32 tile held in registers across the loop) += (or max=)
                  the chunk's share
    causal terms  intra = where(m <= p, (q k^T) * c(p, m), 0) v    the chunk against itself
                  inter = (q * c(p, s)) H                           earlier chunks, via the state
                  H = c(s', s) H + (k * c(s', m))^T v               the state at s' = s + BLOCK_C
    stores        the chunk's rows of each output; the states after the loop

This is codegen/scan_cpu.py's computation (its reference) on tiles. The last chunk is ragged:
its positions past N load 0, and every value a reduction or a state update sums is zero
there (maps are stored zeroed; a decay ratio is selected to 0 past N, since g(s')/g(m) at a
position past N may be inf). Expressions print through triton_emit's StageEmitter (the
registry's Triton spellings, dots, feature masks); what differs is the loop and the tiles.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from einsum_ir.codegen.block_emit import Section, Val, is_simple, join_terms, module_header, paren
from einsum_ir.codegen.derived import DerivedKernels
from einsum_ir.codegen.outputs import collect_outputs, interpreted, run_epilogue
from einsum_ir.codegen.tiles import next_pow2
from einsum_ir.codegen.triton_emit import HELPERS, StageEmitter, called_helpers
from einsum_ir.errors import LoweringError
from einsum_ir.ir import Access, Cascade, Einsum, Index, rank_of
from einsum_ir.lowering.chunked_scan import KEY, QUERY, TOKENS, ScanPlan, Sweep, Term, chunk_size
from einsum_ir.params import bind_arguments



@dataclass(frozen=True)
class ScanConfig:
    """One launch configuration of a scan's sweeps: positions per chunk, the block of the
    feature split across programs (None: whole), warps and pipeline stages."""

    chunk: int
    feature_block: int | None
    num_warps: int
    num_stages: int = 2

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"chunk {self.chunk} F-block {self.feature_block or 'whole'} w{self.num_warps} s{self.num_stages}"


# Tried in order for a GPU target, the first whose every sweep compiles without spilling (no
# LOCAL and no STACK frame) wins
# (ahead of time, cached): a 64-position chunk feeds the tensor cores best; a smaller chunk or
# feature block, or more warps, hold fewer registers per thread (a d=128 state is 64 KB).
CANDIDATES = (ScanConfig(64, 64, 4), ScanConfig(32, 64, 8), ScanConfig(32, 32, 8), ScanConfig(16, 32, 8),
              ScanConfig(16, 16, 8))
_START = {"sum": "0.0", "max": 'float("-inf")', "min": 'float("inf")'}
_COMBINE = {"max": "tl.maximum", "min": "tl.minimum"}


def feature_order(plan: ScanPlan) -> list[str]:
    """The features in tile order: each term's contracted feature before its kept one, so a
    state is an [E, F] tile and `q @ H`, `k^T @ v` need no transpose of it."""
    first = [v for s in plan.sweeps for t in s.terms for v in t.contracted + t.kept]
    return list(dict.fromkeys(first + list(plan.features)))


class SweepKernel(StageEmitter):
    """One sweep of a scan plan -> one `@triton.jit` kernel. Values are tiles over at most two
    axes: the chunk (`p` or `m`; both in a lockstep sweep, the same positions) and features."""

    list_emitter = None  # a sweep loops over every chunk: no block-list kernel before it

    def __init__(self, plan: ScanPlan, sweep: Sweep, name: str):
        # not StageEmitter.__init__: a sweep has no key loop; these are what the inherited
        # expression walk, dots and reductions read
        self.plan, self.s, self.name, self.c = plan, sweep, name, plan.cascade
        self.order = [QUERY, KEY] + feature_order(plan)
        self.counter = 0
        self.summed_rows = None
        self.axes_of: dict[str, tuple[str, ...]] = {}
        self.values: dict[str, Val] = {}  # Einsums this kernel computes, by name
        self.clean: set[str] = set()  # codes that are 0 wherever a position or feature is past its extent
        self.loaded: dict[tuple, Val] = {}
        self.bases: dict[tuple, str] = {}
        self.at: dict[str, str] = {}  # token index -> the scalar position it stands for (s or s')
        self.pre, self.post = Section(), Section()
        self.einsums = list(sweep.prologue) + list(sweep.maps) + list(sweep.reductions)
        used = {v for e in self.einsums for v in e.space} | {v for t in sweep.terms for v in t.contracted + t.kept}
        self.features = [v for v in self.order if v in used and v not in TOKENS]
        self.split = self._split_feature()
        self.tokens = TOKENS if sweep.lockstep else (sweep.token,)

    # ------------------------------------------------------------------ axes
    def _axis_name(self, a: str) -> str:  # the tile axes are the ranks' own index variables
        return a

    def block(self, a: str) -> str:
        return "BLOCK_C" if a in TOKENS else f"BLOCK_{a.upper()}"

    def var_axes(self, v: str) -> tuple[str, ...]:
        return () if v in self.plan.grid or v in self.at else (v,)

    def index(self, name: str) -> Val:
        if name in self.at:
            return Val(self.at[name], (), "int")
        return Val(name, self.var_axes(name), "int")

    def _split_feature(self) -> str | None:
        """The feature whose blocks may run in programs of their own: one that no Einsum of the
        sweep reduces and no term contracts, and that every tensor it writes is over (so each
        block writes its own part), the last in tile order (V's)."""
        reduced = {v for e in self.einsums for v in e.reduced}
        reduced |= {v for t in self.s.terms for v in t.contracted}
        written = [set(self.c.einsum(n).lhs_vars) for n in self.s.stores + self.s.states]
        free = [v for v in self.features if v not in reduced and all(v in w for w in written)]
        return free[-1] if free else None

    def valid(self, axes: tuple[str, ...], to: tuple[str, ...] | None = None) -> str | None:
        """Where the positions and features `axes` are inside their extents, over the axes `to`."""
        mask, pax = self.conjunction([(f"{a}_valid", (a,)) for a in axes])
        return None if mask is None else self.align(mask, pax, axes if to is None else to)

    def zeroed(self, code: str, axes: tuple[str, ...], over=None, other: str = "0.0") -> str:
        """`code` (over `axes`) with `other` wherever the axes `over` (default all) are past
        their extents: a select, so an inf or NaN computed there goes nowhere."""
        mask = self.valid(self.canon(axes if over is None else over), axes)
        return code if mask is None else f"tl.where({mask}, {code}, {other})"

    def as_clean(self, v: Val, axes: tuple[str, ...], sec: Section, base: str) -> Val:
        """`v`, zero past the extents of `axes` (named once; unchanged if it is already)."""
        if v.code in self.clean or not set(axes) & set(v.axes):
            return v
        name = self.fresh(base)
        sec.add(f"{name} = {self.zeroed(self.num(v), v.axes, set(axes) & set(v.axes))}")
        self.clean.add(name)
        return Val(name, v.axes, "float")

    # ------------------------------------------------------------------ loads
    def access(self, a: Access, sec: Section) -> Val:
        if a.tensor in self.values:
            got = tuple(i.name for i in a.indices if isinstance(i, Index) and i.name not in self.plan.grid)
            if self.canon(got) != self.axes_of[a.tensor] or self.at:
                raise LoweringError(f"{a.tensor} is read at {', '.join(got)}, not at its own indices")
            return self.values[a.tensor]
        return self.load(a, sec)

    def load(self, a: Access, sec: Section) -> Val:
        """A tile of a tensor in memory; hoisted before the loop when it has no token index.
        Positions past the extent load 0."""
        names = tuple(i.name for i in a.indices)
        key = (a.tensor, names, tuple(sorted((v, self.at[v]) for v in names if v in self.at)))
        if key in self.loaded:
            return self.loaded[key]
        info = self.c.tensors[a.tensor]
        axes = self.canon([x for v in names for x in self.var_axes(v)])
        base = self.base(a.tensor, names)
        offsets, masks = [], []
        for k, v in enumerate(names):
            if v in self.plan.grid:
                continue
            stride = f"stride_{a.tensor}_{k}"
            if v in self.at:
                offsets.append(f"{self.at[v]} * {stride}")
                masks.append(f"({self.at[v]} < {info.ranks[k]})")
            else:
                offsets.append(f"{self.align(v, (v,), axes)} * {stride}")
                masks.append(self.align(f"{v}_valid", (v,), axes))
        target = sec if set(names) & set(TOKENS) else self.pre
        name = a.tensor if not any(k[0] == a.tensor for k in self.loaded) else self.fresh(a.tensor)
        ptr = " + ".join([base] + offsets)
        mask = " & ".join(dict.fromkeys(masks))
        target.add(f"{name} = tl.load({ptr}" + (f", mask={mask}, other=0)" if mask else ")"))
        dtype = info.dtype if a.tensor in self.c.input_names else "fp32"
        kind = "int" if dtype in ("bool", "int8", "int16", "int32", "int64") else \
            "native" if a.tensor in self.c.input_names else "float"  # an fp32 state computes like a local
        val = Val(name, axes, kind)
        self.clean.add(name)
        self.loaded[key] = val
        return val

    def base(self, t: str, names: tuple[str, ...]) -> str:
        """The pointer to this program's slice of `t` (its grid indices applied), before the loop."""
        key = (t, tuple(v if v in self.plan.grid else None for v in names))
        if key not in self.bases:
            name = f"{t}_base" if not any(k[0] == t for k in self.bases) else self.fresh(f"{t}_base")
            parts = [f"{t}_ptr"] + [f"{v} * stride_{t}_{k}" for k, v in enumerate(names) if v in self.plan.grid]
            self.pre.add(f"{name} = {' + '.join(parts)}")
            self.bases[key] = name
        return self.bases[key]

    # ------------------------------------------------------------------ sums
    def sum_term(self, inner: list[Val], outer: list[Val], red_axes: set[str], out_axes: tuple[str, ...],
                 mask: tuple | None, sec: Section) -> tuple[str, tuple[str, ...], list[Val]]:
        """A product summed over `red_axes` (a dot where it is one): factors not known to be zero
        past the extents are zeroed over the reduced axes first, so lanes past the last
        position or feature add nothing (and an inf there meets a select, not a product)."""
        have = {a for v in inner for a in v.axes}
        if red_axes & set(TOKENS) - have:
            raise LoweringError("a sum over positions of a constant; write it as a product with the extent")
        inner = [self.as_clean(v, tuple(red_axes & set(v.axes)), sec, "z") for v in inner]
        return super().sum_term(inner, outer, red_axes, out_axes, None, sec)

    def contract(self, vals: list[Val], red: set[str], out: tuple[str, ...], sec: Section) -> str:
        """The product of `vals` summed over `red`, over the axes `out`."""
        inner = [v for v in vals if set(v.axes) & red]
        outer = [v for v in vals if not set(v.axes) & red]
        code, axes = "1.0", ()
        if inner:
            code, axes, outer = self.sum_term(inner, outer, red, out, None, sec)
        parts = [self.align(code, axes, out)] if inner else []
        parts += [self.align(self.num(v), v.axes, out) for v in outer]
        return " * ".join(parts) or code

    # ------------------------------------------------------------------ Einsums
    def lhs_axes(self, e: Einsum) -> tuple[str, ...]:
        return self.canon([v for v in e.lhs_vars if v not in self.plan.grid])

    def evaluate(self, e: Einsum, sec: Section) -> None:
        """A map (or a prologue Einsum): its tile, zero past the extents."""
        axes = self.axes_of[e.name] = self.lhs_axes(e)
        red = set(e.reduced)
        if red and e.reduce == "sum":
            code = join_terms(self.sum_terms(e, sec, red, None))
        elif red:
            code = self.extreme(e, red, axes, sec)
        else:
            v = self.emit(e.expr, sec)
            code = self.align(self.num(v), v.axes, axes)
            if not v.axes and axes:
                code = self.fill(axes, code)
        self.assign(e.name, code, axes, sec)

    def assign(self, name: str, code: str, axes: tuple[str, ...], sec: Section) -> None:
        sec.add(f"{name} = {self.zeroed(code, axes)}")
        self.values[name] = Val(name, axes, "float")
        self.clean.add(name)

    def extreme(self, e: Einsum, red: set[str], axes: tuple[str, ...], sec: Section) -> str:
        """A max or min over `red`: lanes past the extents hold the identity (-inf or inf)."""
        v = self.emit(e.expr, sec)
        code = self.zeroed(self.num(v), v.axes, red & set(v.axes), _START[e.reduce])
        code, left = self.reduce(e.reduce, code, v.axes, red)
        return self.align(code, left, axes)

    def accumulate(self, e: Einsum, sec: Section) -> None:
        """A state's share of this chunk: a sum (one dot for an [E, F] state), a max or a min."""
        axes = self.axes_of[e.name]
        red = set(e.reduced)
        if e.reduce == "sum":
            sec.add(f"{e.name} = {e.name} + {paren(join_terms(self.sum_terms(e, sec, red, None)))}")
        else:
            sec.add(f"{e.name} = {_COMBINE[e.reduce]}({e.name}, {self.extreme(e, red, axes, sec)})")

    # ------------------------------------------------------------------ causal terms
    def decay(self, t: Term, sec: Section, at: dict[str, str] | None = None) -> Val:
        """c(p, m) with the token indices in `at` bound to scalar positions (s = t_lo, s' = t_hi)."""
        self.at = at or {}
        try:
            return self.emit(t.decay, sec)
        finally:
            self.at = {}

    def term(self, t: Term, state: str, sec: Section) -> str:
        """One causal term of this chunk (code over its own token and the kept feature); then
        the state moves on to the next chunk. A sum over the keys reads its state at the
        chunk's start s = t_lo and carries it to the next one's, t_hi; a sum over the queries
        (reverse) reads it at the chunk's last position and carries it to the previous chunk's."""
        own, oth = t.own, t.other
        pm, value = self.canon(TOKENS), self.canon((own, *t.kept))
        state_axes = self.canon(t.contracted + t.kept)
        sec.add(f"# {t.describe()}")
        q = self.as_clean(self.emit(t.query, sec), self.canon((own, *t.contracted)), sec, "q")
        k = self.as_clean(self.emit(t.summed_e, sec), self.canon((oth, *t.contracted)), sec, "k")
        v = None if t.key_f is None else self.as_clean(self.emit(t.summed_f, sec), self.canon((oth, *t.kept)), sec, "v")
        h = Val(state, state_axes, "float")
        score = self.contract([q, k], set(t.contracted), pm, sec)
        if not is_simple(score):
            sec.add(f"qk_{self.counter} = {score}")
            score = f"qk_{self.counter}"
        causal = "(m[None, :] <= p[:, None]) & p_valid[:, None] & m_valid[None, :]"
        if t.decay is None:
            weighted = score
        else:
            d = self.decay(t, sec)
            weighted = f"{score} * {paren(self.align(self.num(d), d.axes, pm))}"
        sec.add(f"{score} = tl.where({causal}, {weighted}, 0.0)  # m <= p inside the chunk")
        self.clean.add(score)
        s_val = Val(score, pm, "float")
        if own == QUERY:
            read, carry, across = {KEY: "t_lo"}, {QUERY: "t_hi"}, {QUERY: "t_hi", KEY: "t_lo"}
        else:
            read, carry, across = {QUERY: "t_last"}, {KEY: "t_prev"}, {QUERY: "t_last", KEY: "t_prev"}
        q_s, k_s = q, k
        if t.decay is not None:  # ratios to the boundary the state is read at, and carried to
            q_s = self.scaled(q, self.decay(t, sec, read), sec, "q")
            k_s = self.scaled(k, self.decay(t, sec, carry), sec, "k")
        intra = self.contract([s_val] + ([v] if v is not None else []), {oth}, value, sec)
        inter = self.contract([q_s, h], set(t.contracted), value, sec)
        out = self.fresh(t.einsum.lower())
        sec.add(f"{out} = {intra} + {inter}")
        update = self.contract([k_s] + ([v] if v is not None else []), {oth}, state_axes, sec)
        if t.decay is None:
            sec.add(f"{state} = {state} + {update}")
        else:  # after the last chunk the boundary is outside the sequence: the state is not read again
            ratio = self.decay(t, sec, across)
            sec.add(f"{state} = {state} * {self.num(ratio)} + {update}")
        return out

    def scaled(self, x: Val, ratio: Val, sec: Section, base: str) -> Val:
        """`x` times a decay ratio over one token, the ratio 0 past the last position."""
        name, axes = self.fresh(base), self.canon(x.axes + ratio.axes)
        r = paren(self.zeroed(self.num(ratio), ratio.axes))
        sec.add(f"{name} = {self.align(self.num(x), x.axes, axes)} * {self.align(r, ratio.axes, axes)}")
        self.clean.add(name)
        return Val(name, axes, "float")

    # ------------------------------------------------------------------ the kernel
    def generate(self) -> str:
        s = self.s
        self.program_ids()
        for e in s.prologue:
            self.evaluate(e, self.pre)
        for e in s.reductions:
            axes = self.axes_of[e.name] = self.lhs_axes(e)
            start = _START[e.reduce]
            self.pre.add(f"{e.name} = {self.fill(axes, start) if axes else start}")
        states = self.term_states()
        loop = Section(indent=2)
        self.chunk_positions(loop)
        for e in s.maps:
            if e.name in states:
                codes = [("-" if t.sign < 0 else "+", self.term(t, st, loop)) for t, st in states[e.name]]
                first = states[e.name][0][0]
                self.axes_of[e.name] = self.canon((first.own, *first.kept))
                self.assign(e.name, join_terms(codes), self.axes_of[e.name], loop)
            else:
                self.evaluate(e, loop)
        for e in s.reductions:
            self.accumulate(e, loop)
        for name in s.stores:
            self.store(name, self.values[name], loop)
        for e in s.reductions:
            self.store(e.name, Val(e.name, self.axes_of[e.name], "float"), self.post)
        head = Section()
        if s.reverse:  # every position of either rank, the last chunk first
            head.add("n_chunks = tl.cdiv(tl.maximum(P, M), BLOCK_C)")
            head.add("for t_back in range(0, n_chunks):")
        else:
            head.add(f"for t_lo in range(0, {rank_of(s.token)}, BLOCK_C):")
        return self.render(self.pre.lines + head.lines + loop.lines + self.post.lines)

    def term_states(self) -> dict[str, list[tuple[Term, str]]]:
        """Each term with the name of its state, initialized to 0 before the loop."""
        out: dict[str, list[tuple[Term, str]]] = {}
        for t in self.s.terms:
            out.setdefault(t.einsum, []).append(t)
        named = {}
        for einsum, terms in out.items():
            named[einsum] = []
            for i, t in enumerate(terms):
                state = f"{einsum}_state" + (str(i + 1) if len(terms) > 1 else "")
                axes = self.canon(t.contracted + t.kept)
                self.pre.add(f"{state} = {self.fill(axes, '0.0') if axes else '0.0'}")
                self.clean.add(state)  # sums of clean keys and values: 0 past the extents too
                named[einsum].append((t, state))
        return named

    def program_ids(self) -> None:
        """This program's grid point and, with a split feature, its block of that feature."""
        pre, grid = self.pre, self.plan.grid
        pre.add("# grid ranks as int64: their offsets reach past 2**31 on large batches")
        pre.add("pid_g = tl.program_id(0).to(tl.int64)")
        rest = "pid_g"
        for v in reversed(grid):
            if v == grid[0]:
                pre.add(f"{v} = {rest}")
            else:
                pre.add(f"{v} = {rest} % {rank_of(v)}")
                rest = f"({rest} // {rank_of(v)})"
        for f in self.features:
            blk = self.block(f)
            if f == self.split:
                pre.add(f"pid_{f} = tl.program_id(1)  # this program's block of {f}")
                pre.add(f"{f} = pid_{f} * {blk} + tl.arange(0, {blk})")
            else:
                pre.add(f"{f} = tl.arange(0, {blk})")
            pre.add(f"{f}_valid = _below({f}, {rank_of(f)}, {blk})")
        pre.add("r_c = tl.arange(0, BLOCK_C)")

    def chunk_positions(self, loop: Section) -> None:
        first = self.tokens[0]
        if self.s.reverse:
            loop.add("t_lo = (n_chunks - 1 - t_back) * BLOCK_C")
            loop.add("t_last = tl.minimum(t_lo + BLOCK_C, tl.maximum(P, M)) - 1  # where the state is read")
            loop.add("t_prev = t_lo - 1  # the previous chunk's last position, where it is carried to")
        elif self.s.lockstep:
            loop.add("t_hi = t_lo + BLOCK_C  # the next chunk's start")
        for v in self.tokens:  # lockstep: the keys at the same positions, none past M
            loop.add(f"{v} = t_lo + r_c" if v == first else f"{v} = {first}  # the keys of the same positions")
            loop.add(f"{v}_valid = {v} < {rank_of(v)}")

    def store(self, name: str, val: Val, sec: Section) -> None:
        """A tile of an output or a state, inside the extents."""
        names = tuple(i.name for i in self.c.einsum(name).target.indices)
        offsets = [f"{self.align(v, (v,), val.axes)} * stride_{name}_{k}" for k, v in enumerate(names)
                   if v not in self.plan.grid]
        ptr = " + ".join([self.base(name, names)] + offsets)
        mask = self.valid(val.axes)
        sec.add(f"tl.store({ptr}, ({val.code}).to({name}_ptr.dtype.element_ty)" +
                (f", mask={mask})" if mask else ")"))

    def tensors(self) -> list[str]:
        return list(dict.fromkeys(self.s.loads + self.s.stores + self.s.states))

    def arg_names(self) -> list[tuple[str, str]]:
        """Kernel arguments as (name, kind): ptr, stride, dim, param, param_int, constexpr."""
        c = self.c
        feats = {rank_of(f) for f in self.plan.features}
        args = [(f"{t}_ptr", "ptr") for t in self.tensors()]
        for t in self.tensors():
            args += [(f"stride_{t}_{k}", "stride") for k in range(len(c.tensors[t].ranks))]
        args += [(d, "dim") for d in c.dims if d not in feats]
        args += [(p.name, "param_int" if p.type == "int" else "param") for p in c.params]
        args += [(d, "constexpr") for d in c.dims if d in feats]
        args += [("BLOCK_C", "constexpr")] + [(self.block(f), "constexpr") for f in self.features]
        return args

    def render(self, lines: list[str], doc: str | None = None) -> str:
        s = self.s
        args = self.arg_names()
        sig = [f"{n}: tl.constexpr" if k == "constexpr" else n for n, k in args]
        # extents and int params are run-time values: no recompile when a length's divisibility changes
        runtime = [n for n, k in args if k in ("dim", "param_int")]
        out = [f"@triton.jit(do_not_specialize={runtime!r})", f"def {self.name}("]
        for k in range(0, len(sig), 6):
            out.append("    " + ", ".join(sig[k:k + 6]) + ",")
        out.append("):")
        kind = ("a reverse causal scan (sums over the queries), the last chunk first" if s.reverse else
                "a causal scan, query and key chunks in lockstep") if s.lockstep else f"over the chunks of {s.token}"
        split = f" x blocks of {self.split}" if self.split else ""
        out.append(f'    """Sweep {s.index}: {kind}; one program per {",".join(self.plan.grid) or "-"}{split}.')
        out.append(f"    Writes {', '.join(s.stores + s.states)}; reads {', '.join(s.loads)}.\"\"\"")
        return "\n".join(out + lines) + "\n"

    # ------------------------------------------------------------------ launch
    def blocks(self, extents: dict, config: ScanConfig) -> dict:
        """The constexpr blocks: BLOCK_C, each feature padded to a power of two >= 16, the split
        feature in blocks of the config's feature block."""
        out = {"BLOCK_C": config.chunk}
        for f in self.features:
            out[self.block(f)] = max(16, next_pow2(extents[rank_of(f)]))
        if self.split is not None and config.feature_block is not None:
            out[self.block(self.split)] = min(out[self.block(self.split)], max(16, config.feature_block))
        return out

    def grid(self, extents: dict, blocks: dict) -> tuple[int, int]:
        programs = math.prod(extents[rank_of(v)] for v in self.plan.grid)
        if self.split is None:
            return (max(programs, 1), 1)
        return (max(programs, 1), -(-extents[rank_of(self.split)] // blocks[self.block(self.split)]))


def emit_plan(plan: ScanPlan, cascade_text: str) -> tuple[str, list[SweepKernel]]:
    """The module: header comment with the cascade and plan, one kernel per sweep, helpers."""
    head = module_header(plan, cascade_text, "Generated by einsum-ir (codegen/scan_triton.py): the chunked scan",
                         ["import triton", "import triton.language as tl", ""])
    emitters = [SweepKernel(plan, s, f"sweep{s.index}_kernel") for s in plan.sweeps]
    kernels = ["\n" + em.generate() for em in emitters]
    called = called_helpers("".join(kernels))
    return "\n".join([head, HELPERS] + (["\n" + called] if called else []) + kernels), emitters


class ScanTritonKernel(DerivedKernels):
    """The chunked scan in Triton: `kern(**tensors_and_params)`, like `ei.interpret`; CUDA
    tensors compile, CPU tensors run in Triton's interpreter. `chunk` and `split_block` force
    BLOCK_C and the split feature's block (the tests use small ones)."""

    backend = "triton"
    config_class = ScanConfig

    def __init__(self, cascade: Cascade, plan: ScanPlan, spelled, fp32: frozenset = frozenset(),
                 chunk: int | None = None, split_block: int | None = None):
        # one kernel per independent group of a lockstep sweep's terms: one state each
        plan = replace(plan, sweeps=plan.split_sweeps or plan.sweeps)
        self.cascade, self.plan, self.spelled = cascade, plan, spelled
        self.fp32 = frozenset(fp32)
        self.fp32_spelled = spelled.set(self.fp32)
        self.chunk, self.split_block = chunk, split_block
        self._source, self.emitters = emit_plan(plan, str(spelled.cascade))
        self.configs: dict[tuple, ScanConfig] = {}  # (features' extents, dtype, target) -> the choice

    def source(self, shapes: dict | None = None, device: str = "h100") -> str:
        if not shapes:
            return self._source
        ext = self._extents(shapes)
        config = self.config_for(shapes, "bf16", "sm_90")
        notes = [f"# config for {shapes} on sm_90: {config}"]
        for em in self.emitters:
            blocks = em.blocks(ext, config)
            notes.append(f"#   {em.name}: {blocks} grid {em.grid(ext, blocks)}")
        return "\n".join(notes) + "\n" + self._source

    def forced(self, config: ScanConfig) -> ScanConfig:
        """`config` with the chunk and feature block this kernel was told to use, if any."""
        return replace(config, chunk=self.chunk or config.chunk,
                       feature_block=self.split_block or config.feature_block)

    def config_for(self, shapes: dict, dtype: str, target: str | None) -> ScanConfig:
        """The launch config at `shapes` (the cascade's dims): on the interpreter (`target` None)
        one chunk of `chunk_size` and whole features; for a GPU target the first of CANDIDATES
        with no spills, compiled ahead of time (cached on disk), remembered per feature extents."""
        ext = self._extents(shapes)
        if target is None:
            return self.forced(ScanConfig(chunk_size(ext, "cpu"), None, 4))
        key = (tuple(sorted((f, ext[rank_of(f)]) for f in self.plan.features)), dtype, target)
        if key not in self.configs:
            from einsum_ir.codegen.aot import resource_usage_batch

            candidates = list(dict.fromkeys(map(self.forced, CANDIDATES)))  # one batch: one compile process
            usages = resource_usage_batch([(self, shapes, dtype, target, c) for c in candidates])
            self.configs[key] = next((c for c, u in zip(candidates, usages) if _spill_free(u)), candidates[-1])
        return self.configs[key]

    def launch_config(self, shapes: dict, dtype: str, target: str) -> ScanConfig:
        """The config an ahead-of-time compile uses when none is given: the chosen one."""
        return self.config_for(shapes, dtype, target)

    def launch_summary(self, shapes: dict, device: str = "h100", aot: bool = True) -> str:
        """The config chosen for `shapes` on an sm_90 device (`aot`: by compiling the candidates)."""
        return str(self.config_for(shapes, "bf16", "sm_90") if aot else self.forced(CANDIDATES[0]))

    def _extents(self, shapes: dict) -> dict:
        return self.spelled.args({r: int(v) for r, v in shapes.items()})

    def __call__(self, **args):
        from einsum_ir.codegen.autograd import record, wants_grad

        if wants_grad(args):
            return record(self, self.training, self.run, args)
        return self.run(args)

    def same_backend(self, cascade: Cascade, fp32: frozenset = frozenset()):
        from einsum_ir.codegen.kernel import compile_triton

        kern = compile_triton(cascade, fp32)
        if isinstance(kern, ScanTritonKernel):  # the backward's scan, with this one's forced blocks
            kern.chunk, kern.split_block = kern.chunk or self.chunk, kern.split_block or self.split_block
        return kern

    def run(self, args: dict):
        from einsum_ir.codegen.dispatch import DTYPE_NAMES, device_kind
        from einsum_ir.codegen.kernel import generated_module
        from einsum_ir.codegen.modules import interpret_env

        bound = bind_arguments(self.cascade, dict(args), self.fp32)
        tensors, extents, params = (self.spelled.args(x) for x in bound)
        if 0 in extents.values():
            return interpreted(self.cascade, args, self.fp32)
        tensors = {n: t.to(torch.int8) if t.dtype == torch.bool else t for n, t in tensors.items()}
        device = next(iter(tensors.values())).device
        interpret = device.type == "cpu"
        module = generated_module(self._source, device)
        floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
        out_dtype = floats[0] if floats else torch.float32
        c = self.plan.cascade
        buffers = dict(tensors)
        for name in list(c.output_names) + list(self.plan.intermediates):
            held = name in self.fp32_spelled or name not in c.output_names
            buffers[name] = torch.empty([extents[r] for r in c.tensors[name].ranks],
                                        dtype=torch.float32 if held else out_dtype, device=device)
        target = None if interpret else "sm_" + device_kind(device).split(":")[1]
        config = self.config_for(bound[1], DTYPE_NAMES.get(out_dtype, "fp32"), target)
        for em in self.emitters:
            blocks = em.blocks(extents, config)
            kargs, kw = launch_arguments(em, buffers, extents, params, blocks)
            fn = getattr(module, em.name)
            if interpret:
                with interpret_env():
                    fn[em.grid(extents, blocks)](*kargs, **kw)
            else:
                fn[em.grid(extents, blocks)](*kargs, **kw, num_warps=config.num_warps,
                                             num_stages=config.num_stages)
        run_epilogue(self.plan.epilogue, buffers, params)
        return collect_outputs(c, buffers, out_dtype, self.fp32_spelled)

    # -- ahead of time (codegen/aot.py)
    def specializations(self, shapes: dict, dtype: str, config: ScanConfig | None = None) -> list[dict]:
        return [self.specialization(i, shapes, dtype, config) for i in range(len(self.emitters))]

    def specialization(self, index: int, shapes: dict, dtype: str, config: ScanConfig | None = None) -> dict:
        """What the JIT specializes sweep `index`'s kernel on, as plain data (as aot.specialization);
        the first candidate config unless one is given."""
        from einsum_ir.codegen.aot import DTYPE_SIG, INT_SIG

        em, c = self.emitters[index], self.plan.cascade
        ext = self._extents(shapes)
        config = config or self.forced(CANDIDATES[0])
        blocks = em.blocks(ext, config)
        sig, constexprs, divisible = {}, {}, []
        for pos, (n, k) in enumerate(em.arg_names()):
            if k == "ptr":
                t = n[:-4]
                decl = c.tensors[t].dtype if t in c.input_names else None
                if t in c.input_names and t not in self.fp32_spelled:
                    sig[n] = "*" + (INT_SIG.get(decl) or DTYPE_SIG[dtype])
                elif t in c.output_names and t not in self.fp32_spelled:
                    sig[n] = "*" + DTYPE_SIG[dtype]
                else:
                    sig[n] = "*fp32"
                divisible.append(pos)
            elif k == "stride":
                t, dim = n[len("stride_"):].rsplit("_", 1)
                if int(dim) == len(c.tensors[t].ranks) - 1:
                    sig[n], constexprs[n] = "constexpr", 1
                else:
                    sig[n] = "i32"
                    divisible.append(pos)
            elif k in ("dim", "param_int"):
                sig[n] = "i32"
            elif k == "param":
                sig[n] = "fp32"
            else:
                sig[n], constexprs[n] = "constexpr", ext[n] if n in ext else blocks[n]
        return {"name": em.name, "signature": sig, "constexprs": constexprs, "divisible": divisible,
                "options": {"num_warps": config.num_warps, "num_stages": config.num_stages,
                            "enable_fp_fusion": True}}

    def compile_sweep(self, index: int, shapes: dict, dtype: str, target: str, config: ScanConfig | None = None):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from einsum_ir.codegen.aot import _compiled_module

        spec = self.specialization(index, shapes, dtype, config)
        fn = getattr(_compiled_module(self._source), spec["name"])
        attrs = {(pos,): [["tt.divisibility", 16]] for pos in spec["divisible"]}
        src = ASTSource(fn, spec["signature"], spec["constexprs"], attrs)
        return triton.compile(src, target=GPUTarget("cuda", int(target.replace("sm_", "")), 32),
                              options=spec["options"])

    def compiled_usage(self, shapes: dict, dtype: str, target: str, config=None) -> dict:
        """Registers, spills and shared memory of every sweep, compiled here for `target`."""
        from einsum_ir.codegen.aot import kernel_usage, worst_usage

        return worst_usage([kernel_usage(self.compile_sweep(i, shapes, dtype, target, config))
                            for i in range(len(self.emitters))])

    def compiled_asm(self, shapes: dict, dtype: str, target: str, config=None) -> list[dict]:
        out = []
        for i, em in enumerate(self.emitters):
            ck = self.compile_sweep(i, shapes, dtype, target, config)
            out.append({"name": em.name, "ttgir": ck.asm["ttgir"], "ptx": ck.asm["ptx"]})
        return out

    def resource_usage(self, shapes: dict, dtype: str = "bf16", target: str = "sm_90",
                       config: ScanConfig | None = None) -> dict:
        """{"registers", "spills", "shared_bytes", "wgmma", "stages"} (worst over sweeps), compiled
        ahead of time for `target` with no GPU (cached; codegen/aot.py), at the chosen config
        unless one is given."""
        from einsum_ir.codegen.aot import resource_usage

        return resource_usage(self, shapes, dtype, target, config)

    def asm(self, shapes: dict, dtype: str = "bf16", target: str = "sm_90",
            config: ScanConfig | None = None) -> list[dict]:
        from einsum_ir.codegen.aot import asm

        return asm(self, shapes, dtype, target, config)


def _spill_free(usage: dict) -> bool:
    """No local memory: neither LOCAL nor a STACK frame (where ptxas puts spilled registers)."""
    return usage.get("spills", 1) == 0 and usage.get("stack", 1) == 0


def launch_arguments(em: SweepKernel, buffers: dict, extents: dict, params: dict, blocks: dict):
    """The positional arguments and constexprs of one sweep's launch, in `arg_names` order."""
    kargs, kw = [], {}
    for n, k in em.arg_names():
        if k == "ptr":
            kargs.append(buffers[n[:-4]])
        elif k == "stride":
            t, pos = n[len("stride_"):].rsplit("_", 1)
            kargs.append(buffers[t].stride(int(pos)))
        elif k == "dim":
            kargs.append(extents[n])
        elif k in ("param", "param_int"):
            kargs.append(params[n])
        else:
            kw[n] = extents[n] if n in extents else blocks[n]
    return kargs, kw
