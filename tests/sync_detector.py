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

Pageable uploads on a CPU machine: there host and device are one device, `t.to(device)` dispatches
nothing and the copy rule above never fires. `UploadWatcher` (a TorchFunctionMode, entered with the
recorder) therefore tracks which tensors are HOST tensors on any machine: made inside a host_side()
region, by a factory call without `device=` (torch.zeros(n) is a CPU tensor on a CUDA run too), from
Python or numpy data, or computed from host tensors only. Moving one to a device (`.to(device)`,
`.cuda()`, `copy_` into a non-host tensor) outside host_side() without pinned memory and
non_blocking=True is reported as the pageable upload it is on CUDA. The same mode sees `.tolist()`
and `.numpy()` of a device tensor, which on a CPU tensor dispatch no op at all.
"""
from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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


def _where() -> str:
    frames = [f for f in traceback.extract_stack() if ("/sfd_fast/" in f.filename or "/tests/" in f.filename)
              and not f.filename.endswith("sync_detector.py")]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


class SyncRecorder(TorchDispatchMode):
    """Records (op, reason, where) for every op that would synchronise on CUDA."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str, str]] = []
        self.uploads = UploadWatcher(self.found)

    def __enter__(self):
        self.uploads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self.uploads.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not in_host_side():
            reason = why_sync(func, args, kwargs)
            if reason is not None:
                self.found.append((str(func), reason, _where()))
        return func(*args, **kwargs)


# factories that make a CPU tensor on every machine when called without device=
HOST_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.randn, torch.rand,
                  torch.randint, torch.randperm, torch.linspace, torch.tensor, torch.as_tensor,
                  torch.from_numpy, torch.stack, torch.cat}
_HOST_MARK = "_sfd_host_tensor"
HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy}


def _tensors(obj) -> list:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def is_host(t: torch.Tensor) -> bool:
    return bool(getattr(t, _HOST_MARK, False))


class UploadWatcher(TorchFunctionMode):
    """Host tensors and their moves to a device; see the module docstring."""

    def __init__(self, found: list):
        super().__init__()
        self.found = found

    def _upload_reason(self, func, args, kwargs) -> str | None:
        if func is torch.Tensor.copy_:
            dst, src = args[0], args[1]
            pinned_async = src.is_pinned() and (kwargs.get("non_blocking") or (len(args) > 2 and args[2]))
            return None if not is_host(src) or is_host(dst) or pinned_async else "pageable host-to-device copy_"
        src = args[0]
        if not isinstance(src, torch.Tensor) or not is_host(src):
            return None
        if not _has_device_target(func, args, kwargs):
            return None                          # a dtype cast stays on the host
        non_blocking = kwargs.get("non_blocking") or any(a is True for a in args[1:])
        if src.is_pinned() and non_blocking:
            return None
        return "host tensor moved to the device from pageable memory (or blocking)"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not in_host_side() and func in HOST_READS and not is_host(args[0]):
            # .tolist() / .numpy() of a CPU tensor dispatch no op (no _local_scalar_dense): seen here
            self.found.append((func.__name__, "reads a device value on the host", _where()))
        if not in_host_side() and func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.copy_):
            reason = self._upload_reason(func, args, kwargs)
            if reason is not None:
                self.found.append((getattr(func, "__name__", str(func)), reason, _where()))
        out = func(*args, **kwargs)
        if func in (torch.Tensor.to, torch.Tensor.cuda) and _has_device_target(func, args, kwargs):
            # the result lives on the device (on CPU it is often the same object as the source: it
            # then counts as uploaded, so a later .to(device) of it is not reported: a miss, never
            # a false report)
            _mark(out, False)
            return out
        inputs = _tensors((args, kwargs))
        if in_host_side() or (inputs and all(is_host(t) for t in inputs)) or (
                not inputs and func in HOST_FACTORIES and kwargs.get("device") is None):
            _mark(out, True)
        return out


def _has_device_target(func, args, kwargs) -> bool:
    if func is torch.Tensor.cuda:
        return True
    return kwargs.get("device") is not None or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])


def _mark(out, host: bool) -> None:
    for t in _tensors(out):
        try:
            setattr(t, _HOST_MARK, host)
        except (AttributeError, RuntimeError):
            pass
