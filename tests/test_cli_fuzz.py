"""Fuzzing the command line: whatever the spec file holds (random bytes, edits of catalog specs,
deep nesting) and whatever the sizes, `einsum-ir` exits 0, or 1 or 2 with a located one-line
message, and never shows a traceback (one would escape `main` and fail the test)."""
import contextlib
import io
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

import einsum_ir as ei
from einsum_ir.cli import main

LOCATED = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): error: \S")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NESTING = ["(", "-", "not ", "exp(", "Sel[", "min(p, "]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _check(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.ein"
        path.write_bytes(data)
        code, out, err = _run(["check", str(path)])
    assert "Traceback" not in err
    if code == 0:
        assert out.startswith(f"{path}: ok (") and not err
        return
    assert code == 1, (code, err)
    found = LOCATED.match(err.removeprefix("einsum-ir: "))
    assert found and found["file"] == str(path) and int(found["line"]) >= 1 and int(found["col"]) >= 1, err


def _edit(text: str, edits) -> str:
    for pos, cut, insert in edits:
        pos %= len(text) + 1
        text = text[:pos] + insert + text[pos + cut:]
    return text


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes(data):
    _check(data)


@SETTINGS
@given(st.sampled_from(ei.variants.names()), st.lists(st.tuples(
    st.integers(0, 5_000), st.integers(0, 6),
    st.sampled_from(["", "[", "]", "(", ")", ",", "=", "*", "//", "x", "m", "M", "1", "-1", "1e999", "where ",
                     "max[m] ", " and ", " not ", "#", "\n", "m1+1", "init ", "output ", "param Z: int\n",
                     "nbhd(", "\x00", "\xff", "é", "\t", "\r"])), min_size=1, max_size=4))
def test_edited_catalog_specs(name, edits):
    _check(_edit(ei.variants.source(name), edits).encode("utf-8", "surrogatepass"))


@SETTINGS
@given(st.sampled_from(NESTING), st.integers(1, 400), st.booleans())
def test_deep_nesting(opener, depth, closed):
    closer = {"(": ")", "exp(": ")", "Sel[": ", m]", "min(p, ": ")"}.get(opener, "")
    body = opener * depth + "m" + closer * depth * closed
    spec = f"dims P M\ninput Sel[p,m]: int32\nS[p,m] = 1 where {body} <= p\noutput S\n"
    _check(spec.encode())


number = st.one_of(st.integers(-10, 10 ** 20), st.sampled_from(["nan", "inf", "-inf", "1e12", "2.5", "abc", "", "="]))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["softmax_causal", "softmax_window", "nbhd_1d", "moba"]), st.lists(
    st.tuples(st.sampled_from(["P", "M", "E", "W", "ST", "BS", "Z", "B"]), number), max_size=4))
def test_analyze_sizes(name, changes):
    c = ei.variants.load(name)
    shapes = {n: 64 for n in [*c.dims, *(p.name for p in c.params if p.type)]}
    shapes.update({"W": 9, "ST": 2, "BS": 16, "PB": 4, "MB": 4} if name != "softmax_causal" else {})
    shapes = {k: v for k, v in shapes.items() if k in c.dims or c.param(k)}
    shapes.update(dict(changes))
    code, out, err = _run(["analyze", name, "--shapes", ",".join(f"{k}={v}" for k, v in shapes.items())])
    assert "Traceback" not in err
    assert code == 0 or (code == 2 and err.startswith("einsum-ir: error: ") and len(err.splitlines()) == 1), err
