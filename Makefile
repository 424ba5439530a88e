# pyratok developer entry points.  `make demo` and `make test` work on a fresh machine:
# they create .venv (torch pinned), build the extension and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
export MAX_JOBS ?= 2

.PHONY: all venv build cpp-test py-test test demo bench mutation clean

all: build

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip "setuptools>=70" wheel ninja
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet --no-build-isolation -e ".[test,video]"
	touch $@

venv: $(VENV)/.installed

# incremental rebuild of pyratok._C (ninja) after source changes
build: venv
	$(PY) setup.py --quiet build_ext --inplace

cpp-test:
	cmake -S . -B build-cmake -G Ninja -DCMAKE_BUILD_TYPE=Release > build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	cmake --build build-cmake
	ctest --test-dir build-cmake --output-on-failure

py-test: build
	$(PY) -m pytest tests -q

test: cpp-test py-test

demo: build
	$(PY) -m pyratok.demo

bench: build
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/last.json -q
	$(PY) benchmarks/report.py benchmarks/results/last.json

# mutation testing of the model, training and I/O layer (long: not part of `make test`);
# MODULES="tokens masking" runs some of benchmarks/mutation/modules.toml.  Writes
# benchmarks/results/mutation.md (per-module scores and the mutants not killed).
mutation: build
	OMP_NUM_THREADS=1 $(PY) benchmarks/mutation/run.py $(MODULES)

clean:
	rm -rf build build-cmake build-cmake.log pyratok/_C*.so *.egg-info
