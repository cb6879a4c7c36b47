# Every target sets up its own virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medlora-installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# torch==2.13.0 first: the CPU wheel lies on local disk; an unpinned torch would pull a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,federated,serve,ray]"
	touch $(STAMP)

# The README's main job: the k-fold TBI -> SAH transfer study on the embedded phantoms.
demo: $(STAMP)
	$(VENV)/bin/medlora crossval --config configs/study/sah_transfer.yaml --out runs/sah_transfer --workers 2

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/bench_adapters.py

clean:
	rm -rf $(VENV) .pytest_cache
