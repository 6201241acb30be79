"""Measurement helpers shared by the step benchmark, the GPU tier and the GPU check summary.

Peak: a large bf16 matmul timed in THIS process (PERFORMANCE.md: never a datasheet number).
FLOPs: torch.utils.flop_counter.FlopCounterMode on one real step (forward + backward of every
network, as executed), or the PERFORMANCE.md table (18F per SFD sample with CFG in all three places).
"""
from __future__ import annotations

import functools
import time

import torch

SD15_UNET_FWD_FLOPS = 677e9          # F: one SD1.5 UNet forward, one sample, 4x64x64, 77 tokens
SD15_FWD_EQUIV_PER_SAMPLE_CFG = 18   # PERFORMANCE.md table: 18F per SFD sample (kappa != 1)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def peak_bf16_matmul_flops(n: int = 8192, iters: int = 20) -> float:
    """Measured dense bf16 matmul rate of the current CUDA device, FLOP/s (median of `iters`)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    del a, b
    return 2 * n ** 3 / times[len(times) // 2]


def count_flops(fn) -> int:
    """Total FLOPs (matmul/conv/attention, forward and backward) of one call of fn()."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def table_flops_per_step(sfd_samples: int, latent_side: int = 64) -> float:
    """PERFORMANCE.md table: 18F per SFD sample, F scaled by latent area from 64x64."""
    return SD15_FWD_EQUIV_PER_SAMPLE_CFG * SD15_UNET_FWD_FLOPS * (latent_side / 64) ** 2 * sfd_samples


def reset_peak_memory(device) -> None:
    from sfd_fast.engine.memory import reset_peak_memory as reset
    reset(device)


def peak_memory(device) -> dict:
    """The trainer's peak-memory helper (sfd_fast.engine.memory.peak_memory), in the benches' keys:
    CUDA peak allocated and reserved bytes since the last reset; CPU the process's peak RSS (ru_maxrss,
    monotone over the whole process, so it is an upper bound for later cases)."""
    from sfd_fast.engine.memory import peak_memory as peak
    mem = peak(device)
    if "peak_mem_reserved_bytes" in mem:
        return {"peak_mem_bytes": mem["peak_mem_bytes"], "peak_reserved_bytes": mem["peak_mem_reserved_bytes"]}
    return {**mem, "peak_mem_kind": "process peak RSS"}


def timed(fn, device, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out
