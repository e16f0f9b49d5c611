"""The README's quickstart is code a newcomer pastes first: it must run as written."""
import re
from pathlib import Path


def test_readme_quickstart_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S)
    assert block, "README.md has no ## Quickstart python block"
    exec(compile(block.group(1), "README.md:quickstart", "exec"), {})


def test_readme_check_and_print_commands_run_from_the_repository_root(monkeypatch, capsys):
    """The first command a newcomer types, `einsum-ir check ...`, names a file that ships."""
    from einsum_ir.cli import main

    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    commands = re.findall(r"^einsum-ir ((?:check|print) \S+)", readme, re.M)
    assert any(c.startswith("check ") for c in commands), "README has no `einsum-ir check` line"
    monkeypatch.chdir(root)
    for command in commands:
        assert main(command.split()) == 0, (command, capsys.readouterr().err)
