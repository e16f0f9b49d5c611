"""The spec language: valid specs parse to the expected IR; every error is located and explained."""
import math

import pytest

import einsum_ir as ei
from einsum_ir.ir import Access, Binary, Call, Index, Name, Num, Unary
from support import CAUSAL_SOFTMAX_LSE

HEADER = """dims B H P M E F
param scale = 1/sqrt(E)
input Q[b,h,p,e], K[b,h,m,e], V[b,h,m,f]
"""


def test_valid_spec_builds_the_expected_ir():
    c = ei.parse(CAUSAL_SOFTMAX_LSE)
    assert c.dims == ("B", "H", "P", "M", "E", "F")
    assert [e.name for e in c.einsums] == ["S", "GM", "SN", "SD", "O", "LSE"]
    s = c.einsum("S")
    assert s.reduced == ["e"] and s.reduce == "sum"
    assert s.where == Binary("<=", Index("m"), Index("p"))
    assert c.einsum("GM").reduce == "max" and c.einsum("GM").reduced == ["m"]
    b, h, p, m = (Index(n) for n in "bhpm")
    assert c.einsum("SN").expr == Call("exp", (Binary("-", Access("S", (b, h, p, m)), Access("GM", (b, h, p))),))
    assert [(o.name, o.fill) for o in c.outputs] == [("O", 0.0), ("LSE", -math.inf)]
    assert c.param("scale").expr == Binary("/", Num(1), Call("sqrt", (Name("E"),)))
    assert c.tensors["S"].ranks == ("B", "H", "P", "M") and c.tensors["Q"].role == "input"
    assert c.tensors["LSE"].role == "output"


def test_precedence_and_folded_negative_numbers():
    c = ei.parse("dims P\ninput X[p]\nY[p] = -X[p] * 2 - -3 + p // 4 % 2\noutput Y\n")
    x = Access("X", (Index("p"),))
    expected = Binary("+", Binary("-", Binary("*", Unary("-", x), Num(2)), Num(-3)),
                      Binary("%", Binary("//", Index("p"), Num(4)), Num(2)))
    assert c.einsums[0].expr == expected


def test_split_params_dtypes_init_and_recurrence():
    c = ei.variants.load("softmax_1pass")
    assert c.splits[0].rank == "M" and c.ranks["M1"].extent.has(c.ranks["M0"].extent)
    assert c.einsum("RM").recurrence_var == "m1"
    assert c.tensors["RM"].iterative and not c.tensors["LM"].iterative
    spec = "dims P M\nparam W: int\ninput Sel[p,m]: bool, X[p,m]: bf16\nY[p,m] = X[p,m] where Sel[p,m] and p - m < W\noutput Y\n"
    c = ei.parse(spec)
    assert c.param("W").type == "int" and [d.dtype for d in c.inputs] == ["bool", "bf16"]


def test_comments_and_doc():
    c = ei.parse("# What it is.\n# From a paper.\n\ndims P  # ranks\ninput X[p]\nY[p] = X[p]  # copy\noutput Y\n")
    assert c.doc == "What it is.\nFrom a paper."


def _error(spec: str) -> ei.SpecError:
    with pytest.raises(ei.SpecError) as info:
        ei.parse(spec, file="bad.ein")
    return info.value


def _caret_under(err: ei.SpecError, token: str) -> None:
    """The error's caret line points at `token` on the quoted source line."""
    lines = str(err).splitlines()
    source, caret = lines[1][4:], lines[2][4:]
    start = caret.index("^")
    assert source[start:start + len(token)] == token, str(err)


