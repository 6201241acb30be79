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

.PHONY: demo test venv install install-test bench clean-demo help wheelhouse

help:
	@echo "make demo    create $(VENV), install, run the digits default end to end, print the metrics"
	@echo "make test    install the test extras and run the CPU test tier"
	@echo "make bench   run the throughput benchmarks (pytest bench/)"
	@echo "make wheelhouse  the wheels the GPU device image lacks, into .whl/ (docs/gpu_check.md)"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(VENV)/bin/python
ifeq ($(HAS_GPU),1)
	$(PIP) install -q "torch==$(TORCH_VERSION)"
else
	$(PIP) install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	@$(PY) -c "import torch,sys; v=torch.__version__; print('torch', v); sys.exit(0 if (not torch.version.cuda) else 'expected a CPU build of torch on a machine without a GPU, got ' + v)"
endif
	touch $@

$(VENV)/.installed: setup.py $(VENV)/.torch
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: setup.py $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
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
DEVICE_RUN = PYTHONPATH=$(CURDIR)/$(DEVICE_VENV)/wheel-site:$(CURDIR) $(CURDIR)/$(DEVICE_PY)
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
	bash bench/gpu_check.sh --rehearse $(REHEARSAL_OUT)
