"""The CPU emitter of the chunked scan: a ScanPlan (lowering/chunked_scan.py) -> PyTorch code.

One Python function per sweep, over every grid point at once (B, H as leading dims):

    for each chunk [t_lo, hi_p) of the swept positions (keys [t_lo, hi_m) beside it):
        maps          per-token Einsums of this chunk (feature maps, normalizations)
        reductions    each state += (or max=) the chunk's share
        causal terms  intra = tril(q k^T * c(p, m)) v      the chunk against itself
                      inter = (q * c(p, s)) H               every earlier chunk, via the state
                      H = c(s', s) H + (k * c(s', m))^T v   the state at the next chunk's start
        stores        the chunk's rows of each output

Every decay ratio has its later position first, so it is at most 1 (DESIGN section 5). Values
are torch tensors whose dims are their axes in one canonical order (grid, p, m, features), so
broadcasting is only unsqueezing; products summed over an axis are `torch.einsum`. States and
sums are held in fp32 (fp64 for fp64 inputs). The largest temporary is one chunk's C x C
scores per grid point: memory is O(N).
"""
from __future__ import annotations

import string

import torch

from einsum_ir.codegen.block_emit import join_terms, module_header, paren
from einsum_ir.codegen.cpu_emit import GeneratedPython, compile_cpu
from einsum_ir.codegen.outputs import collect_outputs, interpreted, run_epilogue
from einsum_ir.errors import LoweringError
from einsum_ir.functions import FUNCTIONS
from einsum_ir.ir import Access, Binary, Call, Cascade, Einsum, Expr, Index, Name, Num, Unary, product_terms, rank_of
from einsum_ir.lowering.chunked_scan import KEY, QUERY, ScanPlan, Sweep, Term, chunk_size
from einsum_ir.printer import print_expr

_ARITH = ("+", "-", "*", "/")
_COMPARE = ("<", "<=", ">", ">=", "==", "!=")
_REDUCE = {"sum": "sum", "max": "amax", "min": "amin"}
_COMBINE = {"max": "torch.maximum", "min": "torch.minimum"}
_START = {"sum": "0.0", "max": "-math.inf", "min": "math.inf"}

# How a token index is bound while a value is printed: over the chunk (`slice`), or at one
# position (`at`: the chunk's start s or the next chunk's start s').
SLICE = "slice"


