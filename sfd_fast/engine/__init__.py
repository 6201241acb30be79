"""Acceleration and backends, applied in one place (ARCHITECTURE.md property 4).

    device.py       the run's device and the precision (autocast) context
    plan.py         the acceleration plan: the one place that decides precision, attention,
                    checkpointing, loss kernel, compile, micro-batch and backend, in that order
    accelerate.py   the helpers the plan calls (attention policy, checkpointing, the SFD-loss kernel
                    choice, torch.compile, device flags) and the preflight of explicit requests
    optim.py        fused Adam / 8-bit Adam with the device-side non-finite skip
    plain.py        the one-process backend (and the backend interface)
    deepspeed.py    the DeepSpeed ZeRO backend; distributed.py: its config dict and process group
    telemetry.py    NVML readings for the tick record
"""
from __future__ import annotations

from .accelerate import (COMPILE_BACKEND_ENV, apply_attention_and_checkpointing, check_xformers,
                         compile_networks, preflight, resolve_attention, select_generator_loss)
from .device import autocast_context, resolve_device

__all__ = ["COMPILE_BACKEND_ENV", "apply_attention_and_checkpointing", "autocast_context",
           "check_xformers", "compile_networks", "make_backend", "preflight", "resolve_attention", "resolve_device",
           "select_generator_loss"]


def make_backend(trainer):
    """The backend object for `engine.backend` (the DeepSpeed one imports deepspeed only here); called
    by the acceleration plan (engine/plan.py), its last step."""
    if trainer.cfg.engine.backend == "deepspeed":
        from .deepspeed import DeepSpeedBackend
        return DeepSpeedBackend(trainer)
    from .plain import PlainBackend
    return PlainBackend(trainer)
