"""The command line: located errors and non-zero exits, never a traceback for a bad spec or a
bad option; `--version`, `--debug` anywhere, the report's legend, and a quick start."""
import os
import re
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import einsum_ir as ei
from einsum_ir.cli import main

BROKEN = """dims B H P M E F
input Q[b,h,p,e], K[b,h,m,e]
S[b,h,p,m] = Q[b,h,p,e] * K[b,h,m]
output S
"""


def test_check_reports_a_located_error_and_exits_nonzero(tmp_path, capsys):
    path = tmp_path / "bad.ein"
    path.write_text(BROKEN)
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:3:27: error: K has 4 indices [b, h, m, e], but 3 are given" in err
    assert err.splitlines()[2].strip() == "^"


def test_check_accepts_catalog_names_and_files(tmp_path, capsys):
    path = tmp_path / "ok.ein"
    path.write_text(ei.variants.source("softmax"))
    assert main(["check", "softmax_causal", str(path)]) == 0
    assert "softmax_causal: ok" in capsys.readouterr().out


def test_unknown_spec_is_a_clean_error(capsys):
    assert main(["check", "no_such.ein"]) == 2
    assert "no such spec file: no_such.ein" in capsys.readouterr().err
    assert main(["print", "not_a_variant"]) == 2
    assert "neither a spec file nor a catalog variant" in capsys.readouterr().err


