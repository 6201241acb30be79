"""The run's device and its precision context (CUDA is queried only when called, never at import)."""
from __future__ import annotations

import contextlib
import logging
import threading

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


# ---------------------------------------------------------------------------------------------------
# host data -> device without a host sync
# ---------------------------------------------------------------------------------------------------
# A steady-state step must never wait for the GPU queue (PERFORMANCE.md). Two things would make it:
# reading a device value on the host (.item(), .tolist(), nonzero, boolean-mask indexing) and copying
# host data from pageable memory (`torch.tensor(list, device=cuda)`, `cpu_tensor.to(cuda)`: CUDA
# stages a pageable copy through a bounce buffer and blocks the host until it is done).
# tests/test_no_sync.py records every op of a steady-state step and fails on either, except inside
# `host_side()` regions: work that is on the host by construction (string choices drawn from a CPU
# generator, building a host tensor from Python data before `host_to_device` copies it).
_HOST_SIDE = threading.local()


@contextlib.contextmanager
def host_side():
    """Marks code whose tensors live on the host by design (never a device tensor read back)."""
    depth = getattr(_HOST_SIDE, "depth", 0)
    _HOST_SIDE.depth = depth + 1
    try:
        yield
    finally:
        _HOST_SIDE.depth = depth


def in_host_side() -> bool:
    """True inside a `host_side()` region (read by the sync detector of the tests)."""
    return getattr(_HOST_SIDE, "depth", 0) > 0


def host_to_device(data, dtype: torch.dtype, device) -> torch.Tensor:
    """Python data / numpy / a CPU tensor -> a tensor on `device`, without a host sync.

    On CUDA the host tensor is pinned and copied with non_blocking=True: the copy is queued on the
    current stream and the host moves on (the caching host allocator keeps the pinned block alive
    until the copy has run, so freeing it here is safe). On CPU it is the tensor itself."""
    device = torch.device(device)
    with host_side():
        host = torch.as_tensor(data, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    with host_side():      # CPU: the host tensor is the device tensor, nothing is copied
        return host.to(device)
