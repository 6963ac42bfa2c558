# `make demo` and `make test` work on a fresh machine with nothing but Python 3.10+.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# The CPU build of torch is pinned first so no resolver step can pick a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test screenshot clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/minidiff demo

test: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q --durations=15

# Retake docs/serve.png (the README's picture of `minidiff serve`) with the browser test; `make
# test` writes its screenshot to a temporary folder only. Needs Chromium (apt-get install chromium).
screenshot: setup
	MINIDIFF_SCREENSHOT=docs/serve.png $(PY) -m pytest -q tests/test_serve.py -k browser_opens

clean:
	rm -rf $(VENV) runs .pytest_cache
