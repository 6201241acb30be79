"""A recorder of ops that would make the host wait for a CUDA device (used by test_no_sync.py and
the GPU tier's reading of the same rules).

On a CPU machine nothing synchronises, so the recorder flags what WOULD on CUDA:
  * reading a device value on the host: aten._local_scalar_dense (.item(), .tolist(), bool(t)),
    aten.is_nonzero / equal / allclose;
  * ops whose output shape depends on the data (the host must read a count): nonzero, masked_select,
    unique, boolean-mask indexing (index / index_put with a bool index), repeat_interleave without
    output_size;
  * host data entering the step: aten.lift_fresh (a tensor built from Python data, which on CUDA is
    `torch.tensor(..., device=cuda)`, a pageable host-to-device copy), and any copy whose source is a
    CPU tensor that is not pinned into a non-CPU tensor.
Ops inside `sfd_fast.engine.device.host_side()` regions are skipped: those tensors are on the host by
construction (prompt choices from a CPU generator; host data staged by `host_to_device`, which pins it).
"""
from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sfd_fast.engine.device import in_host_side

aten = torch.ops.aten
READS_DEVICE = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
                aten.allclose.default}
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                  aten.unique_dim.default, aten.unique_consecutive.default, aten.repeat_interleave.Tensor}
HOST_DATA = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
COPIES = {aten._to_copy.default, aten.copy_.default}


def _pageable_upload(func, args, kwargs) -> bool:
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
        return src.device.type == "cpu" and dst.device.type != "cpu" and not src.is_pinned()
    src, target = args[0], kwargs.get("device")
    return (src.device.type == "cpu" and target is not None and torch.device(target).type != "cpu"
            and not src.is_pinned())


def _bool_index(func, args) -> bool:
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))


def why_sync(func, args, kwargs) -> str | None:
    """The reason `func(*args, **kwargs)` would synchronise on CUDA, or None."""
    if func in READS_DEVICE:
        return "reads a device value on the host"
    if func in DATA_DEPENDENT or _bool_index(func, args):
        return "output shape depends on the data"
    if func is aten.repeat_interleave.self_Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if func in HOST_DATA:
        return "tensor built from host data (torch.tensor(..., device=cuda) is a pageable copy)"
    if func in COPIES and _pageable_upload(func, args, kwargs):
        return "host-to-device copy from pageable memory"
    return None


class SyncRecorder(TorchDispatchMode):
    """Records (op, reason, where) for every op that would synchronise on CUDA."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not in_host_side():
            reason = why_sync(func, args, kwargs)
            if reason is not None:
                frames = [f for f in traceback.extract_stack()[:-1] if "/sfd_fast/" in f.filename
                          or "/tests/" in f.filename]
                where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
                self.found.append((str(func), reason, where))
        return func(*args, **kwargs)
