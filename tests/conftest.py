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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run by bench/gpu_check.sh)")
    config.addinivalue_line("markers", "slow: end-to-end runs that take tens of seconds")
