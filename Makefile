# Two commands do all set-up on a fresh machine:
#   make run   - the whole platform on embedded defaults (SQLite, in-process queue, tiny model)
#   make test  - install test dependencies, lint, run the suite on the real PostgreSQL and Redis
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
# uvloop and httptools (docs/benchmarks.md, "Event loop and HTTP parser"), with the limits
# for slow and oversized clients (docs/reliability.md, "Hostile input"): a deadline and a
# 16 KiB cap on request headers (webplatform/server.py; uvicorn has neither for httptools),
# 5 s idle keep-alive.
UVICORN_LIMITS = --loop uvloop --http webplatform.server:HeaderLimitsHttpToolsProtocol --timeout-keep-alive 5
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PORT ?= 8000
HOST ?= 127.0.0.1

TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/test
TEST_REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: venv install install-test run test lint format migrate tiny-model clean

$(VENV)/.installed: pyproject.toml package-lock.json $(wildcard locale/*/LC_MESSAGES/django.po)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: the CPU build of this release is on the machine's disk.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e .
	# Front-end libraries (chart.js) from the npm registry, served by the project itself.
	npm ci --no-audit --no-fund --loglevel=error
	# Translations: babel compiles the .po catalogues without needing GNU gettext.
	$(VENV)/bin/pybabel compile --use-fuzzy -d locale -D django
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

var/tiny-glm4v/config.json: | $(VENV)/.installed
	$(PY) manage.py make_tiny_model var/tiny-glm4v

tiny-model: var/tiny-glm4v/config.json

migrate: install
	$(PY) manage.py migrate --no-input

run: install tiny-model migrate
	$(PY) manage.py collectstatic --no-input -v 0
	$(PY) manage.py demo_setup --host $(HOST) --port $(PORT)
	@echo "Serving on http://$(HOST):$(PORT)/  (OpenAI base_url: http://$(HOST):$(PORT)/v1)"
	$(VENV)/bin/uvicorn webplatform.asgi:application --host $(HOST) --port $(PORT) --ws websockets-sansio $(UVICORN_LIMITS)

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# Strict on inference/ and tenants/, every body checked in webplatform/ (pyproject.toml).
	$(VENV)/bin/mypy inference tenants webplatform

format: install-test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: install-test
	bash scripts/test-services.sh
	$(MAKE) lint
	# clamd with the project's own test signatures (EICAR); the script prints its URL.
	clamd_url=$$(bash scripts/clamd-test.sh) && \
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) PLATFORM_TESTING=1 \
	CLAMD_URL="$$clamd_url" CLAMD_REQUIRED=1 \
		$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var test-output
