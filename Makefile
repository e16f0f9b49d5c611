# Two commands do all the set-up on a fresh clone:  `make demo`  and  `make test`.
# Both create (or reuse) the virtual environment in .venv. torch is pinned so that a CPU-only
# machine takes the CPU wheel instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

.PHONY: demo test setup clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,triton,hf,mlir]' $(TORCH)
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/einsum-ir report

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
