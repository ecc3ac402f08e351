# `make demo` and `make test` install what they need into the current Python environment
# (activate a venv first if you want one) and then run. Debian's dataset-fashion-mnist package
# provides the demo's real images.
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_CONFIG ?= configs/demo_fmnist_resnet_ann.yaml

.PHONY: install install-dev demo test lint

# What the demo needs: the data set's package, torch, this package.
install:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { \
	  $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }; }
	$(PYTHON) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install -q -e .

# What the tests need besides: slurm-wlm + munge (the tests start a real one-node SLURM cluster
# on 127.0.0.1), DALI, Ray, submitit, moto's S3 server, pytest, ruff.
install-dev: install
	@dpkg -s slurm-wlm munge >/dev/null 2>&1 || { \
	  $(SUDO) apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq slurm-wlm munge; }; }
	$(PYTHON) -m pip install -q -e '.[dev,dali]'

demo: install
	$(PYTHON) -m pipeline prepare fashion-mnist --out data/fashion-mnist
	$(PYTHON) -m pipeline train --config $(DEMO_CONFIG) resume=auto

lint:
	$(PYTHON) -m ruff check pipeline tests launchers benchmarks

test: install-dev lint
	$(PYTHON) -m pytest -q
