# Everything runs from virtual environments this Makefile creates itself:
#   .venv        the package, its dependencies and the test/lint tools
#   .venv-bench  the package plus the peers it is benchmarked against (never in .venv)
PYTHON ?= python3
VENV := .venv
BENCH_VENV := .venv-bench
BIN := $(VENV)/bin
BENCH_BIN := $(BENCH_VENV)/bin

.PHONY: demo test chaos lint format bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

$(BENCH_BIN)/.installed: pyproject.toml bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_BIN)/python -m pip install --quiet --upgrade pip
	$(BENCH_BIN)/python -m pip install --quiet -e ".[rabbitmq,redis,postgresql]" -r bench/requirements.txt
	touch $@

demo: $(BIN)/.installed
	$(BIN)/conveyor demo

test: $(BIN)/.installed lint
	$(BIN)/python -m pytest -q

# The long chaos runs (100,000 tasks each under killed processes and brokers); the short ones
# are part of `make test`.
chaos: $(BIN)/.installed
	CONVEYOR_CHAOS=long $(BIN)/python -m pytest -m chaos -s -v

lint: $(BIN)/.installed
	$(BIN)/ruff check conveyor tests bench examples
	$(BIN)/ruff format --check conveyor tests bench examples
	$(BIN)/mypy

format: $(BIN)/.installed
	$(BIN)/ruff format conveyor tests bench examples
	$(BIN)/ruff check --fix conveyor tests bench examples

bench: $(BENCH_BIN)/.installed
	$(BENCH_BIN)/python -m bench

clean:
	rm -rf $(VENV) $(BENCH_VENV) .mypy_cache .pytest_cache .ruff_cache conveyor-demo.db*
