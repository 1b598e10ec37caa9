# Set-up and the two everyday commands. `make run` and `make test` each create the virtual environment
# (.venv) and install cirbench with its test extras and the example plugin on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test lint typecheck test-torch test-lowest

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

typecheck: setup
	$(PY) -m mypy

# The suite on another torch release and Python, in a virtual environment of its own (.venv-torch<version>-<python>):
# the floor that pyproject.toml declares (the default) or a GPU image's, e.g.
#   make test-torch TORCH=2.11.0 TORCHVISION=0.26.0 PYTHON=python3.12
#   make test-torch TORCH=2.14.1 TORCHVISION=0.29.1 PYTHON=python3.10   (the oldest Python pyproject.toml admits)
TORCH ?= 2.6.0
TORCHVISION ?= 0.21.0
PYTHON ?= python3
TORCH_VENV = .venv-torch$(TORCH)-$(notdir $(PYTHON))
test-torch:
	$(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TORCH_VENV)/bin/python -m pip install --quiet 'torch==$(TORCH)' 'torchvision==$(TORCHVISION)' \
		-e '.[test]' -e examples/cirbench-example-plugin
	$(TORCH_VENV)/bin/python -m pytest

# The suite with every dependency pyproject.toml names at the lowest version it admits (uv's lowest-direct
# resolution), in .venv-lowest: checks that the declared floors are true
test-lowest:
	python3 -m venv .venv-lowest
	.venv-lowest/bin/python -m pip install --quiet uv
	.venv-lowest/bin/python -m uv pip install --quiet --python .venv-lowest/bin/python --resolution lowest-direct \
		--compile-bytecode -e '.[test]' -e examples/cirbench-example-plugin
	.venv-lowest/bin/python -m pytest
