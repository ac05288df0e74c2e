# sam-backend: `make up` starts the product, `make test` runs every test. Each installs what it needs.
PYTHON ?= python3
VENV := .venv
LS_VENV := .venv-ls
BIN := $(VENV)/bin
LS_VERSION := 1.23.2

.PHONY: up serve test lint unit bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@# SAM 2.1 (`sam2` on PyPI is an sdist): built against the torch installed above, without its optional
	@# CUDA extension (it only fills small holes in the video predictor's post-processing).
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install -q --no-build-isolation sam2
	touch $@

$(LS_VENV)/bin/.installed:
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install -q --upgrade pip
	$(LS_VENV)/bin/python -m pip install -q 'label-studio==$(LS_VERSION)'
	touch $@

# System packages for the tests (Debian): chromium for the browser test, docker-compose to validate
# docker-compose.yml without an engine, and the real Redis, PostgreSQL and nginx that the scale-out tests
# start on 127.0.0.1 (their own services are kept from starting at install: policy-rc.d answers 101).
APT_PACKAGES := chromium docker-compose redis-server postgresql nginx
APT_COMMANDS := command -v chromium && command -v docker-compose && command -v redis-server && \
	command -v nginx && ls /usr/lib/postgresql/*/bin/initdb
.apt-installed:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  ($(APT_COMMANDS)) >/dev/null 2>&1 || ( \
	    created=; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
	      chmod +x /usr/sbin/policy-rc.d; created=1; }; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null) || \
	      echo "note: could not install $(APT_PACKAGES); the tests that need them skip (and fail under CI=true)"; \
	    [ -z "$$created" ] || rm -f /usr/sbin/policy-rc.d ); \
	else echo "note: not root or no apt-get: $(APT_PACKAGES) not installed; the tests that need them skip (fail under CI=true)"; fi
	@# The marker only when the packages are really there, so a failed install is tried again next time.
	@if ($(APT_COMMANDS)) >/dev/null 2>&1; then touch $@; fi

up: $(BIN)/.installed $(LS_VENV)/bin/.installed
	LABEL_STUDIO_BIN=$(LS_VENV)/bin/label-studio $(BIN)/sam-backend up

serve: $(BIN)/.installed
	$(BIN)/sam-backend serve

lint: $(BIN)/.installed
	$(BIN)/ruff check sam_backend tests benchmarks

unit: $(BIN)/.installed
	$(BIN)/pytest -q -m "not integration"

test: $(BIN)/.installed $(LS_VENV)/bin/.installed .apt-installed lint
	LABEL_STUDIO_BIN=$(CURDIR)/$(LS_VENV)/bin/label-studio $(BIN)/pytest -q -ra

bench: $(BIN)/.installed
	$(BIN)/sam-backend -v bench --random-weights

clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache .ruff_cache *.egg-info .apt-installed