class SweepEmitter:
    """One sweep of a scan plan -> one Python function over torch tensors."""

    def __init__(self, plan: ScanPlan, sweep: Sweep, name: str):
        self.plan, self.s, self.name = plan, sweep, name
        self.c = plan.cascade
        self.order = list(plan.grid) + [QUERY, KEY] + list(plan.features)
        self.letters = dict(zip(self.order, _letters(self.order)))
        self.lines: list[str] = []
        self.local: dict[str, tuple[str, ...]] = {}  # value computed in this function -> its axes

    # -------------------------------------------------------------- axes
    def canon(self, axes) -> tuple[str, ...]:
        axes = set(axes)
        return tuple(a for a in self.order if a in axes)

    def align(self, code: str, frm: tuple[str, ...], to: tuple[str, ...]) -> str:
        if frm == to or not frm:
            return code
        idx = [":" if a in frm else "None" for a in to]
        while idx and idx[-1] == ":":
            idx.pop()
        while idx and idx[0] == "None":
            idx.pop(0)
        return f"{paren(code)}[{', '.join(idx)}]" if idx else code

    # -------------------------------------------------------------- values
    def access(self, a: Access, env: dict) -> tuple[str, tuple[str, ...]]:
        """A tensor read under the token binding `env`: the chunk's slice, or one position."""
        if a.tensor in self.local:
            axes = self.local[a.tensor]
            got = [i.name for i in a.indices]
            # a value computed over the whole grid is the same along grid ranks its reads omit
            if not set(got) <= set(axes) or set(axes) - set(got) - set(self.plan.grid):
                raise LoweringError(f"{a.tensor} is read at {', '.join(got)}, not at its own indices")
            return f"x_{a.tensor}", axes
        subs, kept = [], []
        for i in a.indices:
            v = i.name
            bound = env.get(v)
            if bound is None:
                subs.append(":")
                kept.append(v)
            elif bound[0] == SLICE:
                subs.append(f"{bound[1]}:{bound[2]}")
                kept.append(v)
            else:
                subs.append(bound[1])
        code = a.tensor
        if any(s != ":" for s in subs):
            code = f"{code}[{', '.join(subs)}]"
        want = self.canon(kept)
        if tuple(kept) != want:
            perm = [kept.index(v) for v in want]
            code = f"{code}.permute({', '.join(map(str, perm))})"
        if self.c.tensors[a.tensor].role == "input":
            code = f"{code}.to(DT)"
        return code, want

    def value(self, e: Expr, env: dict) -> tuple[str, tuple[str, ...]]:
        if isinstance(e, Num):
            return repr(float(e.value)), ()
        if isinstance(e, Name):
            return e.name, ()
        if isinstance(e, Index):
            bound = env.get(e.name)
            if bound is None:
                return f"torch.arange({rank_of(e.name)}, dtype=DT)", (e.name,)
            if bound[0] == SLICE:
                return f"torch.arange({bound[1]}, {bound[2]}, dtype=DT)", (e.name,)
            return f"float({bound[1]})", ()
        if isinstance(e, Access):
            return self.access(e, env)
        if isinstance(e, Unary):
            code, axes = self.value(e.operand, env)
            if e.op == "-":
                return f"(-{paren(code)})", axes
            return f"(~{paren(code)})", axes
        if isinstance(e, Binary):
            (a, ax), (b, bx) = self.value(e.lhs, env), self.value(e.rhs, env)
            axes = self.canon(ax + bx)
            a, b = self.align(a, ax, axes), self.align(b, bx, axes)
            if e.op in _ARITH or e.op in _COMPARE:
                return f"({a} {e.op} {b})", axes
            if e.op in ("and", "or"):
                return f"({a} {'&' if e.op == 'and' else '|'} {b})", axes
            raise LoweringError(f"the scan does not evaluate {e.op!r} on values")
        assert isinstance(e, Call)
        args = [self.value(x, env) for x in e.args]
        axes = self.canon(tuple(v for _, ax in args for v in ax))
        codes = []
        for code, ax in args:
            code = self.align(code, ax, axes)
            codes.append(code if ax else f"torch.as_tensor({code}, dtype=DT)")
        if e.fn == "where":
            return f"torch.where({codes[0]}, {codes[1]}, {codes[2]})", axes
        return FUNCTIONS[e.fn].torch.format(*codes), axes

    def summed(self, e: Expr, reduced: tuple[str, ...], env: dict, out: tuple[str, ...]) -> str:
        """`sum over reduced of e` with axes `out`: each product term one torch.einsum."""
        pieces = []
        for sign, factors in product_terms(e):
            ops, subs, scalar = [], [], []
            for recip, f in factors:
                code, axes = self.value(f, env)
                if recip:
                    code = f"(1.0 / {paren(code)})"
                if not axes:
                    scalar.append(code)
                    continue
                ops.append(code)
                subs.append("".join(self.letters[a] for a in axes))
            if not ops:
                raise LoweringError("a sum over positions of a constant; write it as a product with the extent")
            have = tuple(a for a in out if any(self.letters[a] in sub for sub in subs))
            eq = f"{','.join(subs)}->{''.join(self.letters[a] for a in have)}"
            code = " * ".join([f"torch.einsum('{eq}', {', '.join(ops)})"] + scalar)
            # the same along the grid ranks no factor reads (a key range's count of keys)
            pieces.append(("-" if sign < 0 else "+", code if have == out else self.spread(code, have, out)))
        return join_terms(pieces)

    # -------------------------------------------------------------- statements
    def emit(self, line: str, depth: int = 2) -> None:
        self.lines.append("    " * depth + line)

    def evaluate(self, e: Einsum, env: dict, depth: int) -> None:
        """A map's value for the chunk (or a prologue Einsum's), as a local named after it."""
        out = self.canon(e.lhs_vars)
        if e.reduced and e.reduce == "sum":
            code = self.summed(e.expr, tuple(e.reduced), env, out)
        else:
            code, axes = self.value(e.expr, env)
            if e.reduced:
                dims = tuple(axes.index(v) for v in e.reduced)
                code = f"{paren(code)}.{_REDUCE[e.reduce]}(dim={dims})"
            elif axes != out:
                code = self.spread(code, axes, out)
        self.emit(f"x_{e.name} = {code}", depth)
        self.local[e.name] = out

    def spread(self, code: str, axes: tuple[str, ...], want: tuple[str, ...]) -> str:
        """A value over `axes` as a tensor over all of `want` (a constant becomes a filled one)."""
        shape = ", ".join(self.extent(a) for a in want)
        if not axes:
            return f"torch.full(({shape},), {code}, dtype=DT)"
        return f"{paren(self.align(code, axes, want))}.expand({shape})"

    def extent(self, v: str) -> str:
        return f"n_{v}" if v in (QUERY, KEY) else rank_of(v)

    def term(self, t: Term, i: int) -> str:
        """The lines of one causal term for the chunk; returns the name of its unsigned value
        (axes grid, own, kept). A sum over the keys carries its state forward from each chunk's
        first position; a sum over the queries (reverse) carries it back from each chunk's last."""
        L = self.letters
        g = "".join(L[v] for v in self.plan.grid)
        e, f = "".join(L[v] for v in t.contracted), "".join(L[v] for v in t.kept)
        ef = "".join(L[v] for v in self.canon(t.contracted + t.kept))  # the state's own order
        own, oth = t.own, t.other
        chunk = {QUERY: (SLICE, "t_lo", "hi_p"), KEY: (SLICE, "t_lo", "hi_m")}
        q, qax = self.value(t.query, {own: chunk[own]})
        ke, kax = self.value(t.summed_e, {oth: chunk[oth]})
        qax_want = self.canon((*self.plan.grid, own, *t.contracted))
        kax_want = self.canon((*self.plan.grid, oth, *t.contracted))
        q, ke = self.spread(q, qax, qax_want), self.spread(ke, kax, kax_want)
        pm = self.canon((*self.plan.grid, QUERY, KEY))
        state = f"st_{t.einsum}_{i}"
        # the boundaries the decays are taken against: where the state is read, and where it
        # is carried to for the next chunk (forward: this chunk's start and the next's; reverse:
        # this chunk's last position and the previous chunk's)
        if t.own == QUERY:
            read, carry, across = {KEY: ("at", "t_lo")}, {QUERY: ("at", "hi_p")}, \
                {QUERY: ("at", "hi_p"), KEY: ("at", "t_lo")}
            more = "hi_p < N_tok"
        else:
            read, carry, across = {QUERY: ("at", "t_hi - 1")}, {KEY: ("at", "t_lo - 1")}, \
                {QUERY: ("at", "t_hi - 1"), KEY: ("at", "t_lo - 1")}
            more = "t_lo > 0"
        # terms with one query side, key side and decay (a normalized form's numerator and
        # denominator) share the chunk's scores
        shared = (own, print_expr(t.query), print_expr(t.summed_e), t.contracted,
                  None if t.decay is None else print_expr(t.decay))
        j = self.scores.setdefault(shared, i)
        if j == i:
            self.emit(f"q_{i} = {q}")
            self.emit(f"k_{i} = {ke}")
            self.emit(f"a_{i} = torch.einsum('{g}{own}{e},{g}{oth}{e}->{g}pm', q_{i}, k_{i})")
            if t.decay is not None:
                within, wax = self.value(t.decay, chunk)
                at_read, sax = self.value(t.decay, {own: chunk[own], **read})
                self.emit(f"a_{i} *= {self.align(within, wax, pm)}")
                self.emit(f"q_{i} = q_{i} * {self.align(at_read, sax, qax_want)}")
            self.emit(f"a_{i}.tril_()  # m <= p inside the chunk")
        key = f"kc_{j}" if t.decay is not None else f"k_{j}"  # the key side carried to the next boundary
        if t.key_f is not None:
            kf, fax = self.value(t.summed_f, {oth: chunk[oth]})
            fax_want = self.canon((*self.plan.grid, oth, *t.kept))
            kf = self.spread(kf, fax, fax_want)
            self.emit(f"v_{i} = {kf}")
            self.emit(f"value_{i} = torch.einsum('{g}pm,{g}{oth}{f}->{g}{own}{f}', a_{j}, v_{i}) + "
                      f"torch.einsum('{g}{own}{e},{g}{ef}->{g}{own}{f}', q_{j}, {state})")
            update = f"torch.einsum('{g}{oth}{e},{g}{oth}{f}->{g}{ef}', {key}, v_{i})"
        else:
            self.emit(f"value_{i} = a_{j}.sum({-1 if oth == KEY else -2}) + "
                      f"torch.einsum('{g}{own}{e},{g}{e}->{g}{own}', q_{j}, {state})")
            update = f"{key}.sum({len(self.plan.grid)})"
        self.emit(f"if {more}:  # the state at the next chunk's boundary")
        if t.decay is not None:
            if j == i:
                to_next, nax = self.value(t.decay, {oth: chunk[oth], **carry})
                self.emit(f"    kc_{i} = k_{i} * {self.align(to_next, nax, kax_want)}")
            across_code, cax = self.value(t.decay, across)
            st_axes = self.canon((*self.plan.grid, *t.contracted, *t.kept))
            self.emit(f"    {state} = {state} * {self.align(across_code, cax, st_axes)} + {update}")
        else:
            self.emit(f"    {state} = {state} + {update}")
        return f"value_{i}"

    def generate(self) -> str:
        s, c = self.s, self.c
        tensors = list(dict.fromkeys(s.loads + s.stores + s.states))
        scalars = list(c.dims) + [p.name for p in c.params]
        head = f"def {self.name}({', '.join(tensors)}, *, {', '.join(scalars)}, CHUNK, DT):"
        kind = ("reverse causal scan, p and m in lockstep, last chunk first" if s.reverse else
                "causal scan, p and m in lockstep") if s.lockstep else "over " + s.token
        doc = f'    """Sweep {s.index} ({kind}).' + '"""'
        self.lines = [head, doc]
        self.scores: dict[tuple, int] = {}
        tok = s.token
        # a reverse scan runs over every position of either rank: queries past M still add to
        # the keys' sums, keys past P get none
        self.emit(f"N_tok = {'max(P, M)' if s.reverse else rank_of(tok)}", 1)
        for e in s.prologue:
            self.evaluate(e, {}, 1)
        for r in s.reductions:
            self.emit(f"acc_{r.name} = torch.full({_shape(self.canon(r.lhs_vars))}, {_START[r.reduce]}, dtype=DT)", 1)
        for i, t in enumerate(s.terms):
            axes = self.canon((*self.plan.grid, *t.contracted, *t.kept))
            self.emit(f"st_{t.einsum}_{i} = torch.zeros({_shape(axes)}, dtype=DT)", 1)
        if s.reverse:  # the last chunk first; each rank's positions clipped to its extent
            self.emit("for t_lo in reversed(range(0, N_tok, CHUNK)):", 1)
            self.emit("t_hi = min(t_lo + CHUNK, N_tok)")
            for v in (QUERY, KEY):
                self.emit(f"hi_{v} = max(min(t_hi, {rank_of(v)}), t_lo)")
                self.emit(f"n_{v} = hi_{v} - t_lo")
        else:
            self.emit("for t_lo in range(0, N_tok, CHUNK):", 1)
            self.emit(f"hi_{tok} = min(t_lo + CHUNK, N_tok)")
            self.emit(f"n_{tok} = hi_{tok} - t_lo")
        if s.lockstep and not s.reverse:  # the keys of the same positions: none past M, none needed past P
            self.emit("hi_m = max(min(t_lo + CHUNK, M), t_lo)")
            self.emit("n_m = hi_m - t_lo")
        env = {QUERY: (SLICE, "t_lo", "hi_p"), KEY: (SLICE, "t_lo", "hi_m")} if s.lockstep else \
            {tok: (SLICE, "t_lo", f"hi_{tok}")}
        by_term: dict[str, list[tuple[int, Term]]] = {}
        for i, t in enumerate(s.terms):
            by_term.setdefault(t.einsum, []).append((i, t))
        for e in s.maps:
            if e.name in by_term:
                values = [("-" if t.sign < 0 else "+", self.term(t, i)) for i, t in by_term[e.name]]
                self.emit(f"x_{e.name} = {join_terms(values)}")
                first = by_term[e.name][0][1]
                self.local[e.name] = self.canon((*self.plan.grid, first.own, *first.kept))
            else:
                self.evaluate(e, env, 2)
        for r in s.reductions:
            if r.reduce == "sum":
                code = self.summed(r.expr, tuple(r.reduced), env, self.canon(r.lhs_vars))
                self.emit(f"acc_{r.name} += {code}")
            else:
                code, vax = self.value(r.expr, env)
                dims = tuple(vax.index(v) for v in r.reduced)
                self.emit(f"acc_{r.name} = {_COMBINE[r.reduce]}(acc_{r.name}, {paren(code)}.{_REDUCE[r.reduce]}"
                          f"(dim={dims}))")
        for name in s.stores:
            self.emit(f"{self.window(name)} = {self.without_grid(name)}")
        for r in s.reductions:
            self.emit(f"{self.whole(r.name)} = acc_{r.name}", 1)
        return "\n".join(self.lines) + "\n"

    def without_grid(self, name: str) -> str:
        """The chunk's value of `name` over its own ranks: a term computed for every grid point
        of a tensor that omits some (RetNet's `DS[h,p]`) is the same along those; take the first."""
        axes, (_, want) = self.local[name], self._view(name)
        if set(axes) <= set(want):
            return f"x_{name}"
        return f"x_{name}[{', '.join(':' if a in want else '0' for a in axes)}]"

    def _view(self, name: str) -> tuple[str, list[str]]:
        ranks = [r.lower() for r in self.c.tensors[name].ranks]
        want = self.canon(ranks)
        perm = [ranks.index(v) for v in want]
        code = name if perm == sorted(perm) else f"{name}.permute({', '.join(map(str, perm))})"
        return code, list(want)

    def window(self, name: str) -> str:
        """The chunk's rows of a per-token output, as an assignable view."""
        code, axes = self._view(name)
        subs = [f"t_lo:hi_{a}" if a in (QUERY, KEY) else ":" for a in axes]
        return f"{code}[{', '.join(subs)}]"

    def whole(self, name: str) -> str:
        code, axes = self._view(name)
        return f"{code}[{', '.join(':' for _ in axes)}]" if axes else f"{code}[()]"


