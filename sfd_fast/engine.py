"""Acceleration, applied in one place and in a fixed order (ARCHITECTURE.md property 4):
precision -> (attention backend) -> (activation checkpointing) -> torch.compile -> backend.

Each switch has an 'off' position that is a tested path.
"""
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


def maybe_compile(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    if not enabled:
        return module
    return torch.compile(module)


def make_adam(params, lr, betas, eps, weight_decay, device: torch.device) -> torch.optim.Optimizer:
    """Adam with the fused implementation: one kernel per step on CPU and CUDA, and it takes a
    device-side `found_inf` flag, which lets the trainer skip a non-finite update without a host
    sync (optimizer state and weights are left exactly unchanged)."""
    return torch.optim.Adam(list(params), lr=lr, betas=tuple(betas), eps=eps,
                            weight_decay=weight_decay, fused=True)


def select_generator_loss(engine_cfg, device: torch.device):
    """The SFD generator-loss implementation: the plain-torch reference for now ('torch'/'auto')."""
    from .losses import generator_loss
    if engine_cfg.kernels == "triton":
        raise RuntimeError("engine.kernels='triton' is not wired into the trainer yet")
    return generator_loss
