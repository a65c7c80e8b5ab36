# Quick start: `make demo` and `make test`. Both build (or reuse) the local virtualenv .venv.
# The torch pin lives here only; the package itself asks for torch>=2.3.
# torch 2.14.1 + torchvision 0.29.1: on x86_64 Linux PyPI ships these as CUDA builds (~5.5 GB in the venv, also
# for CPU-only use). A lighter pair does not keep `make test` whole: torchvision is needed (torch-fidelity, behind
# `disploss evaluate` and its tests, imports it), and the one CPU-only torch at hand, 2.13.0+cpu (~1 GB), has no
# PyPI torchvision that imports beside it (torchvision 0.28.0: "operator torchvision::nms does not exist", checked
# in a separate venv on 2026-12-01). CPU-only wheels of both come from PyTorch's own index, which is not PyPI.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.disploss-installed

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[all,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/disploss demo

# The layering contracts (import-linter) and ruff run before the tests: a broken layer fails `make test`; so does a
# test module importing another (their shared helpers live in tests/trainkit.py).
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples experiments train.py sample.py sample_ddp.py
	$(BIN)/ruff format --check src tests benchmarks examples experiments train.py sample.py sample_ddp.py
	$(BIN)/lint-imports
	@! grep -nE '^\s*(from|import) test_' tests/*.py || (echo 'a test module imports another: shared helpers go in tests/trainkit.py'; false)

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/disploss bench --quick

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
