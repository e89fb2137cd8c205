# Two entry points, both idempotent: `make demo` (set up, run the main job) and `make test`.
# The venv is rebuilt only when pyproject.toml changes, so a second run starts at once.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dsah-rt-installed
# torch/torchvision versions that this machine kind serves from local disk (a newer one downloads GBs).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench kernels

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PINS)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[cpu,train,dev,db,ray]'
	touch $(STAMP)

# The ranking kernels compiled once into a shared library (dsah_rt/native.py); rebuilt only when
# they change, and never fatal: without a C compiler Numba compiles them in each process instead.
kernels:
	-$(PY) -c "from dsah_rt import native; native.kernels()"

demo: $(STAMP) kernels
	$(VENV)/bin/dsah-rt demo --out runs/demo

test: $(STAMP) kernels
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) -m dsah_rt.bench.retrieval --json bench/results/retrieval.json --md bench/results/retrieval.md
