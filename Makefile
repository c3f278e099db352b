# Everything installs into ./.venv; nothing is needed on the machine but python3 (3.11+).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint check bench clean

$(BIN)/perksync: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Run the README's shop example in store mode (--sync-now passes, then the service and a
# webhook) against loopback fakes.
demo: $(BIN)/perksync
	$(BIN)/python -m tests.fakes.demo

# Lint, type-check and run the whole test suite (what CI runs). Many tests wait on
# subprocesses and sockets, so half again as many workers as cores keeps the cores
# busy; work stealing keeps them busy to the end (the few long subprocess tests would
# otherwise finish alone).
test: $(BIN)/perksync lint
	$(BIN)/pytest -q -n $$(( $$(nproc) * 3 / 2 )) --dist worksteal

lint: $(BIN)/perksync
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(BIN)/perksync
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