# (spec body after HEADER, expected message fragment, token under the caret)
ERRORS = {
    "undefined tensor": ("O[b,h,p,f] = X[b,h,p,f]\noutput O\n", "undefined tensor 'X'", "X"),
    "wrong number of indices": ("O[b,h,p,f] = V[b,h,m]\noutput O\n", "V has 4 indices [b, h, m, f], but 3 are given", "V"),
    "index bound to two ranks": ("S[b,h,p,m] = Q[b,h,m,e] * K[b,h,m,e]\noutput S\n",
                                 "index m is bound to rank M, but position 3 of Q has rank P", "m"),
    "reassignment": ("S[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e]\nS[b,h,p,m] = Q[b,h,p,e]\noutput S\n",
                     "'S' is assigned twice", "S"),
    "cycle": ("A[b,h,p] = B[b,h,p] + 1\nB[b,h,p] = A[b,h,p] * 2\noutput B\n", "cycle: ", "A"),
    "recurrence without init": ("split M -> M1 x M0\nR[b,h,m1+1,p] = R[b,h,m1,p] + 1\noutput R\n",
                                "recurrence R has no init: add a line 'init R[b, h, 0, p] = ...'", "R"),
    "unknown function": ("S[b,h,p,m] = gelu(Q[b,h,p,e]) * K[b,h,m,e]\noutput S\n", "unknown function gelu(...)", "gelu"),
    "reduced index in nonlinear": ("S[b,h,p,m] = tanh(Q[b,h,p,e] * K[b,h,m,e])\noutput S\n",
                                   "index e is summed over the whole right side but appears inside tanh(...)", "tanh"),
    "predicate reads a float tensor": ("S[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e] where V[b,h,m,0] > 0\noutput S\n",
                                       "the where-predicate reads V, which is a float tensor", "V"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error_messages_are_located(case):
    body, fragment, token = ERRORS[case]
    err = _error(HEADER + body)
    text = str(err)
    assert fragment in text
    assert text.startswith(f"bad.ein:{err.loc.line}:{err.loc.col}: error: ")
    assert err.loc.line > 3  # the problem is in the body, not the shared header
    _caret_under(err, token)


@pytest.mark.parametrize("spec, fragment, token", [
    ("dims P\ninput X[p\noutput X\n", "expected ',' or ']'", ""),
    ("dims P\ninput X[p]\nY[p] = X[p] +\noutput Y\n", "expected a number, name, tensor access or '('", ""),
    ("dims P\ninput X[p]\nY[p] = X[p] $ 2\noutput Y\n", "unexpected character '$'", "$"),
    ("dims P\ninput X[p]\nY[p] = X[q]\noutput Y\n", "unknown name 'q'", "q"),
    ("dims p\n", "rank names are upper-case", "p"),
    ("input X[p]\n", "a spec starts with a 'dims' line", "input"),
    ("dims P\ninput X[p]\nY[p] = max[p] X[p]\noutput Y\n", "max[p] lists the reduced indices", "p"),
    ("dims P\ninput X[p]\nY[p] = X[p] where p < 3 < 4\noutput Y\n", "comparisons do not chain", "<"),
    ("dims P\ninput X[p]\nY[p] = X[p]\n", "no 'output' line", ""),
    ("dims P\ninput X[p]\nY[p] = X[p]\noutput Z\n", "output 'Z' is never assigned", "Z"),
    ("dims P\ninput X[p]\nY[p] = X[p / 2]\noutput Y\n", "index of X uses '/'", "/"),
    ("dims P\ninput X[p]\nY[p] = X[p] + (p < 2)\noutput Y\n", "'<' makes a predicate", "<"),
    ("dims P\ninput X[p]\nX[p] = X[p] + 1\noutput X\n", "'X' is an input and cannot be assigned", "X"),
    ("dims P\ninput X[p]\nY[p] = exp(X[p], 2)\noutput Y\n", "exp(...) takes 1 arguments, got 2", "exp"),
])
def test_syntax_and_structure_errors(spec, fragment, token):
    err = _error(spec)
    assert fragment in str(err)
    assert str(err).startswith("bad.ein:")
    if token:
        _caret_under(err, token)


def test_builder_cascade_errors_have_no_location_but_a_message():
    from einsum_ir.builder import CascadeBuilder

    cb = CascadeBuilder()
    (p,) = cb.dims("P")
    cb.let("Y", (p,), cb.input("X", p)[p] + 1)
    with pytest.raises(ei.SpecError, match="output 'Z' is never assigned"):
        from einsum_ir.builder import TensorRef

        cb.build(outputs=[TensorRef("Z")])
