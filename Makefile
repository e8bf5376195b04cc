# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-busy lint bench bench-micro install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench,cost,deploy,gpu,images]'
	touch $(STAMP)

install: $(STAMP)

## Build the example model, serve it, show one answer and a 10 s load, stop it with SIGTERM.
demo: $(STAMP)
	$(BIN)/python benchmarks/demo.py

## Lint, type-check, then every test.
test: $(STAMP) lint
	$(BIN)/python -m pytest -q

## The tests not marked slow (no server processes, no load, no long searches): under a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

## The full suite RUNS times in a row (default 5), every core kept busy by another process.
RUNS ?= 5
test-busy: $(STAMP)
	PYTHON=$(BIN)/python tests/stress.sh $(RUNS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## Every figure in docs/benchmarks.md, in one run on this machine (about 15 minutes; needs wrk).
bench: $(STAMP)
	@command -v wrk >/dev/null || { echo "bench needs wrk: apt-get install -y wrk"; exit 2; }
	$(BIN)/python benchmarks/suite.py

## pytest-benchmark micro-benchmarks of the hot path's parts.
bench-micro: $(STAMP)
	$(BIN)/python -m pytest benchmarks/micro --benchmark-only -p no:cacheprovider

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
