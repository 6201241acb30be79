"""Throughput of the fused SFD generator loss: providers torch-eager / torch-compile / triton,
modes fwd / bwd / full (pytest-benchmark).

    pytest bench/bench_kernels.py --benchmark-json=out.json            # CPU: small, < 30 s
    TRITON_INTERPRET=0 pytest bench/bench_kernels.py                   # CUDA: all three providers

Each case records in ``extra_info``: provider, mode, shape, dtype, device, the bytes the op must
move (fwd 3*N*e, bwd 6*N*e, full 9*N*e; see kernels/sfd_loss.py), the achieved GB/s at the median
time, and that as a share of the device's copy bandwidth measured in this process (not a datasheet
number, PERFORMANCE.md). The byte count is the op's minimum, so for torch-eager the "GB/s" is an
effective rate: it moves more bytes than that (upcasts, temporaries, saved intermediates).
"""
from __future__ import annotations

import functools
import importlib
import time

import pytest
import torch

import rehearsal
from sfd_fast.losses import generator_loss

ALPHA = 1.2
PROVIDERS = ["torch-eager", "torch-compile", "triton"]
MODES = ["fwd", "bwd", "full"]
# CPU cases are tiny (the CPU tier only checks that the suite runs and gives a baseline number);
# CUDA cases are SD-sized latents (4x64x64) at training batch sizes, and a 128x128 latent.
CPU_CASES = [((8, 4, 16, 16), torch.float32)]
CUDA_CASES = [
    ((8, 4, 64, 64), torch.bfloat16),
    ((64, 4, 64, 64), torch.bfloat16),
    ((16, 4, 128, 128), torch.bfloat16),
    ((64, 4, 64, 64), torch.float32),
]
if rehearsal.active():
    # gpu_check.sh --rehearse: the cuda-* cases run on CPU (Triton under its interpreter) at one
    # small shape per dtype; their ids are the device's (cuda-8x4x64x64-bfloat16 ...), their
    # extra_info says rehearsal and the shape actually run.
    REHEARSAL_SHAPE = (2, 4, 16, 16)
    CUDA_CASES = CUDA_CASES[:1]
_BYTES_FACTOR = {"fwd": 3, "bwd": 6, "full": 9}


# ---------------------------------------------------------------------------------------------------
# helpers (kept here: bench/conftest.py belongs to the shared suite)
# ---------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def _peak_copy_gbps(device: str) -> float:
    """Measured device-memory copy bandwidth (read + write bytes / median time), once per process."""
    n = (256 << 20) if device == "cuda" else (16 << 20)  # floats: 1 GiB on GPU, 64 MiB on CPU
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(3):  # warm-up
        dst.copy_(src)
    _sync(device)
    for _ in range(10):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * src.numel() * src.element_size() / times[len(times) // 2] / 1e9


@functools.lru_cache(maxsize=None)
def _kernel_module():
    return importlib.import_module("sfd_fast.kernels.sfd_loss")


@functools.lru_cache(maxsize=None)
def _compiled_ref():
    return torch.compile(generator_loss, fullgraph=True, dynamic=False)


def _loss_fn(provider: str, device: str):
    if provider == "torch-eager":
        return generator_loss
    if provider == "torch-compile":
        return _compiled_ref()
    if device != "cuda" and not rehearsal.active():
        pytest.skip("Triton needs CUDA for timing; interpreter mode is not a performance path")
    try:
        mod = _kernel_module()
    except ImportError as err:
        pytest.skip(f"Triton kernel unavailable: {err}")
    if not mod.triton_available():
        pytest.skip("Triton is not installed (`pip install triton`)")
    if mod.kernel_interpreted() and not rehearsal.active():
        pytest.skip("TRITON_INTERPRET=1 is set: run with TRITON_INTERPRET=0 to time the native kernel")
    return mod.sfd_generator_loss


def _cases():
    for device, cases in (("cpu", CPU_CASES), ("cuda", CUDA_CASES)):
        for shape, dtype in cases:
            marks = rehearsal.cuda_skip_marks(pytest, "the CUDA kernel cases") if device == "cuda" else []
            dname = str(dtype).replace("torch.", "")
            yield pytest.param(device, shape, dtype, marks=marks, id=f"{device}-{'x'.join(map(str, shape))}-{dname}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("device,shape,dtype", list(_cases()))
def test_sfd_generator_loss(benchmark, device, shape, dtype, provider, mode):
    rehearsing = device == "cuda" and rehearsal.active()
    if rehearsing:
        device, shape = "cpu", REHEARSAL_SHAPE
    fn = _loss_fn(provider, device)
    gen = torch.Generator().manual_seed(0)
    xg = torch.randn(shape, generator=gen)
    yr = xg + 0.5 * torch.randn(shape, generator=gen)
    yf = yr + 0.3 * torch.randn(shape, generator=gen)
    inputs = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (xg, yr, yf)]
    upstream = torch.randn(shape[0], generator=gen).to(device)

    # Warm up (and compile) once outside the timed region.
    loss = fn(*inputs, ALPHA)
    torch.autograd.grad(loss, inputs, upstream)
    _sync(device)

    setup = None
    if mode == "fwd":
        def target():
            fn(*inputs, ALPHA)
            _sync(device)
    elif mode == "bwd":
        # A fresh graph per round, built untimed: compiled backwards donate their buffers, so
        # retain_graph=True on one graph is not an option.
        def setup():
            graph_loss = fn(*inputs, ALPHA)
            _sync(device)
            return (graph_loss,), {}

        def target(graph_loss):
            torch.autograd.grad(graph_loss, inputs, upstream)
            _sync(device)
    else:
        def target():
            torch.autograd.grad(fn(*inputs, ALPHA), inputs, upstream)
            _sync(device)

    rounds = 3 if rehearsing else 20 if device == "cpu" else 100
    # iterations must be 1 when a setup is given (pytest-benchmark's rule).
    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0 if setup else 3)

    numel = xg.numel()
    nbytes = _BYTES_FACTOR[mode] * numel * torch.empty((), dtype=dtype).element_size()
    info = {"provider": provider, "mode": mode, "shape": list(shape), "dtype": str(dtype),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "bytes": nbytes,
            "rehearsal": rehearsing}
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        gbps = nbytes / median / 1e9
        peak = _peak_copy_gbps(device)
        info.update(median_s=median, gbps=gbps, peak_copy_gbps=peak, share_of_peak=gbps / peak)
    benchmark.extra_info.update(info)
