# Two commands on a fresh Debian 12 machine (as root): `make run` and `make test`.
# Each creates the virtualenv and installs what it needs (Python packages, redis-server).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: run test lint typecheck pytest system-deps venv bench clean

run: venv system-deps
	$(BIN)/appliance up $(ARGS)

test: venv system-deps lint typecheck pytest

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,deploy]'
	touch $(STAMP)

# redis-server is a real component of the appliance; Prometheus (with promtool), Alertmanager
# (with amtool) and the node and Redis exporters are what monitoring/ is tested against; the
# system tests (tests/system) boot a Debian 12 container: debootstrap, systemd-nspawn, ip,
# losetup, ssh and apt-ftparchive. Each is installed from Debian when its command is missing.
SYSTEM_COMMANDS := redis-server:redis-server debootstrap:debootstrap \
	systemd-nspawn:systemd-container ip:iproute2 losetup:mount ssh:openssh-client \
	ssh-keygen:openssh-client apt-ftparchive:apt-utils blkid:util-linux \
	prometheus:prometheus promtool:prometheus \
	prometheus-alertmanager:prometheus-alertmanager amtool:prometheus-alertmanager \
	prometheus-node-exporter:prometheus-node-exporter \
	prometheus-redis-exporter:prometheus-redis-exporter
system-deps:
	@missing=""; for pair in $(SYSTEM_COMMANDS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

pytest: venv system-deps
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
