# pbx-agent: one entry point for developers, CI and installers. `make help` lists targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# Debian packages, each list exactly what its target talks to. They are installed
# by packaging/apt-install-quiet: no service they ship is started or left enabled.
# The demo: its broker, the NOC's PostgreSQL, the browser that screenshots the dashboard.
DEMO_PACKAGES := mosquitto postgresql-15 chromium chromium-driver
# The tests: the same, plus OpenSSH (the support tunnel's bastion and the box's sshd)
# and systemd (systemd-analyze checks the unit).
# Building the .deb: Debian's interpreter, pip and setuptools (the venv inside is made for it),
# binutils (strip, objdump); checking it: lintian.
DEB_PACKAGES := python3.11-venv python3-pip python3-setuptools binutils
DEB_CHECK_PACKAGES := lintian
# The signed repository (make repo) and the update tests that serve it (make test-deb).
REPO_PACKAGES := reprepro gnupg
TEST_PACKAGES := mosquitto openssh-server systemd postgresql-15 chromium chromium-driver \
	$(DEB_PACKAGES) $(DEB_CHECK_PACKAGES) $(REPO_PACKAGES)

# The service's interpreter: Debian's, checked (packaging/check-python), never PATH's python3.
SYSTEM_PYTHON ?= /usr/bin/python3.11
LOCK := requirements.lock

PREFIX ?= /opt/pbx-agent
CONFDIR ?= /etc/pbx-agent
STATEDIR ?= /var/lib/pbx-agent
UNITDIR ?= /etc/systemd/system

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# $(call apt_missing,PACKAGES): install those not installed yet (as root), quietly.
define apt_missing
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages (no service started or enabled):$$missing"; \
	    apt-get update -qq && packaging/apt-install-quiet $$missing; \
	  else \
	    echo "missing Debian packages:$$missing (run 'make $@' as root)"; \
	  fi; \
	fi
endef

.PHONY: deps
deps: ## install the Debian packages the tests use (root; starts and enables no service)
	$(call apt_missing,$(TEST_PACKAGES))

.PHONY: deps-demo
deps-demo: ## install the Debian packages the demo uses (root; starts and enables no service)
	$(call apt_missing,$(DEMO_PACKAGES))

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,lint,noc]'
	@touch $(STAMP)

.PHONY: venv
venv: $(STAMP) ## create the virtualenv with the agent and its test/lint tools

.PHONY: lint
lint: venv ## ruff (lint and format check) and mypy --strict
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

.PHONY: test
test: deps venv lint ## lint, then the whole test suite against real mosquitto, sqlite, sockets
	PBX_AGENT_TEST_DEB=1 $(VENV)/bin/pytest -q -n 2 --dist loadfile

.PHONY: mutation
mutation: venv ## mutation testing of gate, switch, outbox, ledger, commands, redaction, supervisor (an hour)
	$(PIP) install -q -e '.[mutation]'
	$(VENV)/bin/mutmut run --max-children 2
	$(VENV)/bin/mutmut results

.PHONY: demo
demo: deps-demo venv ## run the agent on the sample PBX tree with a local mTLS broker
	$(PY) -m demo.run

.PHONY: bench
bench: deps venv bench-deps ## run the benchmarks (minutes; results go in the README)
	@for b in bench/bench_*.py; do echo "== $$b"; PYTHONPATH=. $(PY) $$b || exit 1; done

