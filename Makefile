# Set-up and the two everyday commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint install system-packages

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Run the demo: embedded broker, synthetic cameras, the whole pipeline, a summary.
demo: install
	$(BIN)/python -m bytewax.run flows.video

## Install what the tests need (PostgreSQL, Prometheus) and run them.
system-packages:
	bash .ci/install-system-packages.sh

test: install system-packages
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

## The quick loop while editing: ruff and the unit tests (about a minute).
check: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not integration"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
