"""Start-up wall time of einsum-ir, and the heavy modules each command pulls in.

Targets (issue 15): `import einsum_ir` under 0.5 s and without torch; `einsum-ir --help` and
`einsum-ir check SPEC` under 1 s. A benchmark that prints its figures, not a test. Each
command runs in a fresh interpreter, as the console script does.

    python scripts/startup.py [--runs 7] [--spec examples/my_variant.ein]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "sympy", "networkx", "triton")
CLI = "import sys\nfrom einsum_ir.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
REPORT = f"\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules) or '-', file=sys.stderr)\n"


def wall(code: str, runs: int) -> tuple[float, float]:
    """(min, median) seconds of `python -c code` over `runs` runs."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def heavy_modules(code: str) -> str:
    """The modules of HEAVY that `code` leaves imported."""
    err = subprocess.run([sys.executable, "-c", code + REPORT], cwd=ROOT, capture_output=True,
                         text=True, check=True).stderr
    return err.strip().splitlines()[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="runs per command (default 7)")
    ap.add_argument("--spec", default="examples/my_variant.ein", help="the spec `check` reads")
    args = ap.parse_args()
    rows = [("python -c pass", "import sys", None),
            ('python -c "import einsum_ir"', "import sys, einsum_ir", 0.5),
            ("einsum-ir --help", CLI.format(argv=["--help"]), 1.0),
            (f"einsum-ir check {args.spec}", CLI.format(argv=["check", args.spec]), 1.0)]
    print(f"{'command':<44} {'min s':>6} {'median s':>9} {'target':>7}  heavy modules imported")
    for label, code, target in rows:
        best, median = wall(code, args.runs)
        goal = f"< {target:g}" if target else ""
        print(f"{label:<44} {best:6.2f} {median:9.2f} {goal:>7}  {heavy_modules(code)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
