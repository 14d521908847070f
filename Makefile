# wis2-chain: the two commands a newcomer runs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Local copy of the WIS2 validator bundles; empty means "download them with the libraries' syncs".
WIS2_BUNDLE_DIR ?= $(if $(wildcard ../shared/wis2-bundle/README.md),../shared/wis2-bundle,)
export WIS2_BUNDLE_DIR

.PHONY: help venv install mosquitto prometheus postgresql redis docker-compose docker standins chromium nginx bundles lint test test-unit docs docs-build demo demo-event broker-config blocks bench clean

help:
	@echo "make demo   - start the whole chain on loopback and publish the sample Argo event"
	@echo "make test   - set up and run the whole test suite (ruff + pytest)"
	@echo "make test-unit - the unit tests alone (tests/unit/: no broker, no Prefect server)"
	@echo "make docs   - serve the documentation site on http://127.0.0.1:8000 (DOCS_ADDR=host:port)"
	@echo "make bundles, make broker-config, make blocks, make lint, make standins (Docker images)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { apt-get update && apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

venv install: $(VENV)/.installed

mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
	  echo "mosquitto not found: installing Debian's mosquitto package"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y mosquitto; \
	  else echo "run: sudo apt-get install -y mosquitto" >&2; exit 1; fi; }

# Prometheus (Debian's prometheus): the delivery test starts one of its own on a free port, scrapes
# the chain's /metrics and asks it the dashboard's queries (deploy/grafana/); nothing uses a system one.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || test -x /usr/bin/prometheus || { \
	  echo "prometheus not found: installing Debian's prometheus package"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y --no-install-recommends prometheus; \
	  else echo "run: sudo apt-get install -y prometheus" >&2; exit 1; fi; }

# PostgreSQL's programs (initdb, postgres): the tests, the bench and the demo start clusters of
# their own on free ports (localnode/postgres.py); nothing uses a system-wide server.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "PostgreSQL not found: installing Debian's postgresql package"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y postgresql; \
	  else echo "run: sudo apt-get install -y postgresql" >&2; exit 1; fi; }

# Redis (redis-server): the tests and the bench start servers of their own on free ports
# (localnode/redis.py) for the shared task results of several workers; nothing uses a system one.
redis:
	@command -v redis-server >/dev/null 2>&1 || test -x /usr/bin/redis-server || { \
	  echo "redis-server not found: installing Debian's redis-server package"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y redis-server; \
	  else echo "run: sudo apt-get install -y redis-server" >&2; exit 1; fi; }

# compose.yml is checked with Debian's docker-compose (no Docker engine needed).
docker-compose:
	@command -v docker-compose >/dev/null 2>&1 || { \
	  echo "docker-compose not found: installing Debian's docker-compose package"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y docker-compose; \
	  else echo "run: sudo apt-get install -y docker-compose" >&2; exit 1; fi; }

# The compose tests (tests/integration/test_compose_node.py) bring compose.yml up on a Docker
# Engine: Debian's docker.io (they start dockerd themselves when none answers, and stop it),
# docker-compose, and debootstrap for the stand-ins of the Docker Hub images (deploy/standins/).
# Not root and not installed: the compose tests are skipped, saying why.
docker: docker-compose
	@missing=""; \
	  command -v dockerd >/dev/null 2>&1 || test -x /usr/sbin/dockerd || missing="$$missing docker.io"; \
	  command -v debootstrap >/dev/null 2>&1 || test -x /usr/sbin/debootstrap || missing="$$missing debootstrap"; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ]; then echo "installing Debian's$$missing"; \
	      apt-get update && apt-get install -y $$missing; \
	    else echo "not installed:$$missing (sudo apt-get install -y$$missing): the compose tests will be skipped" >&2; fi; fi

# The stand-in images (only those missing) and the chain image, on a running Docker Engine.
standins: docker
	deploy/standins/build.sh --chain

# The browser test drives Debian's chromium with Playwright (no browser download).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "chromium not found: installing Debian's chromium package"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y chromium; \
	  else echo "run: sudo apt-get install -y chromium" >&2; exit 1; fi; }

# The TLS proxy of compose.yml (deploy/prefect-ui-tls.conf) is tested with Debian's nginx.
nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  echo "nginx not found: installing Debian's nginx-light package"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y nginx-light; \
	  else echo "run: sudo apt-get install -y nginx-light" >&2; exit 1; fi; }

bundles: install
	$(BIN)/wis2-chain bundles install $(if $(WIS2_BUNDLE_DIR),--from "$(WIS2_BUNDLE_DIR)")

lint: install
	$(BIN)/ruff check .

# Test files run in TEST_WORKERS parallel pytest processes (one file stays in one process, so a
# file's broker, Prefect server and worker fixtures are shared as written); 1 runs them in order.
TEST_WORKERS ?= 3
test: install mosquitto prometheus postgresql redis docker-compose docker chromium nginx bundles lint
	$(BIN)/python -m pytest $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

# tests/unit/ alone (what `pytest -m "not integration"` selects): no service, a few seconds.
# mosquitto for its mosquitto_passwd tool, docker-compose for `docker-compose config`.
test-unit: install mosquitto docker-compose bundles
	$(BIN)/python -m pytest tests/unit

# The documentation site (mkdocs.yml, docs/; references generated from the code by docsgen/).
# The test suite builds it with --strict (tests/unit/docsgen/test_site.py).
DOCS_ADDR ?= 127.0.0.1:8000
export NO_MKDOCS_2_WARNING := 1
docs: install
	$(BIN)/mkdocs serve --strict --dev-addr $(DOCS_ADDR)

docs-build: install
	$(BIN)/mkdocs build --strict --site-dir run/site

# Render the broker's mosquitto.conf, acl and passwd into run/broker from WIS2_BROKER_* (.env).
broker-config: install mosquitto
	$(BIN)/wis2-broker --run-dir run/broker --render-only

# The Prefect server of the demo runs on a PostgreSQL cluster of its own (DEMO_ARGS=--sqlite: SQLite).
demo: install mosquitto $(if $(findstring --sqlite,$(DEMO_ARGS)),,postgresql) $(if $(findstring --scaled,$(DEMO_ARGS)),redis) bundles
	$(BIN)/python -m localnode.demo run $(DEMO_ARGS)

# Send another event to the running demo node: make demo-event EVENT=path/to/event.json
demo-event: install
	@test -n "$(EVENT)" || { echo "usage: make demo-event EVENT=path/to/event.json" >&2; exit 2; }
	$(BIN)/python -m localnode.demo send "$(EVENT)" $(if $(TOPIC),--topic "$(TOPIC)")

# Register the MqttBroker / Wis2Dataset block types and their documents (WIS2_MQTT_*, data/datasets).
blocks: install
	$(BIN)/wis2-chain blocks register

# End-to-end benchmark (minutes): make bench, or e.g. make bench BENCH_ARGS="--profile sqlite --burst 200"
bench: install mosquitto postgresql redis bundles
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
