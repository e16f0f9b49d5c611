"""Wall time and peak memory of einsum-ir at the limits: `analyze` at huge shapes, `check` of a
very long spec, and parsing of very long and deeply nested expressions.

Targets (issue 15): `einsum-ir analyze` under 2 s and 200 MB at any shape up to 1e12 tokens,
and with the values of a block mask (`--tensor`) at 4096 tokens; a --tensor too large to build
refused at once; checking a 10,000-line spec under 2 s. A benchmark that prints its figures, not a test. Each
command runs in a fresh interpreter, as the console script does; the peak is the process's
maximum resident set.

    python scripts/limits.py [--variants softmax_causal,nbhd_1d] [--tokens 1e6,1e8,1e12]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"B": 1, "H": 16, "E": 128, "F": 128, "N": 64, "R": 4, "G": 4, "BS": 64, "W": 4096, "NS": 4,
          "ST": 16, "cap": 50, "WX": 81, "WY": 81, "SX": 16, "SY": 16}


def measure(argv: list[str]) -> tuple[float, float, float, int, str]:
    """(wall seconds, CPU seconds, peak RSS in MB, exit code, the error line of stderr) of
    `einsum-ir ARGV`; the CPU time is the steadier figure on a shared machine."""
    code = "import sys\nfrom einsum_ir.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    error = next((line[line.index("error"):] for line in err.splitlines() if "error" in line), "")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, proc.returncode, error


def shapes(variant: str, tokens: int) -> str:
    """--shapes for a catalog variant with `tokens` queries and keys (2-D layouts: a square)."""
    import einsum_ir as ei

    c = ei.variants.load(variant)
    side = int(round(tokens ** 0.5))
    values = {**SHAPES, "P": tokens, "M": tokens, "PB": tokens // 64, "MB": tokens // 64,
              "PX": side, "PY": side, "MX": side, "MY": side}
    return ",".join(f"{n}={values[n]}" for n in [*c.dims, *(p.name for p in c.params if p.type)])


def long_spec(lines: int) -> str:
    """A spec of `lines` lines: a chain of masked Einsums, each reading the two before it."""
    out = ["dims P M E F", "param scale = 1/sqrt(E)", "input Q[p,e], K[m,e], V[m,f]",
           "S0[p,m] = Q[p,e] * K[m,e] * scale"]
    n = lines - 6
    out += [f"S{i}[p,m] = S{i - 1}[p,m] * 0.5 + S{max(0, i - 2)}[p,m] where m <= p" for i in range(1, n)]
    return "\n".join(out + [f"O[p,f] = S{n - 1}[p,m] * V[m,f]", "output O"]) + "\n"


def expression_spec(body: str) -> str:
    return f"dims P M E\ninput Q[p,e], K[m,e]\nS[p,m] = {body}\noutput S\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="softmax_causal,softmax_window,sinks_window,nbhd_1d,nbhd_2d,moba",
                    help="catalog variants to analyze")
    ap.add_argument("--tokens", default="1e6,1e8,1e12", help="query and key counts to analyze at")
    args = ap.parse_args()
    rows = []
    for variant in args.variants.split(","):
        for tokens in (int(float(t)) for t in args.tokens.split(",")):
            rows.append((f"analyze {variant} P=M={tokens:.0e}", ["analyze", variant, "--shapes",
                                                                shapes(variant, tokens)], "< 2 s, < 200 MB"))
    moba = "B=1,H=2,P={n},M={n},E=64,F=64,PB={b},MB={b},BS=64"
    rows.append(("analyze moba P=M=4096 --tensor Sel=random", ["analyze", "moba", "--shapes",
                 moba.format(n=4096, b=64), "--tensor", "Sel=random:0.1"], "< 2 s, < 200 MB"))
    rows.append(("analyze moba P=M=1e6 --tensor (3.9e9, refused)", ["analyze", "moba", "--shapes",
                 moba.format(n=10**6, b=15625).replace("H=2", "H=16"), "--tensor", "Sel=random:0.1"],
                 "refused at once"))
    with tempfile.TemporaryDirectory() as tmp:
        files = {"10,000-line spec": long_spec(10_000),
                 "1,000-term sum": expression_spec(" + ".join(["Q[p,e] * K[m,e]"] * 1000)),
                 "200 nested ( (error)": expression_spec("(" * 200 + "Q[p,e] * K[m,e]" + ")" * 200),
                 "5,000 unary - (error)": expression_spec("-" * 5000 + "Q[p,e] * K[m,e]")}
        for label, text in files.items():
            path = Path(tmp) / f"{len(rows)}.ein"
            path.write_text(text)
            rows.append((f"check {label}", ["check", str(path)], "< 2 s" if "10,000" in label else ""))
        print(f"{'command':<48} {'wall s':>7} {'cpu s':>6} {'peak MB':>8} {'exit':>4}  {'target':<16} error")
        for label, argv, target in rows:
            wall, cpu, peak, code, err = measure(argv)
            print(f"{label:<48} {wall:7.2f} {cpu:6.2f} {peak:8.0f} {code:>4}  {target:<16} {err[:50]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