def _shape(axes: tuple[str, ...]) -> str:
    """The tuple of the extents of `axes`, as code."""
    dims = [rank_of(v) for v in axes]
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"


def _letters(order: list[str]) -> list[str]:
    used: set[str] = {"p", "m"}
    out = []
    for v in order:
        if v in (QUERY, KEY):
            out.append(v)
            continue
        want = v[0] if v[0] in string.ascii_lowercase and v[0] not in used else \
            next(ch for ch in string.ascii_lowercase if ch not in used)
        used.add(want)
        out.append(want)
    return out


def emit_plan(plan: ScanPlan, cascade_text: str) -> tuple[str, list[SweepEmitter]]:
    head = module_header(plan, cascade_text,
                         "Generated by einsum-ir (codegen/scan_cpu.py): the chunked scan in PyTorch",
                         ["import math", "", "import torch", ""])
    parts, emitters = [head], []
    for s in plan.sweeps:
        em = SweepEmitter(plan, s, f"sweep{s.index}")
        parts.append("\n" + em.generate())
        emitters.append(em)
    return "\n".join(parts), emitters


class ScanCpuKernel(GeneratedPython):
    """The chunked scan on CPU tensors: `kern(**tensors_and_params)`, like `ei.interpret`.
    `chunk` forces the positions per chunk (the tests use small ones)."""

    def __init__(self, cascade: Cascade, plan: ScanPlan, spelled, chunk: int | None = None,
                 fp32: frozenset = frozenset()):
        self.cascade, self.plan, self.spelled, self.chunk = cascade, plan, spelled, chunk
        self.fp32 = frozenset(fp32)
        self._source, self.emitters = emit_plan(plan, str(spelled.cascade))
        self.load("cpu scan")

    def source(self, shapes: dict | None = None, device: str = "cpu") -> str:
        if shapes:
            return f"# chunk for {shapes}: {self.chunk_for(shapes)}\n" + self._source
        return self._source

    def chunk_for(self, extents: dict) -> int:
        return self.chunk or chunk_size(extents, "cpu")

    def same_backend(self, cascade: Cascade, fp32: frozenset = frozenset()):
        """A kernel for `cascade` (the backward's) on this backend, with this one's forced chunk."""
        kern = compile_cpu(cascade, fp32=fp32)
        if isinstance(kern, ScanCpuKernel) and self.chunk is not None:
            kern.chunk = self.chunk
        return kern

    def run(self, args: dict):
        bound = self.bind_call(args)
        if bound is None:
            return interpreted(self.cascade, args, self.fp32)
        tensors, extents, params, out_dtype, dt = bound
        c = self.plan.cascade
        buffers = self.buffers(tensors, extents, dt, filled=False)
        scalars = {**extents, **params}
        kw = {n: scalars[n] for n in list(c.dims) + [p.name for p in c.params]}
        chunk = self.chunk_for(extents)
        for em in self.emitters:
            s = em.s
            names = list(dict.fromkeys(s.loads + s.stores + s.states))
            self._ns[em.name](*[buffers[n] for n in names], **kw, CHUNK=chunk, DT=dt)
        run_epilogue(self.plan.epilogue, buffers, params)
        return collect_outputs(c, buffers, out_dtype, self.spelled.set(self.fp32))
