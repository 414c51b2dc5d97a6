# Two commands on a fresh Debian 12 machine (as root): `make run` and `make test`.
# Each creates the virtualenv and installs what it needs (Python packages, redis-server).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
PYTEST_ARGS ?=
# The site deploy: `make deploy HOSTS=203.0.113.10` (see README, "Deploy").
WHEELHOUSE ?= dist/wheelhouse
WHEEL_ARCH ?= x86_64
INVENTORY  ?= inventory/hosts.py
PYINFRA_ARGS ?=

.PHONY: run test lint typecheck pytest system-deps venv bench clean wheelhouse deploy deploy-dry

run: venv system-deps
	$(BIN)/appliance up $(ARGS)

test: venv system-deps lint typecheck pytest

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,deploy]'
	touch $(STAMP)

# Real components the tests run against, installed from Debian when their command is missing
# (--no-install-recommends: no extra services): redis-server; Prometheus (with promtool),
# Alertmanager (with amtool) and the node and Redis exporters, which monitoring/ is tested
# against; and what the system tests (tests/system) boot a Debian 12 container with:
# debootstrap, systemd-nspawn, ip, losetup, ssh and apt-ftparchive.
SYSTEM_TOOLS := redis-server:redis-server prometheus:prometheus promtool:prometheus \
	prometheus-alertmanager:prometheus-alertmanager amtool:prometheus-alertmanager \
	prometheus-node-exporter:prometheus-node-exporter prometheus-redis-exporter:prometheus-redis-exporter \
	debootstrap:debootstrap systemd-nspawn:systemd-container ip:iproute2 losetup:mount \
	ssh:openssh-client ssh-keygen:openssh-client apt-ftparchive:apt-utils blkid:util-linux

system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $$missing >/dev/null; fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

pytest: venv system-deps
	$(BIN)/pytest $(PYTEST_ARGS)

# The wheels the host installs from (it needs no package index): this project's and its
# dependencies', built here.
wheelhouse: venv
	$(BIN)/python -m deploys.wheelhouse $(WHEELHOUSE) --arch $(WHEEL_ARCH)

deploy: wheelhouse
	APPLIANCE_HOSTS=$(HOSTS) $(BIN)/pyinfra $(INVENTORY) deploys/site.py -y $(PYINFRA_ARGS)

# What a deploy would change, without changing anything.
deploy-dry: wheelhouse
	APPLIANCE_HOSTS=$(HOSTS) $(BIN)/pyinfra $(INVENTORY) deploys/site.py --dry $(PYINFRA_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
