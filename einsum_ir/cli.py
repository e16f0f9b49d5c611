"""The `einsum-ir` command line: check and print specs, and the catalog report (the main job).

Upper layers add their own subcommands (`analyze`, `simulate`, ...) and report columns. They
are imported only when used, so a broken optional layer never stops `check` from working, and
`check`, `print`, `--help` and `--version` do not wait seconds for sympy and torch.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
import time
from collections.abc import Collection
from typing import Callable

from einsum_ir import variants
from einsum_ir.variants import load_spec
from einsum_ir.errors import BindError, LoweringError, SpecError, TensorValuesNeeded

# The upper layers' subcommands: the module that adds each one (`add_commands(subparsers)`),
# in layer order, and the help line `einsum-ir --help` shows for it without importing the
# module. tests/test_cli.py checks these lines against what the modules register.
PROVIDED_COMMANDS = {
    "analyze": ("einsum_ir.cost_model.cli", "passes, op/byte counts and the roofline bound of a cascade"),
    "simulate": ("einsum_ir.cost_model.cli", "tile-level sparsity simulation of a cascade's predicates"),
    "grad": ("einsum_ir.lowering.cli", "the backward cascades of a cascade (reverse-mode, derived)"),
    "cache": ("einsum_ir.codegen.cli", "the on-disk cache of generated kernels, choices and AOT facts"),
    "tune": ("einsum_ir.codegen.cli", "autotuning candidates, prune reasons and (on a GPU) timings"),
}
COMMAND_PROVIDERS = tuple(dict.fromkeys(module for module, _ in PROVIDED_COMMANDS.values()))
# Modules that add report columns (`report_columns(name, cascade) -> dict[str, str]`, and
# `COLUMN_LEGEND`, what each column means), in layer order.
COLUMN_PROVIDERS = ("einsum_ir.cost_model.report", "einsum_ir.lowering.report", "einsum_ir.codegen.report")
# Modules that add sections to `einsum-ir analyze` (`analyze_section(cascade, shapes, device, dtype) -> str`).
ANALYZE_PROVIDERS = ("einsum_ir.lowering.report",)
USER_ERRORS = (SpecError, BindError, LoweringError, OSError, KeyError, ValueError)
COLUMN_LEGEND = {
    "variant": "catalog name (`einsum-ir print NAME` shows its spec)",
    "ranks": "the dims the spec declares",
    "einsums": "Einsums in the cascade",
    "outputs": "its output tensors",
    "self-check": "max abs error of the interpreter against an independent plain-PyTorch "
                  "formula, at a small shape",
}


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
        print(f"{spec}: ok ({len(c.einsums)} Einsums, ranks {' '.join(c.rank_names)}, outputs {outs})")
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


def format_legend(rows: list[dict[str, str]], legends: dict[str, str]) -> str:
    """What each column of the table means, for the columns `rows` have."""
    columns = [c for c in dict.fromkeys(k for row in rows for k in row) if c in legends]
    width = max(map(len, columns), default=0)
    return "\n".join(["columns:"] + [f"  {c.ljust(width)}  {legends[c]}" for c in columns])


def cmd_report(args: argparse.Namespace) -> int:
    names = args.variants or variants.names()
    start = time.time()
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    rows = report_rows(names, fast=args.fast, progress=progress)
    legends = dict(COLUMN_LEGEND)
    for provider in [] if args.fast else filter(None, map(_optional, COLUMN_PROVIDERS)):
        legends.update(provider.COLUMN_LEGEND)
    print(f"einsum-ir catalog: {len(rows)} variants")
    print(format_table(rows))
    print()
    print(format_legend(rows, legends))
    failed = [r["variant"] for r in rows if r["self-check"].startswith("FAIL")
              or float(r["self-check"]) > 1e-3]
    print(f"\nself-check: {len(rows) - len(failed)}/{len(rows)} within 1e-3 "
          f"({time.time() - start:.1f} s)")
    return 1 if failed else 0


def _version() -> str:
    try:
        return importlib.metadata.version("einsum-ir")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def build_parser(providers: Collection[str] = COMMAND_PROVIDERS) -> argparse.ArgumentParser:
    """The command line, with the subcommands of the modules in `providers`; the other upper
    layers' subcommands are listed by name and help only (see `providers_for`)."""
    parser = argparse.ArgumentParser(prog="einsum-ir", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show Python tracebacks (anywhere on the line)")
    parser.add_argument("--version", action="version", version=f"einsum-ir {_version()}")
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
        if module not in providers:
            for name, (owner, help_line) in PROVIDED_COMMANDS.items():
                if owner == module:
                    sub.add_parser(name, help=help_line)
            continue
        provider = _optional(module)
        if provider is not None:
            provider.add_commands(sub)
    return parser


def providers_for(command: str | None) -> tuple[str, ...]:
    """The modules to import for `command`: its provider; none for a built-in command or for
    none at all (`--help`, `--version`); every one for a name no provider is known to add."""
    if command in PROVIDED_COMMANDS:
        return (PROVIDED_COMMANDS[command][0],)
    return () if command in (None, "check", "print", "report") else COMMAND_PROVIDERS


def _split_debug(argv: list[str]) -> tuple[bool, list[str]]:
    """`--debug` may come anywhere before a bare `--`; the rest of the line without it."""
    end = argv.index("--") if "--" in argv else len(argv)
    rest = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    return len(rest) < len(argv), rest


class _Sections:
    """The upper layers' sections of `einsum-ir analyze`, imported when it prints them."""

    def __iter__(self):
        return (m.analyze_section for m in map(_optional, ANALYZE_PROVIDERS) if m is not None)


def check_bindings(args: argparse.Namespace) -> None:
    """A subcommand that takes a spec and `--shapes` (analyze, simulate, grad, tune) binds only
    the spec's dims and runtime params: a misspelt name is an error, not silently ignored."""
    if not getattr(args, "shapes", None) or not hasattr(args, "spec"):
        return
    from einsum_ir.cost_model.cli import parse_assignments

    c = load_spec(args.spec)
    known = [*c.dims, *(p.name for p in c.params if p.type is not None)]
    for option in ("shapes", "params"):
        for name, value in parse_assignments(getattr(args, option, "") or "", f"--{option}").items():
            if name not in known:
                raise ValueError(f"--{option} {name}={value}: {args.spec} has no dim or runtime "
                                 f"param {name} (it has {', '.join(known)})")


def describe(err: Exception, args: argparse.Namespace) -> str:
    """The one line (or, for a spec error, the located lines) the CLI prints for `err`."""
    if isinstance(err, SpecError):
        return f"einsum-ir: {err}"  # already `file:line:col: error: ...` and a caret
    if isinstance(err, TensorValuesNeeded):
        spec = getattr(args, "spec", "the spec")
        message = (f"{args.command} needs the values of {spec}'s input tensor {err.tensor} (its "
                   f"mask reads them): pass them with --tensor {err.tensor}=random:0.5 (a fixed-seed "
                   f"random mask), --tensor {err.tensor}=1,0,... or --tensor {err.tensor}=file.pt; "
                   f"without them `einsum-ir analyze` bounds it as if every entry were true")
    elif isinstance(err, OSError) and err.filename is not None:
        message = f"{err.filename}: {err.strerror}"
    elif isinstance(err, KeyError) and err.args:
        message = err.args[0]
    else:
        message = str(err)
    return f"einsum-ir: error: {message}"


def main(argv: list[str] | None = None) -> int:
    debug, argv = _split_debug(sys.argv[1:] if argv is None else list(argv))
    command = next((a for a in argv if not a.startswith("-")), None)  # top-level flags take no values
    args = build_parser(providers_for(command)).parse_args(argv)
    args.sections = _Sections()
    try:
        check_bindings(args)
        return args.func(args)
    except USER_ERRORS as err:
        if debug:
            raise
        print(describe(err, args), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
