# Set-up and the two everyday commands. `make run` and `make test` each create the virtual environment
# (.venv) and install cirbench with its test extras and the example plugin on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test lint

$(VENV)/.installed: pyproject.toml examples/cirbench-example-plugin/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]' -e examples/cirbench-example-plugin
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/cirbench run

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check cirbench methods datasets tests examples scripts benchmarks
