# Two commands set everything up on a fresh machine:
#   make demo   - build shards from real and generated data, train, evaluate, save a model
#   make test   - lint, import contracts and the test suite
# Each creates the virtual environment (.venv) from nothing when it is missing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?= --durations=25

export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED = 0
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: demo test lint format bench clean env

env: $(STAMP)

$(STAMP): pyproject.toml setup.cfg constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,export]"
	@touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m launch.demo

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_shards.py
	$(BIN)/python benchmarks/bench_engine.py
	$(BIN)/python benchmarks/quality.py
	$(BIN)/python -m benchmarks.bench_e2e
	$(BIN)/python benchmarks/bench_tune.py
	$(BIN)/python benchmarks/bench_predict.py

clean:
	rm -rf demo_out runs .pytest_cache .ruff_cache
