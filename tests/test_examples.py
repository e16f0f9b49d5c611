"""The examples a newcomer runs first must keep running (CPU, well under a minute each) and
must keep agreeing with the plain-PyTorch results they print beside their own."""
from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"
EXPECTED = {
    "quickstart": "passes over M: 2",
    "custom_variant": "passes over M: softplus 1, softmax 3",
    "sparse_video": "3-D run",
    "layer_routing": "static (MASFormer): layers routed full, window, window, full",
}


def _run(name: str, capsys) -> str:
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    out = capsys.readouterr().out
    errors = [float(x) for x in re.findall(r"max \|[^|]*\| = ([-+0-9.e]+)", out)]
    assert errors and max(errors) < 1e-4, out
    return out


@pytest.mark.parametrize("name", EXPECTED)
def test_example_runs(name, capsys):
    assert EXPECTED[name] in _run(name, capsys)


def test_layer_routing_example_routes_by_input(capsys):
    """The router's choice depends on the layer input: both kernels are used, each matches SDPA."""
    out = _run("layer_routing", capsys)
    routed = re.search(r"routed per input \(Flux\): layers routed ([a-z, ]+);", out).group(1).split(", ")
    assert len(routed) == 4 and set(routed) == {"full", "window"}, out


@pytest.mark.slow
def test_hf_example_runs(capsys):
    pytest.importorskip("transformers", reason="transformers is not installed (extra 'hf')")
    assert "2 attention sites replaced" in _run("hf_llama", capsys)


def test_context_parallel_example_runs():
    """Its ranks are spawned processes, so it runs as the script it is."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(EXAMPLES / "context_parallel.py")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = [float(x) for x in re.findall(r"max \|[^|]*\| [^=]*= ([-+0-9.e]+)", done.stdout)]
    assert len(errors) == 2 and max(errors) < 1e-4, done.stdout
    assert "communication is hidden" in done.stdout
