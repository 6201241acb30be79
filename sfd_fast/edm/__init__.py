"""The EDM family (NVlabs/edm networks, SiD's EDM distillation; class forgetting on CIFAR-10, spec §1c).

    sfd_fast.edm.build_network("training.networks.VPPrecond", img_resolution=32, img_channels=3, ...)
    sfd_fast.edm.load_snapshot("edm-cifar10-32x32-cond-vp.pkl", entry="ema")

load_snapshot reads EDM / SiD `.pkl` snapshots WITHOUT executing the source code they embed
(snapshot.py); safetensors exports are read too. Imported lazily so that reading a config does not
import torch.
"""
from __future__ import annotations

_EXPORTS = {"build_network": "precond", "UnsupportedNetworkError": "precond", "VPPrecond": "precond",
            "VEPrecond": "precond", "EDMPrecond": "precond", "SongUNet": "unets", "DhariwalUNet": "unets",
            "load_snapshot": "snapshot", "SnapshotError": "snapshot"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sfd_fast.edm' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
