# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-busy lint bench bench-micro install lock clean

# Every dependency at the version in constraints.txt, the lock (`make lock` refreshes it).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test,bench,cost,deploy,gpu,images,otel]'
	touch $(STAMP)

install: $(STAMP)

## Recompile constraints.txt from pyproject.toml (dependencies and every extra) and constraints.in,
## for every platform and Python >= 3.11. Pins still allowed are kept; UPGRADE=1 moves every
## package to its newest allowed release. Needs PyPI; uv goes into its own venv under build/.
UV_VERSION ?= 0.13.9
LOCK_TOOLS := build/lock-tools
lock:
	test -d $(LOCK_TOOLS) || $(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/pip install -q 'uv==$(UV_VERSION)'
	$(LOCK_TOOLS)/bin/uv pip compile pyproject.toml constraints.in --all-extras --universal \
	  --python-version 3.11 $(if $(UPGRADE),--upgrade) --custom-compile-command 'make lock' \
	  --quiet -o constraints.txt

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
