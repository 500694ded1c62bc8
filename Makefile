# Everything runs from virtual environments this Makefile creates itself, with the exact versions
# in uv.lock (committed), so every machine tests what main tested:
#   .venv-uv     uv itself, at the version pinned below (installed with pip, the one tool a new
#                machine has)
#   .venv        the package, its dependencies and the test/lint tools (uv.lock, group `dev`)
#   .venv-bench  the package plus the peers it is benchmarked against (group `bench`, never in .venv),
#                with bytecode compiled at install as pip does, so memory is measured as users run
#   .venv-latest the newest releases pyproject.toml allows, for `make test-latest` only
PYTHON ?= python3
UV_VERSION := 0.13.9
VENV := .venv
BENCH_VENV := .venv-bench
LATEST_VENV := .venv-latest
UV_VENV := .venv-uv
BIN := $(VENV)/bin
BENCH_BIN := $(BENCH_VENV)/bin
UV := $(UV_VENV)/bin/uv

# uv takes the interpreter named by PYTHON and never downloads one of its own.
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never

.PHONY: demo test test-latest upgrade chaos lint format bench clean

$(UV):
	$(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# One line, not a resolver's report, when pyproject.toml changed and the lock did not follow.
define check_lock
	@$(UV) lock --check --quiet 2>/dev/null \
	  || { echo "uv.lock does not match pyproject.toml: run 'make upgrade'" >&2; exit 1; }
endef

$(BIN)/.installed: pyproject.toml uv.lock | $(UV)
	$(check_lock)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen
	# The deployment page's image installs pinned requirements offline in a test: resolving them
	# here once puts the index pages that needs into uv's cache (a sync from the lock does not).
	$(UV) export --frozen --no-dev --no-emit-project --extra rabbitmq --extra redis --quiet \
	  | $(UV) pip compile --quiet --no-header - -o /dev/null
	touch $@

$(BENCH_BIN)/.installed: pyproject.toml uv.lock | $(UV)
	$(check_lock)
	UV_PROJECT_ENVIRONMENT=$(BENCH_VENV) $(UV) sync --frozen --no-dev --group bench --compile-bytecode
	touch $@

demo: $(BIN)/.installed
	$(BIN)/conveyor demo

test: $(BIN)/.installed lint
	$(BIN)/python -m pytest -q

# Refresh uv.lock to the newest releases pyproject.toml allows, and the environments with it.
upgrade: | $(UV)
	$(UV) lock --upgrade
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen
	touch $(BIN)/.installed

# The suite against the newest releases instead of the lock (not part of CI): upstream breakage
# shows up here before a user meets it. Says which versions differ from the lock, then tests.
test-latest: | $(UV)
	$(UV) venv --quiet --allow-existing $(LATEST_VENV)
	$(UV) pip install --quiet --python $(LATEST_VENV)/bin/python --upgrade -e . --group dev
	$(LATEST_VENV)/bin/python .ci/lock_drift.py uv.lock
	$(LATEST_VENV)/bin/python -m pytest -q

# The long chaos runs (100,000 tasks each under killed processes and brokers); the short ones
# are part of `make test`.
chaos: $(BIN)/.installed
	CONVEYOR_CHAOS=long $(BIN)/python -m pytest -m chaos -s -v

lint: $(BIN)/.installed
	$(BIN)/ruff check conveyor tests bench examples .ci
	$(BIN)/ruff format --check conveyor tests bench examples .ci
	$(BIN)/mypy

format: $(BIN)/.installed
	$(BIN)/ruff format conveyor tests bench examples .ci
	$(BIN)/ruff check --fix conveyor tests bench examples .ci

bench: $(BENCH_BIN)/.installed
	$(BENCH_BIN)/python -m compileall -q conveyor  # the project's own bytecode, as pip writes it
	$(BENCH_BIN)/python -m bench

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(LATEST_VENV) $(UV_VENV) .mypy_cache .pytest_cache .ruff_cache \
	  conveyor-demo.db*
