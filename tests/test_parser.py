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
    "intermediate read at another rank": ("S[b,h,p,m] = Q[b,h,p,e] * K[b,h,m,e]\nT[b,h,p,m] = S[b,h,m,p]\noutput T\n",
                                          "index m is bound to rank M, but position 3 of S has rank P; only an input",
                                          "m"),
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


# --------------------------------------------------------------------------- limits (issue 15)

NESTED = "dims P M E\ninput Q[p,e], K[m,e]\nS[p,m] = {}\noutput S\n"


@pytest.mark.parametrize("body", [
    "(" * 200 + "Q[p,e] * K[m,e]" + ")" * 200,      # parentheses
    "-" * 5000 + "Q[p,e] * K[m,e]",                  # a run of unary minus
    "Q[p,e] * K[m,e] where " + "not " * 5000 + "m <= p",
    "exp(" * 150 + "Q[p,e] * K[m,e]" + ")" * 150,   # calls
    "Q[p,e] * K[" + "min(" * 150 + "m" + ", m)" * 150 + ",e]",  # brackets and calls in an index
    "Q[p,e] * K[m,e] where m <= p" + " // 2" * 300,  # a chain that does not reassociate
])
def test_deep_nesting_is_a_located_error_not_a_recursion_error(body):
    err = _error(NESTED.format(body))
    assert "nested too deeply" in str(err) and err.loc.line == 3 and err.loc.col > 100, str(err)


def test_a_1000_term_sum_parses_checks_prints_back_and_runs():
    torch = pytest.importorskip("torch")
    signs = [1 - 2 * ((k * 7) % 3 == 0) for k in range(1000)]  # mixed + and -
    body = "Q[p,e] * K[m,e] * 0" + "".join(f" {'+' if s > 0 else '-'} Q[p,e] * K[m,e] * {k}"
                                            for k, s in enumerate(signs) if k)
    c = ei.parse(NESTED.format(body))
    assert ei.parse(str(c)) == c and str(ei.parse(str(c))) == str(c)
    q, k = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    want = sum(s * j for j, s in enumerate(signs) if j) * q @ k.T
    torch.testing.assert_close(ei.interpret(c, Q=q, K=k), want)
    assert ei.interpret(c, Q=q, K=k).shape == (3, 5)


def test_long_chains_group_into_runs_that_print_back_as_parsed():
    """A chain of 40 operands becomes runs of at most 16 (a shallow tree); `a - b + c` inside a
    run joined by `-` is `a - (b - c)`, and what prints parses to the same tree."""
    c = ei.parse("dims P\ninput X[p]\nY[p] = " + " - ".join(["X[p]"] * 40) + " * 2\noutput Y\n")
    depth, stack = 0, [(c.einsums[0].expr, 1)]
    while stack:
        node, d = stack.pop()
        depth = max(depth, d)
        stack += [(x, d + 1) for x in (node.lhs, node.rhs)] if isinstance(node, Binary) else []
    assert depth < 40 and ei.parse(str(c)) == c
    x = Access("X", (Index("p"),))
    assert ei.parse("dims P\ninput X[p]\nY[p] = X[p] - X[p] + X[p]\noutput Y\n").einsums[0].expr == \
        Binary("+", Binary("-", x, x), x)  # short chains stay left-deep


def test_nested_unary_operators_print_without_parentheses():
    c = ei.parse("dims P M\ninput X[p,m]\nY[p,m] = - -X[p,m] where not not m <= p\noutput Y\n")
    assert "- -X[p,m]" in str(c) and "not not m <= p" in str(c) and ei.parse(str(c)) == c


@pytest.mark.parametrize("spec, fragment", [
    ("dims P\nparam W: int32\ninput X[p]\nY[p] = X[p]\noutput Y\n", "write 'param W: int'"),
    ("dims P\nparam W: bf16\ninput X[p]\nY[p] = X[p]\noutput Y\n", "write 'param W: float'"),
    ("dims P\ninput X[p]: int\nY[p] = X[p]\noutput Y\n", "an integer tensor is int32 or int64"),
    ("dims P\ninput X[p], Z[p]\nY[p] = where(X[p], Z[p], 0)\noutput Y\n",
     "X is a float tensor and cannot be a predicate"),
])
def test_type_names_and_float_predicates_say_what_to_write(spec, fragment):
    assert fragment in str(_error(spec))


