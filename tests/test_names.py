"""No spec name can collide with what generated code names itself (codegen/names.py)."""
from __future__ import annotations

import ast
import keyword

import pytest
import torch

import einsum_ir as ei
from einsum_ir.codegen.cpu_emit import compile_cpu
from einsum_ir.codegen.kernel import compile_triton
from einsum_ir.codegen.names import NUMBERED, RESERVED
from einsum_ir.errors import SpecError
from einsum_ir.lowering.grad import grad

from support import NOT_FUSED, on_kernel_device

# Every name is one the emitters use themselves, or derive (Q_ptr, KEYS_m, q_lo_i), or a module.
ADVERSARIAL = """
dims B H I K T LO
param scale = 1/sqrt(T)
param KEYS_k: int
param q_valid: int
param pid_g = 0.5
param DT = 1.0
param q_lo_i = 2.0
input torch[b,h,i,t], tl[b,h,k,t], math[b,h,k,lo]
tl_ptr[b,h,i,k] = torch[b,h,i,t] * tl[b,h,k,t] * scale * DT where k <= i and i - k < KEYS_k and k >= q_valid
BLOCK_S[b,h,i] = max[k] tl_ptr[b,h,i,k]
stride_tl_0[b,h,i,k] = exp(tl_ptr[b,h,i,k] - BLOCK_S[b,h,i]) * pid_g * q_lo_i
_stats[b,h,i] = stride_tl_0[b,h,i,k]
BLOCK_Q[b,h,i,lo] = stride_tl_0[b,h,i,k] * math[b,h,k,lo] / _stats[b,h,i]
output BLOCK_Q
"""


def _keywords_as_params() -> list[str]:
    """The Python keywords the spec grammar takes as a param name."""
    ok = []
    for kw in keyword.kwlist + keyword.softkwlist:
        try:
            ei.parse(f"dims P\nparam {kw} = 1.0\ninput X[p]\nY[p] = X[p] * {kw}\noutput Y\n")
        except SpecError:
            continue
        ok.append(kw)
    return ok


def _with_keywords() -> ei.Cascade:
    kws = _keywords_as_params()
    assert {"lambda", "def", "None", "class"} <= set(kws)
    params = "".join(f"param {kw} = 1.0\n" for kw in kws)
    factor = " * ".join(kws)
    return ei.parse(f"""dims B H P M E F
param scale = 1/sqrt(E)
{params}input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S[b,h,p,m]  = Q[b,h,p,e] * K[b,h,m,e] * scale * {factor} where m <= p
GM[b,h,p]   = max[m] S[b,h,p,m]
SN[b,h,p,m] = exp(S[b,h,p,m] - GM[b,h,p])
SD[b,h,p]   = SN[b,h,p,m]
O[b,h,p,f]  = SN[b,h,p,m] * V[b,h,m,f] / SD[b,h,p]
output O
""")


def _args(c: ei.Cascade) -> dict:
    g = torch.Generator().manual_seed(0)
    sizes = {"B": 1, "H": 2, "I": 11, "K": 13, "T": 8, "LO": 6, "P": 11, "M": 13, "E": 8, "F": 6}
    args = {d.name: torch.randn(*(sizes[i.upper()] for i in d.indices), generator=g) for d in c.inputs}
    args.update({p.name: v for p, v in zip([p for p in c.params if p.type], (5, 1))})
    return args


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("which", ["adversarial", "keywords"])
def test_spec_names_that_the_emitters_use_compute_what_the_interpreter_does(backend, which):
    c = ei.parse(ADVERSARIAL) if which == "adversarial" else _with_keywords()
    args = _args(c)
    kern = ei.compile(c, backend=backend)
    leaves = {k: v.clone().requires_grad_() if isinstance(v, torch.Tensor) else v
              for k, v in on_kernel_device(args).items()}
    out = kern(**leaves)
    want = ei.interpret(c, **args)
    torch.testing.assert_close(out.detach().cpu(), want, atol=1e-5, rtol=1e-5)
    out.sum().backward()  # the backward kernels are generated from the same spelling
    ref = {k: v.clone().requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    ei.interpret(c, **ref).sum().backward()
    for name, v in ref.items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(leaves[name].grad.cpu(), v.grad, atol=1e-4, rtol=1e-4, msg=name)


def _identifiers(source: str, arguments: set[str]) -> set[str]:
    """The names that share a scope with the cascade's: the module's own (functions, imports)
    and every name inside a kernel, a function taking a cascade tensor, dim or param (a
    helper's locals, `pow(a, b)`'s, are its own)."""
    def names(node) -> set[str]:
        out = set()
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                out.add(n.id)
            elif isinstance(n, ast.arg):
                out.add(n.arg)
        return out

    tree = ast.parse(source)
    out = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out.add(node.name)
            takes = {a.arg for a in node.args.args + node.args.kwonlyargs}
            if takes & arguments or any(a.endswith("_ptr") for a in takes):
                out |= names(node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        else:
            out |= names(node)
    return out


def _arguments(c: ei.Cascade) -> set[str]:
    return set(c.tensors) | set(c.dims) | {p.name for p in c.params}


FUSED = [n for n in ei.variants.names() if n not in ("linear_elu", "linear_elu_causal", "flowformer") + tuple(NOT_FUSED)]


@pytest.mark.parametrize("name", FUSED)
def test_the_emitters_own_names_hold_an_underscore_or_are_reserved(name):
    """What makes escaping sound: every name generated code gives itself either holds a single
    `_` (an escaped spec name never does) or is one that spec names are escaped away from."""
    c = ei.variants.load(name)
    cascades = [c]
    try:
        cascades += list(grad(c).backward)
    except ei.LoweringError:
        pass
    for cc in cascades:
        for make in (compile_triton, compile_cpu):
            try:
                kern = make(cc)
            except ei.LoweringError:  # a derived backward no emitter takes (retnet) recomputes
                if cc is c:
                    raise
                continue
            lowered = kern.plan.cascade
            ir = _arguments(lowered) | {d.lower() for d in lowered.dims}
            own = _identifiers(kern.source(), _arguments(lowered)) - ir
            bare = {n for n in own if "_" not in n and n not in RESERVED and not NUMBERED.match(n)}
            assert not bare, f"{name} ({kern.backend}): add {sorted(bare)} to codegen/names.py EMITTER_NAMES"
