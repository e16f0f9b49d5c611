"""The layering holds (DESIGN section 1): imports point down einsum_ir (the IR) -> cost_model ->
lowering -> codegen, read from the source. The facade (`einsum_ir/__init__.py`), the CLI and
the integrations sit above every layer. The installed distribution has one top-level name."""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"einsum_ir": 0, "einsum_ir.cost_model": 1, "einsum_ir.lowering": 2, "einsum_ir.codegen": 3}
FOLDERS = {"einsum_ir": "einsum_ir", "cost_model": "einsum_ir.cost_model", "lowering": "einsum_ir.lowering",
           "codegen": "einsum_ir.codegen"}
ABOVE = {"einsum_ir", "einsum_ir.cli"}  # the facade and the CLI may reach every layer
TOP = 9


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package] + parts)] = path
    return out


def layer(module: str) -> int:
    if module in ABOVE or module.startswith("einsum_ir.integrations"):
        return TOP
    return max(v for k, v in LAYERS.items() if module == k or module.startswith(k + "."))


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every einsum_ir import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from einsum_ir import variants` imports the submodule, not the facade
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = subs if all(m in modules() for m in subs) else [node.module]
        out += [(n, id(node) in top) for n in names if n.split(".")[0] in ("einsum_ir", *FOLDERS)]
    return out


def test_imports_point_down():
    bad = []
    for module, path in modules().items():
        for target, _ in imports(path):
            if target.split(".")[0] in ("cost_model", "lowering", "codegen"):
                bad.append(f"{module} imports {target}: the installed name is einsum_ir.{target}")
            elif layer(target) > layer(module):
                bad.append(f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})")
    assert not bad, "\n".join(bad)


def test_module_level_imports_have_no_cycle():
    g = nx.DiGraph()
    mods = modules()
    for module, path in mods.items():
        for target, at_top in imports(path):
            if at_top and target in mods and target != module:
                g.add_edge(module, target)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, cycles


def test_the_cpu_path_never_imports_triton():
    code = ("import sys, torch, einsum_ir as ei\n"
            "from einsum_ir.codegen.cpu_emit import compile_cpu\n"
            "k = compile_cpu(ei.variants.load('softmax_causal'))\n"
            "q = torch.randn(1, 1, 8, 4)\n"
            "k(Q=q, K=q, V=q)\n"
            "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('einsum_ir.codegen')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out.strip().splitlines()[-1])  # noqa: S307 - our own printout
    assert "triton" not in loaded and "einsum_ir.codegen.kernel" not in loaded, loaded


def test_one_top_level_name_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "einsum_ir" or p.startswith("einsum_ir.") for p in config["packages"])
    assert set(config["package-dir"].values()) == set(FOLDERS)
    for package, folder in config["package-dir"].items():
        assert FOLDERS[folder] == package
