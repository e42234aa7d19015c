# Set-up and the two entry points of the README. Everything installs into .venv.
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 8

.PHONY: setup run test system-packages
setup: $(VENV)/.installed

# Debian packages the tests need (system-packages.txt, one per line: the one-node SLURM cluster of
# tests/test_slurm.py, ...). Installed with apt-get when running as root; otherwise this says
# what to install, and the tests that need them skip with the reason.
SYSTEM_PACKAGES := $(shell grep -v '^\s*\(\#\|$$\)' system-packages.txt)
system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "system packages: all installed"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "system packages: installing $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	else echo "system packages missing: $$missing -- install them as root (sudo apt-get install $$missing); until then the tests that need them skip"; fi

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# The main job on the default config: fetch, calibrate, ..., results/report.html
run: setup
	$(BIN)/snakemake --cores $(CORES) results/report.html

test: setup system-packages
	$(BIN)/pytest -q
