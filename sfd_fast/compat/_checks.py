"""Argument checks shared by the compat functions: a clear ValueError naming the argument.

The reference functions fail late and obscurely on these inputs (a shape error deep inside the UNet,
or a silently broadcast loss); the compat functions check before any network runs.
"""
from __future__ import annotations

import torch


def check_latents(name: str, x, ndim: int = 4) -> int:
    """x must be a floating tensor of rank `ndim`; returns its batch size."""
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() != ndim:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be a floating tensor of shape [B, C, H, W]; got {shape}")
    return x.shape[0]


def check_same_shape(name: str, x, like_name: str, like) -> None:
    if not torch.is_tensor(x) or x.shape != like.shape:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}; got {shape}")


def check_timesteps(name: str, t, batch: int, num_timesteps: int | None = None) -> None:
    """t must be an integer tensor of shape [batch] (one timestep per sample)."""
    if not torch.is_tensor(t) or t.dim() != 1 or t.shape[0] != batch:
        shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
        raise ValueError(f"{name} must be a tensor of shape [{batch}] (one integer timestep per sample); got "
                         f"{shape}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer timesteps (torch.long); got dtype {t.dtype}")
    # No range check here: it would need a host sync on every call; an out-of-range index raises
    # in the table lookup (an index error on CPU, a device assert on CUDA), as in the reference.


def check_prompts(name: str, prompts, batch: int) -> list[str]:
    """prompts must be a list/tuple of `batch` strings; returns it as a list."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"{name} must be a list or tuple of {batch} strings (one prompt per sample); got "
                         f"{type(prompts).__name__}")
    if len(prompts) != batch:
        raise ValueError(f"{name} has {len(prompts)} prompts but the batch has {batch} samples; pass one "
                         f"prompt per sample")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{name} must hold strings; got {bad[0]}")
    return list(prompts)


def check_labels(name: str, c, batch: int) -> None:
    if not torch.is_tensor(c) or c.dim() != 1 or c.shape[0] != batch:
        shape = tuple(c.shape) if torch.is_tensor(c) else type(c).__name__
        raise ValueError(f"{name} must be a tensor of shape [{batch}] (one class label per sample); got {shape}")
