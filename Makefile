# trendcast: `make up` runs the whole pipeline on the embedded default, `make test` the tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= $(shell command -v python3.11 || command -v python3)
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= train,embedded,bench,dev,tracing

.PHONY: install test test-all lint format up bench bench-offline bench-chaos bench-throughput bench-lookup bench-scale clean

install: $(STAMP)  ## Create ./.venv with everything (idempotent; fast when done)

$(STAMP): pyproject.toml stream/inference/_recordfmt.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	@touch $(STAMP)

test: install  ## Fast suite (unit + integration on Tansu and Redis); slow tests excluded
	$(PY) -m pytest

test-all: install  ## Everything, slow tests included
	$(PY) -m pytest -m ''

lint: install  ## ruff (lint + format check), strict mypy, the layering contracts (import-linter)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

up: install  ## Embedded default: Tansu + Redis, small bundle, worker, replay, live forecasts
	$(VENV)/bin/trendcast up

bench: bench-offline bench-chaos bench-throughput  ## All benchmarks (need ../shared/data)

bench-offline: install  ## LSTM vs baselines, AutoETS, LightGBM on the full data (~20 min)
	$(PY) bench/offline.py

bench-chaos: install  ## Crash, rebalance, Redis outage, hostile input, broker restart, failover, flush (~6 min)
	$(PY) bench/chaos.py

bench-throughput: install  ## Live and catch-up workloads, a 20,000-item close, real time (<10 min)
	$(PY) bench/throughput.py

bench-lookup: install  ## GET /forecasts lookups/s and p99 on a real worker and Redis (~2 min)
	$(PY) bench/lookup.py

bench-scale: install  ## One daily close of 10^4, 10^5, 10^6 items, 1 and 2 workers (~15 min)
	$(PY) bench/scale.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache artifacts
