"""GPU telemetry for the tick record (nvidia-ml-py / pynvml), imported lazily.

Free and silent without a GPU: nothing is imported and CUDA is never queried unless the trainer's
device is a CUDA device.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("sfd_fast")
_NVML = {"state": None, "handles": {}}   # state: None (untried), False (unavailable), module


def _nvml():
    if _NVML["state"] is None:
        try:
            import pynvml
            pynvml.nvmlInit()
            _NVML["state"] = pynvml
        except Exception as e:  # not installed, or no driver
            log.info("GPU telemetry off (nvidia-ml-py/pynvml not usable: %s); pip install nvidia-ml-py", e)
            _NVML["state"] = False
    return _NVML["state"]


def gpu_telemetry(device: torch.device) -> dict:
    """{'gpu_mem_used_bytes', 'gpu_util_percent', 'gpu_power_w'} for a CUDA device, else {}."""
    if device.type != "cuda":
        return {}
    nv = _nvml()
    if not nv:
        return {}
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = _NVML["handles"].get(index)
        if handle is None:
            handle = None
            props = torch.cuda.get_device_properties(index)
            bus = getattr(props, "pci_bus_id", None)
            if bus is not None:  # respects CUDA_VISIBLE_DEVICES (NVML counts physical devices)
                dom = getattr(props, "pci_domain_id", 0)
                dev = getattr(props, "pci_device_id", 0)
                try:
                    handle = nv.nvmlDeviceGetHandleByPciBusId(f"{dom:08x}:{bus:02x}:{dev:02x}.0")
                except Exception:
                    handle = None
            if handle is None:
                handle = nv.nvmlDeviceGetHandleByIndex(index)
            _NVML["handles"][index] = handle
        mem = nv.nvmlDeviceGetMemoryInfo(handle)
        util = nv.nvmlDeviceGetUtilizationRates(handle)
        power_mw = nv.nvmlDeviceGetPowerUsage(handle)
        return {"gpu_mem_used_bytes": int(mem.used), "gpu_util_percent": float(util.gpu),
                "gpu_power_w": power_mw / 1000.0}
    except Exception as e:  # telemetry must never stop training
        log.debug("GPU telemetry failed: %s", e)
        return {}
