# Two entry points on a fresh clone:  make serve  and  make test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qstack-installed
NATIVE := $(wildcard qstack/native/include/*.h qstack/native/*.py \
            qstack/native/src/*.[ch] qstack/native/loadgen/*.[ch] qstack/native/ustack/*.[ch] \
            qstack/native/harness/*.[ch] qstack/native/common/*.[ch] qstack/native/pyview/*.[ch])
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: all build dpdk serve test test-fast bench clean sysdeps

all: build

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# pip builds the native module with cffi (API mode) as part of the install;
# the explicit in-place build keeps the editable tree importable.
$(STAMP): $(BIN)/python setup.py setup.cfg pyproject.toml $(NATIVE)
	$(BIN)/python -m pip install -q -e '.[test,bench,plot]'
	$(BIN)/python qstack/native/build.py
	$(BIN)/python qstack/native/build_loadgen.py
	$(BIN)/python qstack/native/build_ustack.py
	$(BIN)/python qstack/native/build_qsview.py
	touch $@

# The DPDK driver is not under the stamp: whether it can be built depends on
# libdpdk being installed, which `make test` (sysdeps) may do after a first
# `make serve` built everything else.  Checked on every build: built when
# libdpdk is present and the module is missing or older than its sources.
DPDK_SO := qstack/_qsdpdk.so
dpdk: $(STAMP)
	@if pkg-config --exists libdpdk 2>/dev/null; then \
	  if [ ! -f $(DPDK_SO) ] || [ -n "$$(find $(NATIVE) -newer $(DPDK_SO) 2>/dev/null | head -n 1)" ]; then \
	    $(BIN)/python qstack/native/build_dpdk.py; fi; \
	else echo "DPDK not found (pkg-config libdpdk): $(DPDK_SO) not built, no DPDK driver"; fi

build: $(STAMP) dpdk

serve: build
	$(BIN)/qstack serve apps.echo:handle --host $(HOST) --port $(PORT)

# System packages the suite needs, installed only when missing (and only as root).
SYSDEPS := redis-server libdpdk-dev pkg-config liburing-dev node-llhttp wrk
sysdeps:
	@missing=""; for p in $(SYSDEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing system packages:$$missing (run make test as root, or install them)"; exit 2; fi; \
	fi

test: sysdeps build
	$(BIN)/python -m pytest -q

bench: build
	$(BIN)/python bench/echo.py

clean:
	rm -rf build dist *.egg-info qstack/_native*.so qstack/_native.c qstack/_native.o \
	  qstack/_loadgen*.so qstack/_loadgen.c qstack/_loadgen.o qstack/_ustack_test*.so \
	  qstack/_ustack_test.c qstack/_ustack_test.o qstack/_qsdpdk.so bench/bin
