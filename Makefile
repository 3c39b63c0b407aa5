# make setup: create .venv from nothing (idempotent; quick when already done)
# make lint:  setup + ruff over the whole tree
# make test:  setup + lint + the offline test suite
# make demo:  setup + the embedded default pipeline on generated data, fully offline
# make serve: the demo's models behind an OpenAI-compatible API, a chat page and the arena (after make demo)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# every pip call goes through the constraints file: it pins torch==2.13.0 (the CPU wheel) and the tested stack
PIP    := $(PY) -m pip install --disable-pip-version-check -c constraints.txt
STAMP  := $(VENV)/.setup-done
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup lint test demo serve clean bench

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -q --upgrade pip setuptools wheel
	$(PIP) -q -e '.[dev,serve]'
	@touch $(STAMP)

# ruff (configured in pyproject.toml): pyflakes and pycodestyle, lines up to 150 characters
lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(OFFLINE) $(PY) -m pytest -q tests

demo: setup
	$(OFFLINE) $(VENV)/bin/align run recipes/tiny

# chat with the demo's DPO model, or compare it with SFT in the arena, at http://127.0.0.1:8000/ (after make demo)
serve: setup
	$(OFFLINE) $(VENV)/bin/align serve --config recipes/tiny/serve.yaml

# the quick ratio benchmarks (minutes); the longer ones are listed in docs/benchmarks.md with their commands
bench: setup
	$(OFFLINE) $(PY) -m benchmarks.bench_pretrain throughput
	$(OFFLINE) $(PY) benchmarks/dpo_ref_cache.py --preset tiny --pairs 400 --steps 5
	$(OFFLINE) $(PY) benchmarks/ppo_threads.py --preset tiny --updates 3

clean:
	rm -rf runs .pytest_cache
