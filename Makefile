# RecJob developer entry points. `make demo` and `make test` are the README's two commands.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CRD := manifests/crd/bases/recjob.dev_recjobs.yaml

.PHONY: help install prometheus test test-extended lint format manifests demo clean cluster cluster-build cluster-down cluster-demo image-locks peer-recbole

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv and install RecJob with its dependencies and dev tools

# Reinstall whenever the dependency list or the lock file changes. torch==2.13.0 is
# pinned in pyproject.toml and constraints.txt (the CPU build on the local disk).
# uv installs (pinned in constraints.txt, bootstrapped with pip): it resolves what pip
# resolves from the same constraints, in seconds from its cache, and the cluster's image
# environments (hack/cluster/images.py) hard-link the same cached wheels. PIP_FIND_LINKS,
# where a machine sets it, is passed on as uv's --find-links.
# Flower (the federated extra) goes in after, flwr itself without its dependency caps
# (typer, rich, packaging, fastapi/starlette/uvicorn pins below the serving lock; see
# pyproject.toml): its other requirements and Opacus resolve normally, and tests/federated
# runs the deployment engine on these versions.
FEDERATED_DEPS := alembic grpcio-health-checking iterators opacus pathspec prompt-toolkit \
	pycryptodome 'sqlalchemy[asyncio]' tomli tomli-w
UV_INSTALL = UV_LINK_MODE=hardlink $(BIN)/uv pip install --quiet --python $(BIN)/python \
	$$(for d in $${PIP_FIND_LINKS:-}; do [ -d "$$d" ] && printf -- '--find-links %s ' "$$d"; done)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		$$(grep -E '^uv==' constraints.txt)
	$(UV_INSTALL) -c constraints.txt -e '.[dev]'
	$(UV_INSTALL) -c constraints.txt $(FEDERATED_DEPS)
	$(UV_INSTALL) --no-deps -c constraints.txt flwr==1.42.0
	touch $(STAMP)

# Prometheus (Debian's package) for the canary analysis of local mode and the tests.
prometheus: ## Install Prometheus from Debian's packages if it is missing
	@command -v prometheus >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends prometheus; }

# Two pytest-xdist workers (TEST_WORKERS): one runs the heavy lane (tests/conftest.py HEAVY:
# the cluster tests, then the modules that train, convert, federate or run `recjob run`),
# one after the other; the other worker runs the many short tests beside it. Two heavy
# tests side by side are slower than in turn on 2 cores (the CI run of 2026-12-05, which
# spread them over both workers, did 68 min of the serial run's work in 87 min).
TEST_WORKERS ?= 2

# The cluster's binaries are built first (envtest in tests/operator uses them); the cluster
# fixture starts the cluster (tests/cluster/conftest.py: cluster.py up) without building
# again (RECJOB_CLUSTER_BUILT).
# Tests marked `extended` (long end-to-end runs whose capability a test of make test also
# proves, named in each) are left to `make test-extended`: the whole suite took about
# 115 min serially on the slowest 2-core CI machine, over CI's 90 min.
# --session-timeout: past it no further test starts, so a run that cannot finish in CI's
# time still prints its durations and failures.
SESSION_TIMEOUT ?= 5000
PYTEST := RECJOB_CLUSTER_BUILT=1 $(BIN)/python -m pytest -n $(TEST_WORKERS)

test: $(STAMP) prometheus cluster-build ## Lint, then run the test suite with the cluster tests (all but `extended`)
	$(BIN)/ruff check .
	$(PYTEST) -m "not extended" --session-timeout=$(SESSION_TIMEOUT)

test-extended: $(STAMP) prometheus ## The long end-to-end runs left out of make test (about 30 min on 2 cores)
	$(PYTEST) -m extended

# The test cluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kube-proxy built from upstream Go modules, the Kubeflow Training Operator, cluster DNS
# and two node agents that run pods as local processes (hack/cluster/README.md). Root.
CLUSTER := $(BIN)/python hack/cluster/cluster.py

cluster: $(STAMP) prometheus ## Build (Go build cache: seconds after the first) and start the test cluster
	$(CLUSTER) up

cluster-build: $(STAMP) ## Build the test cluster's binaries only (Go build cache: seconds after the first)
	$(CLUSTER) build

cluster-down: ## Stop the test cluster (state kept in .cluster/; `cluster.py reset` forgets it)
	$(CLUSTER) down

cluster-demo: cluster ## kubectl apply a RecJob on the test cluster and follow it to the end
	$(BIN)/python examples/cluster/demo.py

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check operator trainer serving tests bench

format: $(STAMP) ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format operator trainer serving tests bench

manifests: $(STAMP) ## Regenerate the CRD from the API types
	$(BIN)/recjob crd -o $(CRD)
	@echo "wrote $(CRD)"

demo: $(STAMP) prometheus ## Baseline, promoted canary and a broken model refused by the quality gate, end to end locally
	$(BIN)/python examples/demo/demo.py --workdir runs/demo

# The RecBole SASRec peer of the recommendation-quality benchmark (bench/peers/README.md)
# in a virtualenv of its own: recbole 1.2.1 needs numpy<1.24 and ray<=2.6.3, which clash
# with ours. uv (a dev tool of $(VENV)) installs the exact pins, hard-linking torch and the
# rest from its cache where they are (else ~4 GB from PyPI: torch's wheel there is the CUDA
# build; the peer runs it on CPU). ray 2.6.3 has wheels up to CPython 3.11 only.
PEER_RECBOLE := .venv-recbole
PEER_PYTHON ?= python3.11

peer-recbole: $(PEER_RECBOLE)/.installed-stamp ## Create .venv-recbole for bench/peers/recbole_sasrec.py

$(PEER_RECBOLE)/.installed-stamp: bench/peers/requirements-recbole.txt | $(STAMP)
	[ -x $(PEER_RECBOLE)/bin/python ] || $(BIN)/uv venv --python $(PEER_PYTHON) $(PEER_RECBOLE)
	$(BIN)/uv pip sync --python $(PEER_RECBOLE)/bin/python bench/peers/requirements-recbole.txt
	touch $@

# Hashed lock files of the container images (hack/lock_images.py; needs PyPI).
image-locks: $(STAMP) ## Regenerate the images' hashed lock files from constraints.txt
	PIP_FIND_LINKS= $(BIN)/python hack/lock_images.py

clean: ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
