"""The reference class-conditional DDPM family (CIFAR-10 / STL-10 class forgetting, spec §1a, §4.1).

    sfd_fast.ddpm.load_reference_checkpoint(path, entry="ema", image_size=32, num_classes=10)

Imported lazily so that reading a config (sfd_fast.config) does not import torch.
"""
from __future__ import annotations


def __getattr__(name):
    if name in ("load_reference_checkpoint", "DDPMUNet", "DDPMArch"):
        from . import checkpoints, model
        return getattr(checkpoints if name == "load_reference_checkpoint" else model, name)
    raise AttributeError(f"module 'sfd_fast.ddpm' has no attribute {name!r}")


__all__ = ["load_reference_checkpoint", "DDPMUNet", "DDPMArch"]
