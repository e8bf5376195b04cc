# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

## Build the example model, serve it, show one answer and a 10 s load, stop it with SIGTERM.
demo: $(STAMP)
	$(BIN)/python benchmarks/demo.py

## Lint, type-check, then every test.
test: $(STAMP) lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## batchserve vs the HTTP ceiling vs naive FastAPI, one run on this machine (needs wrk).
bench: $(STAMP)
	@command -v wrk >/dev/null || { echo "bench needs wrk: apt-get install -y wrk"; exit 2; }
	mkdir -p build
	$(BIN)/batchserve example-model mlp -o build/mlp.onnx
	$(BIN)/python benchmarks/compare.py --model build/mlp.onnx --json build/compare-mlp.json \
		--batchserve-args "$(BATCHSERVE_ARGS)"

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
