"""The run's device and its precision context (CUDA is queried only when called, never at import)."""
from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("sfd_fast")


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present (queried here, at run time, never at import)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("device auto -> %s", name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name!r} but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device(name)


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast for compute; weights, gradients and optimizer state stay fp32 (master weights)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
