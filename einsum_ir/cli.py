"""The `einsum-ir` command line: check and print specs, and the catalog report (the main job).

Upper layers add their own subcommands (`analyze`, `simulate`, ...) and report columns; they
are imported lazily so a broken optional layer never stops `check` from working.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Callable

from einsum_ir import variants
from einsum_ir.variants import load_spec
from einsum_ir.errors import BindError, LoweringError, SpecError

# Modules that may add subcommands (`add_commands(subparsers)`) and report columns
# (`report_columns(name, cascade) -> dict[str, str]`), in layer order.
COMMAND_PROVIDERS = ("einsum_ir.cost_model.cli", "einsum_ir.lowering.cli", "einsum_ir.codegen.cli")
COLUMN_PROVIDERS = ("einsum_ir.cost_model.report", "einsum_ir.lowering.report", "einsum_ir.codegen.report")
# Modules that add sections to `einsum-ir analyze` (`analyze_section(cascade) -> str`).
ANALYZE_PROVIDERS = ("einsum_ir.lowering.report",)
USER_ERRORS = (SpecError, BindError, LoweringError, FileNotFoundError, KeyError, ValueError)


def _optional(module: str):
    """Import an upper-layer module, or None when it (or what it needs) is absent."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def cmd_check(args: argparse.Namespace) -> int:
    status = 0
    for spec in args.specs:
        try:
            c = load_spec(spec)
        except SpecError as err:
            print(err, file=sys.stderr)
            status = 1
            continue
        outs = ", ".join(c.output_names)
        print(f"{spec}: ok ({len(c.einsums)} Einsums, ranks {' '.join(c.ranks)}, outputs {outs})")
    return status


def cmd_print(args: argparse.Namespace) -> int:
    print(load_spec(args.spec), end="")
    return 0


def report_rows(names: list[str], fast: bool = False,
                progress: Callable[[str], None] | None = None) -> list[dict[str, str]]:
    """One row per catalog variant; upper layers contribute their columns when installed."""
    from einsum_ir.variants.formulas import self_check

    providers = [m for m in map(_optional, COLUMN_PROVIDERS) if m is not None]
    rows = []
    for k, name in enumerate(names):
        if progress:
            progress(f"[{k + 1}/{len(names)}] {name}")
        c = variants.load(name)
        row = {"variant": name, "ranks": " ".join(c.ranks), "einsums": str(len(c.einsums)),
               "outputs": ", ".join(c.output_names)}
        try:
            row["self-check"] = f"{self_check(name):.1e}"
        except Exception as err:  # a failed check is a finding to show, not a crash
            row["self-check"] = f"FAIL: {err}"
        if not fast:
            for provider in providers:
                try:
                    row.update(provider.report_columns(name, c))
                except Exception as err:
                    row[provider.__name__.split(".")[0]] = f"error: {err}"
        rows.append(row)
    return rows


MAX_CELL = 40  # longer cells (reasons, errors) move to numbered notes under the table


def format_table(rows: list[dict[str, str]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    notes: dict[str, int] = {}
    cells = []
    for row in rows:
        shown = {}
        for c in columns:
            text = row.get(c, "")
            if len(text) > MAX_CELL:
                number = notes.setdefault(text, len(notes) + 1)
                head = text.split(":")[0] if ":" in text[:MAX_CELL] else text[:MAX_CELL - 8] + "..."
                text = f"{head} [{number}]"
            shown[c] = text
        cells.append(shown)
    widths = {c: max(len(c), *(len(row[c]) for row in cells)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns),
             "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(row[c].ljust(widths[c]) for c in columns) for row in cells]
    lines += [""] * bool(notes) + [f"[{n}] {text}" for text, n in notes.items()]
    return "\n".join(line.rstrip() for line in lines)


def cmd_report(args: argparse.Namespace) -> int:
    names = args.variants or variants.names()
    start = time.time()
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    rows = report_rows(names, fast=args.fast, progress=progress)
    print(f"einsum-ir catalog: {len(rows)} variants")
    print(format_table(rows))
    failed = [r["variant"] for r in rows if r["self-check"].startswith("FAIL")
              or float(r["self-check"]) > 1e-3]
    print(f"\nself-check: interpreter vs an independent plain-PyTorch formula, max abs error "
          f"at a small shape; {len(rows) - len(failed)}/{len(rows)} within 1e-3 "
          f"({time.time() - start:.1f} s)")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="einsum-ir", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="parse and validate .ein specs (paths or catalog names)")
    p.add_argument("specs", nargs="+")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("print", help="print a spec in canonical form")
    p.add_argument("spec")
    p.set_defaults(func=cmd_print)

    p = sub.add_parser("report", help="the catalog report: every variant, checked")
    p.add_argument("variants", nargs="*", help="variant names (default: the whole catalog)")
    p.add_argument("--fast", action="store_true", help="skip the upper layers' columns")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_report)

    for module in COMMAND_PROVIDERS:
        provider = _optional(module)
        if provider is not None:
            provider.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.sections = [m.analyze_section for m in map(_optional, ANALYZE_PROVIDERS) if m is not None]
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"einsum-ir: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
