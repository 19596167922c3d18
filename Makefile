# Two entry points for a fresh machine: `make run` (the main job on built-in data) and
# `make test` (lint + tests). Both create .venv and install the package when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SUITE ?= quick
ENCODER ?=

DENSE_STAMP := $(VENV)/.dense-stamp

.PHONY: install install-dense run test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# dense tasks: mmdet + mmseg, and mmcv 2.1.0 with ops built for this torch (about 13 minutes
# on 2 cores the first time; the wheel is cached in ~/.cache/ibot-bench/wheels and reused)
$(DENSE_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,dense,slurm]'
	$(BIN)/ibot-bench setup-dense
	touch $(DENSE_STAMP)

install-dense: $(DENSE_STAMP)

# the main job: the `quick` suite on built-in data, leaderboard in results/quick/
run: $(STAMP)
	$(BIN)/ibot-bench run --suite $(SUITE) $(foreach e,$(ENCODER),--encoder $(e))

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# two pytest workers (pytest-xdist): 1.4x faster on 2 cores, where many tests wait on
# subprocesses and imports; a fixed 2 so that larger machines are not oversubscribed
test: lint $(DENSE_STAMP)
	$(BIN)/python -m pytest -n 2

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
