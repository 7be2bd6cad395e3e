# The two commands the README promises: `make run` and `make test`.
# Each creates .venv and installs what it needs on a fresh machine (Python 3.11+).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config/exchange.toml

.PHONY: run test bench venv clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "exchange needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@ $(VENV)/.installed

venv: $(VENV)/.installed

# Start the exchange on the embedded SQLite default (config/exchange.toml).
run: $(VENV)/.installed
	$(BIN)/exchange db upgrade --config $(CONFIG)
	$(BIN)/exchange serve --config $(CONFIG)

# The whole test suite, one pytest-xdist worker per core (every test has its own
# database, temporary directory and ports). PostgreSQL tests use EXCHANGE_TEST_POSTGRES
# (default: the local server on 127.0.0.1:5432, database test).
TEST_WORKERS ?= auto
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The intake benchmark (see README "Benchmarks").
bench: $(VENV)/.installed-test
	$(BIN)/python -m bench.intake $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
