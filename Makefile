# Two entry points, each doing all set-up on a fresh machine:
#   make train   create .venv, install, build, run the default dpf-train job (DPF on digits)
#   make test    create .venv, install, build, run the C++ unit tests (ctest), pytest, and
#                the installed-wheel check (a wheel built from the checkout, in a fresh venv)
#   make docs    build the documentation site into build/docs (strict: warnings fail)
#   make screenshots  render the site's main pages in headless Chromium (build/screenshots)
# DPF_EXT_STRICT_BUILD=1 makes a failed kernel build fatal (CI sets it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps
BUILT := $(VENV)/.built
CMAKE_BUILD := build/cmake
NVCC ?= $(firstword $(wildcard $(CUDA_HOME)/bin/nvcc /usr/local/cuda/bin/nvcc))
SOURCES := $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.inc csrc/*/*.cu csrc/*/*.cuh)

.PHONY: train test ctest pytest wheel-check bench docs screenshots clean

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

# build a wheel, install it into a fresh venv, import, train a few steps (tests/wheel/)
wheel-check: $(BUILT)
	$(PY) tests/wheel/check.py

test: ctest pytest wheel-check

docs: $(DEPS)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# Each page of the site as headless Chromium renders it at 1280 and 800 px wide
# (build/screenshots/<page>-<width>.png); needs chromium (Debian: apt install chromium).
CHROMIUM ?= chromium
PAGES := index guide/your-model guide/command-line methods/index results api
screenshots: docs
	mkdir -p build/screenshots
	for page in $(PAGES); do for width in 1280 800; do \
	  $(CHROMIUM) --headless --no-sandbox --disable-gpu --disable-background-networking \
	    --disable-component-update --no-first-run --hide-scrollbars \
	    --user-data-dir=$$(mktemp -d) --window-size=$$width,2000 \
	    --screenshot=build/screenshots/$$(echo $$page | tr / -)-$$width.png \
	    build/docs/$$page.html 2>/dev/null; done; done

bench: $(BUILT)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info runs dpf_ext/*.so
