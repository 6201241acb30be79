"""The rehearsal switch of the device check (docs/gpu_check.md, `bench/gpu_check.sh --rehearse OUT`).

With GPU_CHECK_REHEARSE=1 in the environment, every CUDA case of the benches (and the GPU tier)
runs on CPU at a tiny configuration instead of being skipped: the same test ids, selectors, code
paths and output files as on the device, only smaller (the tiny SD pipeline instead of SD1.5, a
tiny DDPM instead of the CIFAR-10 network, small kernel shapes under Triton's interpreter). The
numbers a rehearsal writes are marked `rehearsal: true` and prove only that each stage selects,
imports, runs and records; they are not performance figures.
"""
from __future__ import annotations

import os

ENV = "GPU_CHECK_REHEARSE"


def active() -> bool:
    return os.environ.get(ENV, "") == "1"


def gpu_device() -> str:
    """The device a CUDA case runs on: cuda, or cpu while rehearsing."""
    return "cpu" if active() else "cuda"


def cuda_skip_marks(pytest, what: str) -> list:
    """skipif(no CUDA) for a CUDA case, none while rehearsing (the case then runs on CPU)."""
    import torch

    if active():
        return []
    return [pytest.mark.skipif(not torch.cuda.is_available(), reason=f"no CUDA device: {what} needs a GPU")]
