# One entry point for set-up, tests and benchmarks. Everything runs in ./.venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test test-fast bench eval-shared clean

$(BIN)/cascade: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/cascade

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python bench/policy_bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache
