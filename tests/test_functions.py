"""The function registry (einsum_ir.functions) and the predicate builtins (einsum_ir.builtins):
each entry is all a stage needs, and every stage reads it. A function is run through the
interpreter, the CPU path, the Triton kernel, the cost model and the MLIR export, and its
derivative is checked against autograd; a missing or wrong entry fails here."""
from __future__ import annotations

import math

import pytest
import torch
from support import assert_outputs_close, on_kernel_device

import einsum_ir as ei
from einsum_ir.builtins import PREDICATES
from einsum_ir.functions import FUNCTIONS, torch_function
from einsum_ir.ir import Access, Binary, Call, Index, Num
from einsum_ir.printer import print_expr

# each function's arguments, kept inside its domain: a score s and its positive form
ARGS = {"pow": "abs(S0[b,h,p,m]) + 0.5, 1.5", "where": "S0[b,h,p,m] > 0, S0[b,h,p,m], 0.5 * S0[b,h,p,m]",
        "max": "S0[b,h,p,m], 0.25", "min": "S0[b,h,p,m], 0.25",
        "softplus_scaled": "S0[b,h,p,m], 0.75", "sigmoid_scaled": "S0[b,h,p,m], 0.75"}
POSITIVE = {"log", "sqrt", "rsqrt", "log1p"}

SPEC = """dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
S0[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] * 0.25 where m <= p + 2
A[b,h,p,m] = {call}
O[b,h,p,f] = A[b,h,p,m] * V[b,h,m,f]
output O
"""


def _call(name: str) -> str:
    if name in ARGS:
        return f"{name}({ARGS[name]})"
    return f"{name}(abs(S0[b,h,p,m]) + 0.5)" if name in POSITIVE else f"{name}(S0[b,h,p,m])"


def test_every_entry_is_complete():
    for f in FUNCTIONS.values():
        assert f.torch and f.triton and callable(f.sympy), f.name
        assert f.cost in ("sfu", "vector") and (f.sfu_ops > 0) == (f.cost == "sfu"), f.name
        assert len(f.derivative) == f.max_args, f.name
        assert f.mlir is not None or f.decompose is not None, f.name


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_every_backend_computes_the_function(name):
    c = ei.parse(SPEC.format(call=_call(name)))
    g = torch.Generator().manual_seed(0)
    args = dict(Q=torch.randn(1, 2, 11, 8, generator=g), K=torch.randn(1, 2, 13, 8, generator=g),
                V=torch.randn(1, 2, 13, 4, generator=g))
    want = ei.interpret(c, **args)
    s0 = (args["Q"] @ args["K"].transpose(-1, -2)) * 0.25
    mask = torch.arange(13)[None, :] <= torch.arange(11)[:, None] + 2
    x = s0.abs() + 0.5 if name in POSITIVE else s0
    extra = {"pow": (torch.tensor(1.5),), "max": (torch.tensor(0.25),), "min": (torch.tensor(0.25),),
             "softplus_scaled": (torch.tensor(0.75),), "sigmoid_scaled": (torch.tensor(0.75),)}
    if name == "where":
        a = torch.where(s0 > 0, s0, 0.5 * s0)
    elif name == "pow":
        a = torch_function(name)(s0.abs() + 0.5, *extra[name])
    else:
        a = torch_function(name)(x, *extra.get(name, ()))
    torch.testing.assert_close(want, (a * mask) @ args["V"], atol=1e-5, rtol=1e-5)
    assert_outputs_close(ei.compile(c, backend="cpu")(**args), want, atol=1e-5, rtol=1e-5)
    assert_outputs_close(ei.compile(c, backend="triton")(**on_kernel_device(args)), want)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_the_cost_model_counts_the_registry_cost(name):
    c = ei.parse(f"dims P\ninput X[p]\nY[p] = {name}({', '.join(['X[p]'] * FUNCTIONS[name].min_args)})\noutput Y\n"
                 if name != "where" else "dims P\ninput X[p]\nY[p] = where(X[p] > 0, X[p], 0)\noutput Y\n")
    counts = ei.counts(c, {"P": 10})
    f = FUNCTIONS[name]
    sfu = int(counts.einsum("Y").sfu_ops)
    assert sfu == 10 * f.sfu_ops, (name, sfu)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_the_derivative_matches_autograd(name):
    f = FUNCTIONS[name]
    g = torch.Generator().manual_seed(1)
    xs = [torch.rand(7, generator=g, dtype=torch.float64) + 0.5 for _ in range(f.max_args)]
    if name == "where":
        xs[0] = torch.randn(7, generator=g, dtype=torch.float64)
    names = [f"X{k}" for k in range(f.max_args)]
    reads = [Access(n, (Index("p"),)) for n in names]
    if name == "where":  # its condition is a predicate
        reads[0] = Binary(">", reads[0], Num(0))
    call = Call(name, tuple(reads))
    for k, partial in enumerate(f.derivative):
        if partial is None:
            continue
        spec = (f"dims P\ninput {', '.join(n + '[p]: fp64' for n in names)}\n"
                f"D[p] = {print_expr(partial(call.args, call))}\noutput D\n")
        got = ei.interpret(ei.parse(spec), **dict(zip(names, xs)))
        leaves = [x.clone().requires_grad_(i == k) for i, x in enumerate(xs)]
        if name == "where":
            leaves[0] = leaves[0] > 0
        out = torch_function(name)(*leaves)
        (want,) = torch.autograd.grad(out.sum(), leaves[k])
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9, msg=f"d {name} / d arg {k}")


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_the_mlir_export_writes_the_function(name):
    from einsum_ir.frontends.mlir_export import to_mlir

    c = ei.parse(f"dims P\ninput X[p]\nY[p] = {_call(name).replace('S0[b,h,p,m]', 'X[p]')}\noutput Y\n")
    text = to_mlir(c, {"P": 4})
    f = FUNCTIONS[name]
    if f.mlir is not None:
        assert f.mlir in text
    else:  # written through its decomposition: the ops of the functions it is made of
        from einsum_ir.ir import walk

        parts = {n.fn for n in walk(f.decompose(*[Index("p")] * f.min_args)) if isinstance(n, Call)}
        assert all(FUNCTIONS[g].mlir in text for g in parts if FUNCTIONS[g].mlir), (name, parts)
    try:
        from einsum_ir.frontends.mlir_import import parse_mlir
    except ImportError:
        return
    try:
        parse_mlir(text)
    except ImportError:
        pytest.skip("torch-mlir is not installed (extra 'mlir')")


