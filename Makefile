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

# Lint, type-check and run the whole test suite (what CI runs). Work stealing keeps
# both cores busy to the end: the few long subprocess tests would otherwise finish alone.
test: $(BIN)/perksync lint
	$(BIN)/pytest -q -n auto --dist worksteal

lint: $(BIN)/perksync
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(BIN)/perksync
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
