import os
import sys

# CPU tier: deterministic, small thread count, Triton in interpreter mode for kernel tests
os.environ.setdefault("TRITON_INTERPRET", "1")
# The CPU tier's networks are tiny: intra-op threads only add synchronisation overhead, and on a
# shared 2-core machine (or 2 DeepSpeed ranks) they oversubscribe the cores badly (seen: 50x slower).
# Set before torch is imported so subprocesses (torchrun ranks) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test (OMP_NUM_THREADS is read once, at torch's import, and a
    test may run after one that raised it): on a shared 2-core machine two threads per process
    oversubscribe the cores and make tiny ops ~50x slower, and a single thread keeps the reduction
    order of the memory and sync probes the same on every run."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run by bench/gpu_check.sh)")
    config.addinivalue_line("markers", "slow: end-to-end runs that take tens of seconds")
