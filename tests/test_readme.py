"""The README's quickstart is code a newcomer pastes first: it must run as written."""
import re
from pathlib import Path


def test_readme_quickstart_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S)
    assert block, "README.md has no ## Quickstart python block"
    exec(compile(block.group(1), "README.md:quickstart", "exec"), {})
