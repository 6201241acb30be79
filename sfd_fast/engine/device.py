"""The run's device and its precision context (CUDA is queried only when called, never at import)."""
from __future__ import annotations

import contextlib
import logging

import torch

from ..errors import UserError

log = logging.getLogger("sfd_fast")


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present (queried here, at run time, never at import)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("device auto -> %s", name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"run.device={name!r} but CUDA is not available on this machine; use 'cpu' or 'auto'")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"run.device={name!r} is not a device torch knows; use 'auto', 'cpu' or 'cuda[:N]'") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"run.device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"run.device={name!r} but MPS is not available on this machine; use 'cpu' or 'auto'")
    return device


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast for compute; weights, gradients and optimizer state stay fp32 (master weights)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
