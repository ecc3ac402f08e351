# `make demo` and `make test` install what they need into the current Python environment
# (activate a venv first if you want one) and then run. Debian's dataset-fashion-mnist package
# provides the demo's real images. pip installs the versions the tests passed with:
# constraints.txt pins every package (the package's own ranges in pyproject.toml stay ranges
# for library users); `make lock` refreshes it.
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_CONFIG ?= configs/demo_fmnist_resnet_ann.yaml
PIP_INSTALL = $(PYTHON) -m pip install -q -c constraints.txt

.PHONY: install install-dev demo test test-fast lint lock

# What the demo needs: the data set's package, torch, this package.
install:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { \
	  $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }; }
	$(PIP_INSTALL) torch==2.14.1 torchvision==0.29.1
	$(PIP_INSTALL) -e .

# What the tests need besides: slurm-wlm + munge (the tests start real SLURM clusters: one node
# on 127.0.0.1, and two nodes on private hosts made with iproute2's network namespaces), DALI,
# Ray, submitit, moto's S3 server, pytest, ruff.
install-dev: install
	@dpkg -s slurm-wlm munge iproute2 >/dev/null 2>&1 || { \
	  $(SUDO) apt-get install -y -qq slurm-wlm munge iproute2 >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq slurm-wlm munge iproute2; }; }
	$(PIP_INSTALL) -e '.[dev,dali]'

demo: install
	$(PYTHON) -m pipeline prepare fashion-mnist --out data/fashion-mnist
	$(PYTHON) -m pipeline train --config $(DEMO_CONFIG) resume=auto

lint:
	$(PYTHON) -m ruff check pipeline tests launchers benchmarks

# Two tests at a time, whole files to each worker (a file's clusters and fixtures stay in one
# process; tests/conftest.py starts the longest files first): the suite spends much of its time
# waiting on processes and daemons, which the other worker fills (2 cores, the same code: 1266 s
# one at a time, 819 s so, 2026-12-06; 729 s since exit_costs counts in one forward). The 25
# slowest tests close the report, so that a test that grew slow shows in every CI run.
TEST_WORKERS ?= 2
PYTEST = $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: install-dev lint
	$(PYTEST) --durations=25

# The inner loop, in under 3 minutes (152 to 161 s on 2 cores, 2026-12-06): no install, and no
# test marked slow (those train: in process, through the CLI, on SLURM or on Ray; or compile with
# inductor). `make test` runs everything.
test-fast: lint
	$(PYTEST) -m "not slow"

# Re-resolve every dependency to its newest allowed release in a throwaway venv and pin the
# result. Run it, then `make test`, and commit constraints.txt with the fixes the tests asked for.
lock:
	@set -e; venv=$$(mktemp -d)/venv; trap 'rm -rf "$$(dirname $$venv)"' EXIT; \
	$(PYTHON) -m venv $$venv; \
	$$venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1; \
	$$venv/bin/python -m pip install -q -e '.[dev,dali]'; \
	{ echo "# Every package of the demo and test environments (make install-dev), as tested."; \
	  echo "# Made by 'make lock' with $$($$venv/bin/python -V) on $$(uname -sm); do not edit."; \
	  $$venv/bin/python -m pip freeze --exclude-editable; } > constraints.txt; \
	echo "constraints.txt: $$(grep -vc '^#' constraints.txt) packages"
