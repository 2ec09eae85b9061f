# RecJob developer entry points. `make demo` and `make test` are the README's two commands.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CRD := manifests/crd/bases/recjob.dev_recjobs.yaml
DEMO ?= examples/recjob-search.yaml

.PHONY: help install test lint format manifests demo clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv and install RecJob with its dependencies and dev tools

# Reinstall whenever the dependency list or the lock file changes. torch==2.13.0 is
# pinned in pyproject.toml and constraints.txt (the CPU build on the local disk).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP) ## Lint, then run the whole test suite
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check operator trainer serving tests bench

format: $(STAMP) ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format operator trainer serving tests bench

manifests: $(STAMP) ## Regenerate the CRD from the API types
	$(BIN)/recjob crd -o $(CRD)
	@echo "wrote $(CRD)"

demo: $(STAMP) ## Run a RecJob end to end on this machine (local mode)
	$(BIN)/recjob run $(DEMO)

clean: ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
