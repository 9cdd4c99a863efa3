# Two entry points for a fresh machine; each builds the local venv on first use.
#   make train   the main job: train the built-in tiny model on the built-in task
#   make test    the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch; on a CUDA machine, install your own torch first, or override.
TORCH_SPEC ?= torch==2.13.0

.PHONY: train test bench-quick install clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

train: install
	$(VENV)/bin/alphapo-train $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench-quick: install
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