# collectd is the idle bench's comparison (bench/bench_idle.py), for the bench only: its
# service is masked before it is installed and never enabled or started.
.PHONY: bench-deps
bench-deps:
	@if ! dpkg-query -W -f='$${Status}' collectd-core 2>/dev/null | grep -q "install ok installed"; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    ln -sf /dev/null /etc/systemd/system/collectd.service; \
	    own=""; if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; own=1; fi; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends collectd-core libmosquitto1 >/dev/null; \
	    rm -f /etc/systemd/system/multi-user.target.wants/collectd.service; \
	    if [ -n "$$own" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
	  else echo "collectd-core missing: the idle bench runs without it (make bench as root installs it)"; fi; \
	fi

.PHONY: chaos
chaos: deps venv ## the long fault runs (about 10 minutes; root for the full disk): lost must be 0
	PYTHONPATH=. $(PY) bench/chaos.py

.PHONY: lock
lock: ## regenerate requirements.lock (the runtime dependencies, pinned with hashes)
	@test -x build/lock-tools/bin/pip-compile || { $(SYSTEM_PYTHON) -m venv build/lock-tools && \
	  build/lock-tools/bin/pip install -q pip-tools; }
	build/lock-tools/bin/pip-compile -q --generate-hashes --strip-extras --no-emit-index-url \
	  --no-emit-find-links --output-file $(LOCK) setup.cfg

.PHONY: deb
deb: ## build dist/pbx-agent_VERSION_ARCH.deb (self-contained venv from requirements.lock)
	$(call apt_missing,$(DEB_PACKAGES))
	packaging/build-deb dist

.PHONY: deb-check
deb-check: deb ## lintian on the .deb: no errors (warnings are listed)
	$(call apt_missing,$(DEB_CHECK_PACKAGES))
	lintian --fail-on error dist/pbx-agent_*.deb

.PHONY: repo
repo: deb ## publish dist/*.deb in a signed apt repository dist/repo (REPO_KEY: a key fingerprint in GNUPGHOME)
	$(call apt_missing,$(REPO_PACKAGES))
	@test -n "$(REPO_KEY)" || { echo "make repo: REPO_KEY=<fingerprint of the signing key in \$$GNUPGHOME>"; exit 64; }
	packaging/make-repo dist/repo $(REPO_KEY) dist/pbx-agent_*.deb
	@echo "dist/repo: serve it; dist/repo/pbx-agent-archive-keyring.pgp is the key to pin (VENDOR_KEYRING)"

.PHONY: test-deb
test-deb: venv ## the package and update tests, with the end-to-end apt update run (about 2 minutes)
	$(call apt_missing,$(DEB_PACKAGES) $(DEB_CHECK_PACKAGES) $(REPO_PACKAGES))
	PBX_AGENT_TEST_DEB=1 $(VENV)/bin/pytest -q tests/test_deb.py tests/test_updater.py tests/test_update_e2e.py

.PHONY: install
install: ## (root) install the agent as a systemd service
	getent group pbx-agent >/dev/null || groupadd --system pbx-agent
	getent group pbx-agent-admin >/dev/null || groupadd --system pbx-agent-admin
	getent passwd pbx-agent >/dev/null || useradd --system --gid pbx-agent --home-dir $(STATEDIR) \
	  --no-create-home --shell /usr/sbin/nologin pbx-agent
	@# The CDR files and /etc/asterisk belong to group asterisk on FreePBX: read access only.
	@if getent group asterisk >/dev/null; then usermod -a -G asterisk pbx-agent; fi
	@# The same lock file as the .deb, every hash checked, for an interpreter the service can run.
	packaging/check-python $(SYSTEM_PYTHON) pbx-agent
	$(SYSTEM_PYTHON) -m venv $(PREFIX)/venv
	$(PREFIX)/venv/bin/pip install -q --require-hashes --no-deps -r $(LOCK)
	$(PREFIX)/venv/bin/pip install -q --no-deps .
	setpriv --reuid=pbx-agent --regid=pbx-agent --clear-groups -- $(PREFIX)/venv/bin/python -I -c 'import agent.daemon'
	install -D -m 0644 README.md /usr/share/doc/pbx-agent/README.md
	install -d -m 0750 -o root -g pbx-agent $(CONFDIR)
	@if [ -e $(CONFDIR)/agent.yaml ]; then \
	  echo "keeping the existing $(CONFDIR)/agent.yaml; the shipped default is $(CONFDIR)/agent.yaml.dist"; \
	  install -m 0640 -o root -g pbx-agent etc/agent.yaml $(CONFDIR)/agent.yaml.dist; \
	else install -m 0640 -o root -g pbx-agent etc/agent.yaml $(CONFDIR)/agent.yaml; fi
	install -d -m 0750 -o pbx-agent -g pbx-agent $(STATEDIR)
	@# The device key is made here, by the agent's user, and never leaves the box.
	install -d -m 0700 -o pbx-agent -g pbx-agent $(CONFDIR)/tls
	install -m 0644 systemd/pbx-agent.service $(UNITDIR)/pbx-agent.service
	ln -sf $(PREFIX)/venv/bin/agentctl /usr/local/bin/agentctl
	@systemctl daemon-reload 2>/dev/null || echo "(systemd is not running here: the unit is installed for the next boot)"
	@echo "installed; edit $(CONFDIR)/agent.yaml, then: systemctl enable --now pbx-agent"

.PHONY: uninstall
uninstall: ## (root) remove the service; PURGE=1 also removes configuration and state
	@systemctl disable --now pbx-agent 2>/dev/null || true
	rm -f $(UNITDIR)/pbx-agent.service /usr/local/bin/agentctl
	rm -rf $(PREFIX) /usr/share/doc/pbx-agent
	@systemctl daemon-reload 2>/dev/null || true
	@if [ "$(PURGE)" = 1 ]; then rm -rf $(CONFDIR) $(STATEDIR); \
	  userdel pbx-agent 2>/dev/null; groupdel pbx-agent-admin 2>/dev/null; groupdel pbx-agent 2>/dev/null; \
	  echo "removed configuration, state, user and groups"; \
	else echo "kept $(CONFDIR) and $(STATEDIR) (PURGE=1 removes them)"; fi

.PHONY: clean
clean: ## remove the virtualenv and caches
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis demo/run mutants

# `make print-TEST_PACKAGES`: a variable's value, for the tests that keep the README true.
print-%:
	@echo $($*)
