# Two commands: `make demo` (set up + main job) and `make test` (set up + whole test suite).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# On a machine with an NVIDIA GPU, pip's default torch (a CUDA build) is what we want; elsewhere the
# CPU build torch==2.13.0, which installs from local disk in seconds.
TORCH   ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
CONFIG  ?= configs/quickstart.yaml

.PHONY: setup setup-dev demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev,hf,deepspeed]"
	touch $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

demo: setup
	$(BIN)/pretrain train $(CONFIG)

test: setup-dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup-dev
	$(BIN)/ruff check pretrain tests

clean:
	rm -rf $(VENV) runs cache
