# Two commands on a fresh Debian 12 machine (as root): `make run` and `make test`.
# Each creates the virtualenv and installs what it needs (Python packages, redis-server).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
PYTEST_ARGS ?=
# The site deploy: `make deploy HOSTS=203.0.113.10` (see docs/operations.md, "Deploy").
WHEELHOUSE ?= dist/wheelhouse
WHEEL_ARCH ?= x86_64
INVENTORY  ?= inventory/hosts.py
PYINFRA_ARGS ?=

.PHONY: run test lint typecheck pytest system-deps venv bench clean wheelhouse deploy deploy-dry \
	provision provision-dry rebuild teardown

run: venv system-deps
	$(BIN)/appliance up $(ARGS)

test: venv system-deps lint typecheck pytest

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,deploy,loadtest]'
	touch $(STAMP)

# Real components the tests run against, installed from Debian when their command is missing
# (--no-install-recommends: no extra services): redis-server; docker-compose (1.29, validates
# docker-compose.yml; no Docker engine is installed); Prometheus (with promtool),
# Alertmanager (with amtool) and the node and Redis exporters, which monitoring/ is tested
# against; and what the system tests (tests/system) boot a Debian 12 container with:
# debootstrap, systemd-nspawn, ip, losetup, ssh and apt-ftparchive; and curl, which the README uses.
SYSTEM_TOOLS := redis-server:redis-server prometheus:prometheus promtool:prometheus \
	prometheus-alertmanager:prometheus-alertmanager amtool:prometheus-alertmanager \
	prometheus-node-exporter:prometheus-node-exporter prometheus-redis-exporter:prometheus-redis-exporter \
	debootstrap:debootstrap systemd-nspawn:systemd-container ip:iproute2 losetup:mount \
	ssh:openssh-client ssh-keygen:openssh-client apt-ftparchive:apt-utils blkid:util-linux \
	docker-compose:docker-compose curl:curl

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

# Hetzner Cloud (docs/operations.md, "Provision on Hetzner Cloud"): HCLOUD_TOKEN in the environment.
CLOUD := $(BIN)/pyinfra inventory/cloud.py

provision: venv
	$(CLOUD) deploys/provision.py -y $(PYINFRA_ARGS)

provision-dry: venv
	$(CLOUD) deploys/provision.py --dry $(PYINFRA_ARGS)

# Rebuild the server from its image (volume and IP kept), forget its old host key, configure it.
rebuild: venv wheelhouse
	$(CLOUD) deploys/rebuild.py -y $(PYINFRA_ARGS)
	for ip in $$($(BIN)/python -c 'import runpy; print(" ".join(h for h, _ in runpy.run_path("inventory/hetzner.py")["appliance"]))'); do \
	  ssh-keygen -R $$ip >/dev/null 2>&1 || true; done
	$(BIN)/pyinfra inventory/hetzner.py deploys/site.py -y --data ssh_strict_host_key_checking=accept-new $(PYINFRA_ARGS)

# Deletes the server, firewall, IP and SSH key: CONFIRM=<appliance_name>; the volume too only
# with DELETE_VOLUME=<appliance_name>.
teardown: venv
	$(CLOUD) deploys/teardown.py -y --data teardown_confirm=$(CONFIRM) \
	  $(if $(DELETE_VOLUME),--data teardown_volume=$(DELETE_VOLUME)) $(PYINFRA_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
