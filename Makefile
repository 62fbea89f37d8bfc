# kennel: one entry per job. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
# PEM bundle that pip trusts inside image builds only (see containers/build-ca/README.md).
EXTRA_CA_BUNDLE ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)
export DOCKER_BUILDKIT := 0
PY := $(VENV)/bin/python

.PHONY: help setup venv build-ca test test-host
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

setup: ## install and start the Docker engine, compose plugin and base image (Debian 12, root)
	bash scripts/setup-docker.sh

venv: $(VENV)/.installed ## host virtualenv for tests and operator scripts (from requirements-dev.lock)
$(VENV)/.installed: requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade 'pip==25.3'
	$(VENV)/bin/pip install -q -r requirements-dev.lock
	touch $@

build-ca: ## copy EXTRA_CA_BUNDLE into the build context (empty file when unset)
	@if [ -n "$(EXTRA_CA_BUNDLE)" ]; then cp "$(EXTRA_CA_BUNDLE)" containers/build-ca/extra-ca.crt; \
	else : > containers/build-ca/extra-ca.crt; fi

test: venv ## the whole suite: unit, contract, containers (real engine), aws (moto + local registry)
	$(PY) -m pytest tests

test-host: venv ## everything that needs no Docker engine
	$(PY) -m pytest tests -m 'not container'
