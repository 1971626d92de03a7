# Two entry points, each doing all set-up on a fresh machine:
#   make train   create .venv, install, build, run the default dpf-train job (DPF on digits)
#   make test    create .venv, install, build, run the C++ unit tests (ctest) and pytest
#   make docs    build the documentation site into build/docs (strict: warnings fail)
# DPF_EXT_STRICT_BUILD=1 makes a failed kernel build fatal (CI sets it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps
BUILT := $(VENV)/.built
CMAKE_BUILD := build/cmake
NVCC ?= $(firstword $(wildcard $(CUDA_HOME)/bin/nvcc /usr/local/cuda/bin/nvcc))
SOURCES := $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh)

.PHONY: train test ctest pytest bench docs clean

$(DEPS): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(BUILT): $(DEPS) setup.py $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

train: $(BUILT)
	$(VENV)/bin/dpf-train --out runs/default --overwrite

ctest:
	cmake -S . -B $(CMAKE_BUILD) $(if $(NVCC),-DCMAKE_CUDA_COMPILER=$(NVCC)) > /dev/null
	cmake --build $(CMAKE_BUILD) -j 2
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

pytest: $(BUILT)
	$(PY) -m pytest tests

test: ctest pytest

docs: $(DEPS)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

bench: $(BUILT)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info runs dpf_ext/*.so
