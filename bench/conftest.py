"""pytest configuration of the benchmark suites (pytest-benchmark).

    pytest bench/ --benchmark-json=out.json      # CPU cases; CUDA cases skip with a reason
    bench/gpu_check.sh RESULTS_DIR               # CUDA cases + the GPU test tier (see that script)

The suites record their measurements in each benchmark's `extra_info` (see bench_step.py and
bench_kernels.py). Nothing here queries CUDA at import time.
"""
from __future__ import annotations

import os
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
for p in (ROOT, BENCH_DIR):  # `import sfd_fast` from a checkout; `import sd_parts` etc.
    if p not in sys.path:
        sys.path.insert(0, p)

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skips with a reason without one)")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """The tiny random SD pipeline folder, built once per session (a few seconds)."""
    from sfd_fast.sd.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def pytest_collect_file(file_path, parent):
    """Collect the suites `bench_*.py` when a folder is given (`pytest bench/`); python_files keeps
    its default (test_*.py) for the rest of the project. An explicitly named file is already
    collected by pytest itself."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
