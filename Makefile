# `make test` on a fresh machine: makes .venv (unless a virtual environment is
# active), installs torch 2.13.0 only where torch is missing, then the package
# with its test extras, then runs the whole suite.

VENV ?= .venv
ifdef VIRTUAL_ENV
  BIN := $(VIRTUAL_ENV)/bin
else
  BIN := $(abspath $(VENV))/bin
endif
PYTHON := $(BIN)/python
STAMP := $(BIN)/../.e_dist-installed
# The environment's tools (ninja above all) before the system's.
export PATH := $(BIN):$(PATH)

.PHONY: setup test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test]"
	@touch $@

test: setup
	$(PYTHON) -m pytest -q tests

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(PYTHON) benchmarks/step_time.py

clean:
	rm -rf $(VENV) build *.egg-info
