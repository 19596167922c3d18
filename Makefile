# Two entry points for a fresh machine: `make run` (the main job on built-in data) and
# `make test` (lint + tests). Both create .venv and install the package when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ENCODER ?= random:vit_tiny_patch8
DATA ?= synthetic:shapes
OUT ?= results/quickstart

.PHONY: install run test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ibot-bench list
	$(BIN)/ibot-bench features --encoder $(ENCODER) --data $(DATA) --split val
	$(BIN)/ibot-bench eval knn --encoder $(ENCODER) --data $(DATA) --output $(OUT)
	$(BIN)/ibot-bench eval linear --encoder $(ENCODER) --data $(DATA) --output $(OUT)
	$(BIN)/ibot-bench eval cluster --encoder $(ENCODER) --data $(DATA) --output $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