def test_predicate_builtins_expand_to_index_arithmetic():
    for b in PREDICATES.values():
        lo, hi = b.arity
        args = tuple([Index("p"), Index("m")] + [Num(3)] * (hi - 2))
        text = print_expr(b.expand(args))
        assert b.name not in text and ("p" in text and "m" in text)
        assert b.key_interval(args[:lo]) is not None  # the plain form bounds the key loop


def test_value_at_limits_come_from_the_semantics():
    from einsum_ir.functions import value_at

    assert value_at("exp", -math.inf) == 0.0 and value_at("exp2", -math.inf) == 0.0
    assert value_at("tanh", -math.inf) == -1.0 and value_at("log", -math.inf) is None


def test_a_new_function_is_one_registry_entry(monkeypatch):
    """softsign(x) = x / (1 + |x|), added as one entry, runs everywhere."""
    from einsum_ir.functions import Function

    entry = Function("softsign", (1, 1), "torch.nn.functional.softsign({0})", "({0} / (1.0 + tl.abs({0})))",
                     lambda x: x / (1 + abs(x)), "vector", 0,
                     (lambda a, out: Binary("/", Num(1.0), Binary("*", Binary("+", Num(1.0), Call("abs", a)),
                                                                  Binary("+", Num(1.0), Call("abs", a)))),),
                     decompose=lambda x: Binary("/", x, Binary("+", Num(1.0), Call("abs", (x,)))), finite=True)
    monkeypatch.setitem(FUNCTIONS, "softsign", entry)
    c = ei.parse(SPEC.format(call="softsign(S0[b,h,p,m])"))
    g = torch.Generator().manual_seed(2)
    args = dict(Q=torch.randn(1, 2, 9, 8, generator=g), K=torch.randn(1, 2, 12, 8, generator=g),
                V=torch.randn(1, 2, 12, 4, generator=g))
    want = ei.interpret(c, **args)
    s0 = (args["Q"] @ args["K"].transpose(-1, -2)) * 0.25
    mask = torch.arange(12)[None, :] <= torch.arange(9)[:, None] + 2
    torch.testing.assert_close(want, ((s0 / (1 + s0.abs())) * mask) @ args["V"], atol=1e-5, rtol=1e-5)
    assert_outputs_close(ei.compile(c, backend="cpu")(**args), want, atol=1e-5, rtol=1e-5)
    assert_outputs_close(ei.compile(c, backend="triton")(**on_kernel_device(args)), want)
    assert int(ei.counts(c, {"B": 1, "H": 1, "P": 4, "M": 4, "E": 2, "F": 2}).einsum("A").sfu_ops) == 0


def test_a_new_predicate_builtin_is_one_class(monkeypatch):
    """band(q, k, w): the w keys ending at q, added as one class, bounds the loop, masks the
    tiles and is counted exactly."""
    from einsum_ir.builtins import KeyInterval, PredicateBuiltin

    class Band(PredicateBuiltin):
        name, arity = "band", (3, 3)

        def expand(self, args):
            q, k, w = args
            return Binary("and", Binary("<=", k, q), Binary("<", Binary("-", q, k), w))

        def key_interval(self, args):
            q, k, w = args
            return KeyInterval(q.name, k.name, Call("max", (Binary("+", Binary("-", q, w), Num(1)), Num(0))),
                               Binary("+", q, Num(1)))

    monkeypatch.setitem(PREDICATES, "band", Band())
    spec = ei.variants.source("softmax_window").replace("where m <= p and p - m < W", "where band(p, m, W)")
    c, ref = ei.parse(spec), ei.variants.load("softmax_window")
    g = torch.Generator().manual_seed(3)
    args = dict(Q=torch.randn(1, 2, 40, 8, generator=g), K=torch.randn(1, 2, 40, 8, generator=g),
                V=torch.randn(1, 2, 40, 4, generator=g), W=7)
    want = ei.interpret(ref, **args)
    assert_outputs_close(ei.interpret(c, **args), want, atol=1e-6, rtol=1e-6)
    cpu = ei.compile(c, backend="cpu")
    assert_outputs_close(cpu(**args), want, atol=1e-5, rtol=1e-5)
    assert cpu.plan.stages[0].loop.exact  # the interval bounds the keys like the affine window
    assert_outputs_close(ei.compile(c, backend="triton")(**on_kernel_device(args)), want)
    shapes = {"B": 1, "H": 2, "P": 40, "M": 40, "E": 8, "F": 4, "W": 7}
    assert ei.counts(c, shapes).einsum("S").points == ei.counts(ref, shapes).einsum("S").points
