# sfd-fast: `make demo` (digits default end to end) and `make test` (CPU test tier).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A bare `pip install torch` on a machine without a GPU pulls a multi-GB CUDA build: install the
# CPU build first there. TORCH_INDEX may name a CPU wheel index (e.g. https://download.pytorch.org/whl/cpu)
# on machines whose pip cannot already find one.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
DEMO_CONFIG ?= configs/digits_forget0.json
PYTEST_ARGS ?=
# The lock (docs/install.md): `make lock` regenerates it with uv; installs use pip with hashes.
UV_VERSION ?= 0.13.9
LOCK_TEST := requirements/test.txt
LOCK_RUNTIME := requirements/runtime.txt

.PHONY: demo test venv install install-test bench clean-demo help wheelhouse lock test-matrix

help:
	@echo "make demo    create $(VENV), install, run the digits default end to end, print the metrics"
	@echo "make test    install the test extras and run the CPU test tier"
	@echo "make bench   run the throughput benchmarks (pytest bench/)"
	@echo "make wheelhouse  the wheels the GPU device image lacks, into .whl/ (docs/gpu_check.md)"
	@echo "make lock    regenerate requirements/test.txt and runtime.txt (uv; docs/install.md)"
	@echo "make test-matrix  the CPU tier in the oldest / newest environments (docs/install.md)"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned by version (TORCH_VERSION; requirements/constraints.in says the same): with a GPU
# the default (CUDA) build and the nvidia-* / triton wheels it asks for; without one the CPU build alone,
# whose pure-Python needs (sympy, networkx, ...) then come from the lock at their locked versions.
$(VENV)/.torch: | $(VENV)/bin/python
ifeq ($(HAS_GPU),1)
	$(PIP) install -q "torch==$(TORCH_VERSION)"
else
	$(PIP) install -q --no-deps "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
endif
	touch $@

# Locked installs: every package at the version and hash of the lock (--no-deps: the lock is the whole
# closure, so pip resolves nothing on its own), then this project without dependencies, then `pip check`.
$(VENV)/.installed: setup.py $(LOCK_RUNTIME) $(VENV)/.torch
	$(PIP) install -q --no-deps --require-hashes -r $(LOCK_RUNTIME)
	$(PIP) install -q --no-deps -e .
	$(PIP) check
ifneq ($(HAS_GPU),1)
	@$(PY) -c "import torch,sys; v=torch.__version__; print('torch', v); sys.exit(0 if (not torch.version.cuda) else 'expected a CPU build of torch on a machine without a GPU, got ' + v)"
endif
	touch $@

$(VENV)/.installed-test: setup.py $(LOCK_TEST) $(VENV)/.installed
	$(PIP) install -q --no-deps --require-hashes -r $(LOCK_TEST)
	$(PIP) check
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	@if [ -e runs/digits_forget0 ]; then echo "make demo: replacing the previous demo run in runs/digits_forget0 (the cached teacher in runs/cache/ is reused)"; rm -rf runs/digits_forget0; fi
	$(PY) sfd_fast/train.py --config $(DEMO_CONFIG)
	@$(PY) -c "import json; m=json.load(open('runs/digits_forget0/eval.json')); \
	print('\n== digits demo (forget 0, override 1) =='); \
	[print(f'{k:>20s}: {m[k]:.4f}') for k in ('ua','retained_accuracy','fd_final','fd_init','fd_teacher','classifier_accuracy')]; \
	print('eval.json : runs/digits_forget0/eval.json'); print('grid      : runs/digits_forget0/samples_final.png (one row per digit 0-9)')"

clean-demo:
	rm -rf runs/digits_forget0

test: $(VENV)/.installed-test
	$(PY) -m pytest tests -m "not gpu" $(PYTEST_ARGS)

lock: | $(VENV)/bin/python
	$(PIP) install -q "uv==$(UV_VERSION)"
	UV=$(VENV)/bin/uv bash requirements/lock.sh

# oldest / newest environments (docs/install.md): one venv each under .matrix/, the CPU tier, a dated
# line per environment appended to docs/install_matrix.log; the table in docs/install.md quotes it.
test-matrix:
	bash requirements/matrix.sh $(MATRIX_ENVS)

bench: $(VENV)/.installed-test
	$(PY) -m pytest bench $(PYTEST_ARGS)

# ---------------------------------------------------------------------------------------------------
# The device check (docs/gpu_check.md): replica of the device image, wheelhouse, rehearsal
# ---------------------------------------------------------------------------------------------------
# DEVICE_VENV holds Python 3.12 + the image's packages (bench/device_image.txt); other targets use
# the replica as  $(DEVICE_RUN) python ...  (the wheels installed as gpu_check.sh installs them, the
# checkout importable from its root).
DEVICE_VENV ?= .venv-device
DEVICE_PY := $(DEVICE_VENV)/bin/python
DEVICE_RUN = PYTHONPATH=$(abspath $(DEVICE_VENV))/wheel-site:$(CURDIR) $(abspath $(DEVICE_PY))
REHEARSAL_OUT ?= runs/gpu_check_rehearsal

.PHONY: device-replica rehearse wheelhouse

# Python 3.12 venv with the image list, .whl/ built with it (DeepSpeed against torch 2.11), .whl/
# installed with --no-index --no-deps --target, and every stage module checked importable.
device-replica:
	DEVICE_VENV=$(DEVICE_VENV) bash bench/device_replica.sh

# The wheels the device image lacks (bench/wheelhouse.txt) into .whl/, built with the replica's
# Python 3.12 and torch 2.11 (the device's), not with the CPU venv's.
wheelhouse: device-replica

# Every stage of bench/gpu_check.sh on CPU in the replica at a tiny configuration; exit 0 only when
# every stage selected, ran and recorded its numbers (summary status ok).
rehearse: device-replica
	PYTHON=$(abspath $(DEVICE_PY)) bash bench/gpu_check.sh --rehearse $(REHEARSAL_OUT)
