# d8-mesh: `make demo` runs the example workload on a fresh mesh, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test check lint bench bench-peers up clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,cloud,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/d8 demo examples/d8-workload.jsonl

up: $(STAMP)
	$(VENV)/bin/d8 up

NODE_DEPS := tests/node/node_modules/nats/package.json

$(NODE_DEPS): tests/node/package.json
	cd tests/node && npm install --no-audit --no-fund --no-package-lock --silent

test: $(STAMP) $(NODE_DEPS)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check mesh workers orchestrator tests bench
	$(VENV)/bin/ruff format --check mesh workers orchestrator tests bench
	$(VENV)/bin/mypy

check: lint test

bench: $(STAMP)
	$(PY) -m bench

# The peers too: taskiq-nats, FastStream, and Celery (which needs Debian's redis-server).
bench-peers: $(STAMP)
	$(PY) -m pip install --quiet -e ".[peers]"
	$(PY) -m bench --peers

clean:
	rm -rf $(VENV) .pytest_cache
