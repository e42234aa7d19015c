# Set-up and the two entry points of the README. Everything installs into .venv.
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 8

.PHONY: setup run test
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# The main job on the default config: fetch, calibrate, ..., results/report.html
run: setup
	$(BIN)/snakemake --cores $(CORES) results/report.html

test: setup
	$(BIN)/pytest -q