def test_a_spec_that_is_not_utf8_is_a_located_error(tmp_path):
    path = tmp_path / "bin.ein"
    path.write_bytes(b"dims P\ninput X[p]\nY[p] = X[p] \xff\noutput Y\n")
    with pytest.raises(ei.SpecError) as info:
        ei.load(path)
    assert str(info.value).startswith(f"{path}:3:13: error: byte 0xff is not UTF-8")


def test_a_10000_line_spec_checks():
    """Checking is linear in the spec (scripts/limits.py times it: 96.8 s before, when every
    read scanned every writer)."""
    lines = ["dims P M E", "input Q[p,e], K[m,e]", "S0[p,m] = Q[p,e] * K[m,e]"]
    lines += [f"S{i}[p,m] = S{i - 1}[p,m] * 0.5 + S{max(0, i - 2)}[p,m] where m <= p" for i in range(1, 9996)]
    c = ei.parse("\n".join(lines + ["output S9995"]) + "\n")
    assert len(c.einsums) == 9996 and c.writers("S42")[0].name == "S42"


def _deeper(frames: int, fn):
    """`fn()` called `frames` Python frames further down the stack (a caller's own depth)."""
    return fn() if frames == 0 else _deeper(frames - 1, fn)


def test_the_deepest_accepted_spec_runs_through_every_stage():
    """At the nesting limit, from 200 frames down, printing, the interpreter, the CPU path, the
    counts and the gradient all stay within Python's recursion limit."""
    torch = pytest.importorskip("torch")
    spec = ("dims P M E\ninput Q[p,e], K[m,e]\nS0[p,m] = Q[p,e] * K[m,e]\n"
            f"S[p,m] = {'tanh(' * 97}S0[p,m]{')' * 97} where {'(' * 95}m <= p{')' * 95}\n"
            "GM[p] = max[m] S[p,m]\nSN[p,m] = exp(S[p,m] - GM[p])\nSD[p] = SN[p,m]\nO[p] = SN[p,m] / SD[p]\n"
            "output O\n")
    c = _deeper(200, lambda: ei.parse(spec))
    args = {"Q": torch.randn(9, 4), "K": torch.randn(11, 4)}
    assert _deeper(200, lambda: ei.parse(str(c))) == c
    want = _deeper(200, lambda: ei.interpret(c, **args))
    torch.testing.assert_close(_deeper(200, lambda: ei.compile(c, backend="cpu")(**args)), want)
    assert _deeper(200, lambda: ei.counts(c, {"P": 9, "M": 11, "E": 4})).einsum("S").points == 45  # m <= p
    assert _deeper(200, lambda: ei.grad(c)) is not None


@pytest.mark.parametrize("line, col, fragment", [
    ("GM[p] = max S[p,m]", 9, "in GM, a max reduction lists the indices it reduces: write 'max[m]'"),
    ("GM[p] = min exp(S[p,m])", 9, "write 'min[m]'"),
    ("GM[p,m] = max S[p,m]", 11, "nothing is reduced; for an elementwise max of two values write max(a, b)"),
])
def test_a_reduction_without_its_indices_says_which_to_list(line, col, fragment):
    err = str(_error(f"dims P M E\ninput Q[p,e], K[m,e]\nS[p,m] = Q[p,e] * K[m,e]\n{line}\noutput S\n"))
    assert f"bad.ein:4:{col}: error: " in err and fragment in err


def test_a_param_named_like_a_reduction_still_reads_as_a_value():
    c = ei.parse("dims P\nparam max = 2\ninput X[p]\nY[p] = max * X[p]\noutput Y\n")
    assert c.einsums[0].reduce == "sum" and ei.parse(str(c)) == c
