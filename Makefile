# Two entry points: `make serve` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned and installed first so that no dependency resolves a CUDA build.
TORCH := torch==2.13.0

.PHONY: serve test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

serve: $(VENV)/.installed
	$(PY) -m service $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
