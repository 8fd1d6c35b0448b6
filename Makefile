# vendgate: every target creates .venv when missing; a second run only checks it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench loadtest clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,load]'
	touch $(STAMP)

demo: venv
	$(BIN)/vendgate demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy gateway protocol float_ledger admin_api terminal_sim loadtests

test: lint
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python -m loadtests.bench_all

loadtest: venv
	$(BIN)/python -m loadtests.run_locust

clean:
	rm -rf $(VENV) .vendgate build *.egg-info .pytest_cache .mypy_cache .ruff_cache
