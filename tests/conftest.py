import os
import sys

# CPU tier: deterministic, small thread count, Triton in interpreter mode for kernel tests
os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run by bench/gpu_check.sh)")
    config.addinivalue_line("markers", "slow: end-to-end runs that take tens of seconds")
