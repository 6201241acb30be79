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
    """Compile one module in place (see `compile_networks`); kept for callers outside the trainer."""
    if enabled:
        module.compile(dynamic=False)
    return module


def make_adam(params, lr, betas, eps, weight_decay, device: torch.device) -> torch.optim.Optimizer:
    """Adam with the fused implementation: one kernel per step on CPU and CUDA, and it takes a
    device-side `found_inf` flag, which lets the trainer skip a non-finite update without a host
    sync (optimizer state and weights are left exactly unchanged)."""
    return torch.optim.Adam(list(params), lr=lr, betas=tuple(betas), eps=eps,
                            weight_decay=weight_decay, fused=True)


# --------------------------------------------------------------------------------------------------
# The SFD generator loss: reference torch or the fused Triton op
# --------------------------------------------------------------------------------------------------
KERNEL_CHOICES = ("auto", "torch", "triton")


def select_generator_loss(engine_cfg, device: torch.device):
    """The SFD generator-loss implementation for `engine.kernels`:

    * "torch":  the plain-torch reference `losses.generator_loss`;
    * "triton": the fused Triton op `sfd_fast.kernels.sfd_generator_loss` (same signature and
      gradients). Without Triton: ImportError with the install hint. On CPU tensors it runs only in
      Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported; tests only, slow):
      otherwise a RuntimeError says so. Never a silent fallback (ARCHITECTURE.md property 5);
    * "auto":   Triton on CUDA when it imports, else the reference; logs what it chose.
    """
    from .losses import generator_loss

    choice = getattr(engine_cfg, "kernels", "auto")
    device = torch.device(device)
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"engine.kernels={choice!r}; expected one of {KERNEL_CHOICES}")
    if choice == "torch":
        return generator_loss
    from . import kernels as kernel_pkg

    if choice == "auto":
        if device.type == "cuda" and kernel_pkg.triton_available():
            from .kernels import sfd_loss

            if not sfd_loss.kernel_interpreted():
                log.info("engine.kernels=auto -> triton (fused SFD generator loss on %s)", device)
                return sfd_loss.sfd_generator_loss
            why = "TRITON_INTERPRET=1 is set (interpreter mode is for tests, not speed)"
        else:
            why = "no CUDA device" if device.type != "cuda" else "triton is not importable"
        log.info("engine.kernels=auto -> torch reference generator loss (%s)", why)
        return generator_loss
    # explicit "triton": fail loudly, with what to do
    kernel_pkg.require_triton("engine.kernels='triton' (the fused SFD generator loss)")
    from .kernels import sfd_loss

    if device.type != "cuda" and not sfd_loss.kernel_interpreted():
        raise RuntimeError(
            f"engine.kernels='triton' on device {device.type!r}: Triton kernels need CUDA. On CPU they "
            "run only in Triton's interpreter, for tests: set TRITON_INTERPRET=1 in the environment "
            "before starting Python. Otherwise use engine.kernels='torch' or 'auto'.")
    log.info("engine.kernels=triton -> fused SFD generator loss (%s)",
             "interpreter mode" if sfd_loss.kernel_interpreted() else device)
    return sfd_loss.sfd_generator_loss


# --------------------------------------------------------------------------------------------------
# torch.compile, applied here and nowhere else
# --------------------------------------------------------------------------------------------------
# Backend override for tests and debugging only ("aot_eager" checks graph capture and recompiles
# without paying inductor's code generation); runs use inductor.
COMPILE_BACKEND_ENV = "SFD_FAST_COMPILE_BACKEND"


def compile_networks(denoisers, engine_cfg, backend: str | None = None) -> list[torch.nn.Module]:
    """torch.compile each denoiser's backbone `net` in place (`nn.Module.compile`), when
    `engine.compile` is true; returns the compiled nets (empty when off).

    Why per network and in place:
      * the step's own code (draws, CFG combination, closed-form x0, loss, masking) is cheap
        elementwise work; the networks are >99% of the FLOPs. Compiling `net` keeps the step
        readable and the graphs small, one per (network, batch shape, grad mode);
      * `Module.compile` keeps the module object and its parameter names, so checkpoints, EMA
        (foreach over .parameters()), optimizers and FrozenView's functional_call are untouched
        (an `OptimizedModule` wrapper would prefix every state_dict key with `_orig_mod.`);
      * dynamic=False: each network sees a fixed set of batch shapes (B, or 2B with CFG), so
        static graphs never recompile after the first step; automatic dynamic shapes would
        recompile once more and give slower symbolic kernels.
    Graph inventory per step (all cached after step 1): generator (grad and no_grad), fake score
    (trained, and FrozenView's detached weights), teacher. Frozen networks are never toggled
    (requires_grad is fixed at setup), so the guards stay stable.
    """
    if not getattr(engine_cfg, "compile", False):
        return []
    import os

    backend = backend or os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
    # Five graph variants per backbone code object (see above) plus autocast on/off: stay well
    # inside the recompile limit (8 by default) even when several denoisers share a class.
    import torch._dynamo

    limit = max(getattr(torch._dynamo.config, "recompile_limit", 8), 16)
    torch._dynamo.config.recompile_limit = limit
    if hasattr(torch._dynamo.config, "cache_size_limit"):
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
    nets, seen = [], set()
    for d in denoisers:
        net = d.net
        if id(net) in seen:
            continue
        seen.add(id(net))
        net.compile(backend=backend, dynamic=False)
        nets.append(net)
    log.info("engine.compile: torch.compile(backend=%s, dynamic=False) on %d networks", backend, len(nets))
    return nets


def prepare_for_training(trainer) -> None:
    """Apply the engine's acceleration to a freshly built SFDTrainer (called once from __init__)."""
    compile_networks([trainer.teacher, trainer.fake_score, trainer.generator.denoiser], trainer.cfg.engine)