def test_console_script_runs_without_traceback(tmp_path):
    path = tmp_path / "bad.ein"
    path.write_text(BROKEN)
    proc = subprocess.run([sys.executable, "-m", "einsum_ir.cli", "check", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "error:" in proc.stderr


def _mutations():
    names = ei.variants.names()
    return st.tuples(st.sampled_from(names), st.lists(st.tuples(
        st.integers(0, 10_000), st.integers(0, 4),
        st.sampled_from(["", "[", "]", "(", ")", ",", "=", "*", "x", "m", "M", "1", "where ", "max[m] ",
                         "exp(", " and ", "#", "\n", "-", "m1+1", "Q", "init ", "output ", "//", "nbhd("])),
        min_size=1, max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations())
def test_mutated_specs_raise_only_spec_errors(case):
    """Random edits of catalog specs either parse or raise SpecError; nothing else escapes."""
    name, edits = case
    text = ei.variants.source(name)
    for pos, cut, insert in edits:
        pos %= len(text) + 1
        text = text[:pos] + insert + text[pos + cut:]
    try:
        ei.parse(text, file="mutated.ein")
    except ei.SpecError as err:
        assert str(err).startswith("mutated.ein:") or str(err).startswith("error:")


def test_simulate_names_missing_shapes(capsys):
    args = ["simulate", "softmax_window", "--shapes", "B=1,P=64", "--q-tile", "P=16", "--kv-tile", "M=16"]
    assert main(args) == 2
    assert "--shapes lacks H, M, E, F, W" in capsys.readouterr().err


def test_analyze_without_a_param_keeps_counts_symbolic(capsys):
    assert main(["analyze", "softmax_window", "--shapes", "B=1,H=2,P=256,M=256,E=64,F=64"]) == 0
    out = capsys.readouterr().out
    assert "Passes over M: 2" in out and "roofline: needs W" in out


def test_grad_prints_the_backward_its_saved_values_and_one_pass(capsys):
    assert main(["grad", "softmax_causal"]) == 0
    out = capsys.readouterr().out
    assert "dQ[b,h,p,e]" in out and "output dQ, dK, dV" in out
    assert "saved by the forward: GM, SD" in out
    assert "Passes over P: 1" in out
    assert "tile_sum  dQ" in out and "carried   dK" in out
    assert "backward  " not in out  # no shapes: no cost table


def test_grad_with_shapes_adds_a_cost_row_per_cascade(capsys):
    assert main(["grad", "softmax_causal", "--shapes", "B=1,H=2,P=256,M=256,E=16,F=16"]) == 0
    out = capsys.readouterr().out
    assert "dQ" in out and "saved by the forward: GM, SD" in out and "Passes over P: 1" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["forward"], ["prologue"],
                                                                                        ["backward"])}
    assert set(rows) == {"forward", "prologue", "backward"}, out
    assert "TC FLOPs" in out and "bound on" in out
    assert rows["backward"].rstrip().endswith(")")  # its roofline bound, e.g. "0.0 us (memory)"


def test_grad_of_a_two_stage_forward_is_a_clean_error(capsys):
    assert main(["grad", "agent_attention"]) != 0
    captured = capsys.readouterr()
    assert "2 stages" in captured.err and captured.err.startswith("einsum-ir: ")
    assert "Traceback" not in captured.err and captured.out == ""


def test_analyze_and_report_say_whether_a_backward_and_partial_states_are_derived(capsys):
    from einsum_ir.lowering.report import report_columns

    assert main(["analyze", "softmax_causal", "--shapes", "B=1,H=2,P=256,M=256,E=64,F=64"]) == 0
    out = capsys.readouterr().out
    assert "fused backward (einsum-ir grad): yes" in out and "partial states (kern.partial, ei.merge): yes" in out
    cols = report_columns("agent_attention", ei.variants.load("agent_attention"))
    assert cols["backward"].startswith("no: the forward runs 2 stages")
    assert cols["merge"] == "yes"  # the state is the first stage's (agents over the keys)
    assert report_columns("flowformer", ei.variants.load("flowformer"))["merge"].startswith("no: ")


def _error_line(argv, capsys, code=2) -> str:
    """The one line `einsum-ir ARGV` prints on stderr, after checking its exit code."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


SHAPES = "B=1,H=2,P=256,M=256,E=64,F=64,W=64"


def test_os_errors_are_one_line(tmp_path, capsys):
    assert _error_line(["check", str(tmp_path)], capsys) == f"einsum-ir: error: {tmp_path}: Is a directory"
    assert _error_line(["print", str(tmp_path / "missing.ein")], capsys).startswith(
        "einsum-ir: error: no such spec file: ")


def test_unreadable_spec_is_one_line(tmp_path, capsys):
    path = tmp_path / "locked.ein"
    path.write_text(BROKEN)
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: every file is readable")
    assert _error_line(["check", str(path)], capsys) == f"einsum-ir: error: {path}: Permission denied"


@pytest.mark.parametrize("option, value, message", [
    ("--q-tile", "P=0", "q_tile P=0: a tile size is a positive integer"),
    ("--q-tile", "P=-1", "q_tile P=-1: a tile size is a positive integer"),
    ("--kv-tile", "Q=8", "kv_tile Q=8: Q is not a dim of the cascade"),
    ("--shapes", SHAPES + ",Z=3", "--shapes Z=3: softmax_window has no dim or runtime param Z"),
    ("--params", "V=3", "--params V=3: softmax_window has no dim or runtime param V"),
    ("--dtype", "int4", "dtype 'int4' is not one of fp64, fp32"),
])
def test_bad_simulate_options_are_one_located_line(option, value, message, capsys):
    argv = {"--shapes": SHAPES, "--q-tile": "P=64", "--kv-tile": "M=64", option: value}
    line = _error_line(["simulate", "softmax_window", *(x for kv in argv.items() for x in kv)], capsys)
    assert line.startswith("einsum-ir: error: ") and message in line, line


@pytest.mark.parametrize("top_k", ["0", "-3"])
def test_tune_top_k_must_be_positive(top_k, capsys):
    line = _error_line(["tune", "softmax_window", "--shapes", SHAPES, "--top-k", top_k, "--no-aot"], capsys)
    assert line == f"einsum-ir: error: top_k {top_k}: keep at least one candidate (a positive integer)"


def test_simulate_of_a_tensor_mask_gives_shell_advice(capsys):
    line = _error_line(["simulate", "moba", "--shapes", "B=1,H=2,P=256,M=256,E=64,F=64,PB=4,MB=4,BS=64",
                        "--q-tile", "P=64", "--kv-tile", "M=64"], capsys)
    assert "input tensor Sel" in line and "--tensor Sel=random:0.5" in line and "einsum-ir analyze" in line
    assert "shapes={" not in line  # no Python advice for a shell user


def test_version_and_debug_anywhere(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert re.fullmatch(r"einsum-ir \S+\n", capsys.readouterr().out)
    path = tmp_path / "missing.ein"
    for argv in (["--debug", "print", str(path)], ["print", str(path), "--debug"], ["print", "--debug", str(path)]):
        with pytest.raises(FileNotFoundError):
            main(argv)
    assert main(["print", "--", "--debug"]) == 2  # after `--`, a name like any other


def test_help_lists_every_command_without_importing_the_upper_layers():
    """`einsum-ir --help` lists the upper layers' commands from einsum_ir.cli's table, which must
    say what the layers themselves register."""
    from einsum_ir.cli import build_parser

    assert build_parser(providers=()).format_help() == build_parser().format_help(), \
        "einsum_ir.cli.PROVIDED_COMMANDS must name every upper-layer command with its help line"
    code = ("import sys\nfrom einsum_ir.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'sympy', 'networkx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "analyze" in out and "tune" in out and out.strip().endswith("[]"), out


def test_check_imports_neither_torch_nor_sympy():
    code = ("import sys\nfrom einsum_ir.cli import main\nassert main(['check', 'softmax_causal']) == 0\n"
            "print(sorted(m for m in ('torch', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]"), out


def test_report_has_a_legend_for_every_column(capsys):
    assert main(["report", "--quiet", "softmax_causal"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[1]
    legend = out[out.index("columns:"):]
    for column in re.split(r"\s{2,}", header.strip()):
        assert re.search(rf"^  {re.escape(column)}  ", legend, re.M), (column, legend)
    assert "P=8192" in legend  # the shapes the bound uses


MOBA = ["--shapes", "B=1,H=2,P=256,M=256,E=64,F=64,PB=4,MB=4,BS=64"]
VARLEN = """dims B P M E F
input Q[b,p,e], K[b,m,e], V[b,m,f], Len[b]: int32
S[b,p,m] = Q[b,p,e] * K[b,m,e] where m < Len[b]
O[b,p,f] = S[b,p,m] * V[b,m,f]
output O
"""


def test_tensor_values_from_the_command_line(tmp_path, capsys):
    """--tensor NAME=1,2,3 (row-major values), NAME=random:P[:SEED] and NAME=file.pt."""
    import torch

    spec = tmp_path / "varlen.ein"
    spec.write_text(VARLEN)
    assert main(["analyze", str(spec), "--shapes", "B=3,P=8,M=8,E=4,F=4", "--tensor", "Len=3,5,7"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^S\s+480\s", out, re.M) and "depends on data" not in out  # 8 * 4 * (3 + 5 + 7)
    sel = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    sel[..., 0] = True  # every query block sees key block 0 only
    torch.save(sel, tmp_path / "sel.pt")
    assert main(["analyze", "moba", *MOBA, "--tensor", f"Sel={tmp_path / 'sel.pt'}"]) == 0
    points = 2 * 64 * sum(min(p + 1, 64) for p in range(256))  # heads x E x causal keys of block 0
    assert re.search(rf"^S\s+{points / 1e6:.3f}M\s", capsys.readouterr().out, re.M)
    args = ["simulate", "moba", *MOBA, "--q-tile", "P=64", "--kv-tile", "M=64"]
    assert main([*args, "--tensor", "Sel=random:0.3"]) == 0
    first = capsys.readouterr().out.split("simulated in")[0]
    assert main([*args, "--tensor", "Sel=random:0.3:0"]) == 0  # the default seed is 0
    assert capsys.readouterr().out.split("simulated in")[0] == first and "tile_speedup" in first


@pytest.mark.parametrize("value, message", [
    ("Sel=1,0,0,1", "--tensor Sel=1,0,0,1: Sel[b,h,pb,mb] has shape (1, 2, 4, 4) at --shapes, but the values give (4,)"),
    ("Sel=random:2", "--tensor Sel=random:2: the probability 2.0 is not between 0 and 1"),
    ("Sel=random:x", "--tensor Sel=random:x: random:P[:SEED] takes a probability and an integer seed"),
    ("Sel=1,a", "--tensor Sel=1,a: 'a' is not a number"),
    ("Nope=1", "--tensor Nope=1: expected NAME=SPEC for an input of the spec (Q, K, V, Sel)"),
    ("Sel=missing.pt", "missing.pt: No such file or directory"),
])
def test_bad_tensor_values_are_one_line_errors(value, message, capsys):
    assert _error_line(["analyze", "moba", *MOBA, "--tensor", value], capsys) == f"einsum-ir: error: {message}"


def test_a_file_that_is_not_a_tensor_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "bad.pt").write_text("not a tensor")
    line = _error_line(["analyze", "moba", *MOBA, "--tensor", f"Sel={tmp_path / 'bad.pt'}"], capsys)
    assert "is not a tensor saved with torch.save" in line


def test_a_huge_declared_tensor_is_refused_before_it_is_built(capsys):
    """Sel at P = M = 1e6 with blocks of 64 would be 3.9e9 entries: refused at once, naming the
    tensor, its entry count and the limit."""
    from einsum_ir.cost_model.cli import MAX_TENSOR_ENTRIES, TENSOR_HELP

    assert f"at most {MAX_TENSOR_ENTRIES:,} entries" in TENSOR_HELP  # --help states the limit

    start = time.perf_counter()
    line = _error_line(["analyze", "moba", "--shapes", "B=1,H=16,P=1000000,M=1000000,E=64,F=64,PB=15625,"
                        "MB=15625,BS=64", "--tensor", "Sel=random:0.1"], capsys)
    assert time.perf_counter() - start < 5
    assert line == (f"einsum-ir: error: --tensor Sel=random:0.1: Sel[b,h,pb,mb] has 1 x 16 x 15625 x 15625 = "
                    f"3.91e+09 entries at --shapes, more than the {MAX_TENSOR_ENTRIES:,} a command-line tensor "
                    f"may have; use smaller shapes or larger blocks")


@pytest.mark.parametrize("command", [["analyze"], ["simulate", "--q-tile", "P=64", "--kv-tile", "M=64"]])
@pytest.mark.parametrize("value, message", [
    ("1e30", "param W=1000000000000000000000000000000: an int param takes an integer that fits in int64"),
    ("-9223372036854775809", "param W=-9223372036854775809: an int param takes an integer that fits in int64"),
    ("nan", "param W=nan: an int param takes a finite number"),
])
def test_a_runtime_param_out_of_range_is_a_one_line_error_naming_it(command, value, message, capsys):
    line = _error_line([command[0], "softmax_window", "--shapes", f"B=1,H=2,P=256,M=256,E=64,F=64,W={value}",
                        *command[1:]], capsys)
    assert line.startswith(f"einsum-ir: error: {message}"), line
