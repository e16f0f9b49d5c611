"""Subcommands of `einsum-ir` from the codegen layer: `einsum-ir cache info|clear`.

Imported lazily by einsum_ir.cli, which calls `add_commands(subparsers)`. This module imports
only the standard library and codegen.cache, so the cache commands work without Triton.
"""
from __future__ import annotations

import argparse
import sys

from codegen import cache


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    if n < 1024:
        return f"{n} B"
    if n < 1024 ** 2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024 ** 2:.1f} MiB"


def format_info(report: dict) -> str:
    """The text `einsum-ir cache info` prints for a `cache.info()` report."""
    state = "enabled" if report["enabled"] else "disabled by EINSUM_IR_CACHE"
    lines = [f"einsum-ir cache: {report['location']} ({state})"]
    rows = [(kind, k["entries"], k["bytes"]) for kind, k in report["kinds"].items()]
    rows.append(("total", report["entries"], report["bytes"]))
    width = max(len(name) for name, _, _ in rows)
    lines += [f"  {name.ljust(width)}  {n:6d} entries  {human_bytes(size):>10}"
              for name, n, size in rows]
    return "\n".join(lines)


def cmd_cache_info(args: argparse.Namespace) -> int:
    try:
        print(format_info(cache.info()))
    except OSError as err:
        print(f"einsum-ir: cannot read the cache: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_cache_clear(args: argparse.Namespace) -> int:
    try:
        removed = cache.clear()
    except OSError as err:
        print(f"einsum-ir: cannot clear the cache: {err}", file=sys.stderr)
        return 1
    print(f"removed {removed} entries from {cache.cache_dir()}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `cache info` and `cache clear` on the `einsum-ir` subparsers."""
    p = subparsers.add_parser(
        "cache", help="the on-disk cache of generated kernels and choices",
        description="The on-disk cache of generated kernel sources and kernel choices. "
                    "Location: $EINSUM_IR_CACHE_DIR (default ~/.cache/einsum_ir); "
                    "EINSUM_IR_CACHE=0 disables it.")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("info", help="location, entries per kind, size").set_defaults(
        func=cmd_cache_info)
    actions.add_parser("clear", help="delete every entry").set_defaults(func=cmd_cache_clear)
