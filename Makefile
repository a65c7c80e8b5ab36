# Quick start: `make demo` and `make test`. Both build (or reuse) the local virtualenv .venv.
# The CPU-friendly torch pin lives here only; the package itself asks for torch>=2.3.
# torch 2.14.1 + torchvision 0.29.1 is the pair whose torchvision imports (torch-fidelity needs it).
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

# The layering contracts (import-linter) and ruff run before the tests: a broken layer fails `make test`.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples train.py sample.py sample_ddp.py
	$(BIN)/ruff format --check src tests benchmarks examples train.py sample.py sample_ddp.py
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/disploss bench --quick

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
