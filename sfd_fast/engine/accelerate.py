"""The acceleration helpers: the attention policy, activation checkpointing, the loss-kernel choice,
torch.compile, the device numerics flags and the preflight of explicit requests.

They do the work; engine/plan.py decides, in one fixed order, which of them a run uses (ARCHITECTURE.md
property 4) and is the only caller. Each switch has an 'off' position that is a tested path.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .device import resolve_device

log = logging.getLogger("sfd_fast")

XFORMERS_HINT = ("engine.attention='xformers' was requested but xformers cannot be used here ({err}). "
                 "Install a wheel built for this torch (`pip install xformers`) on a CUDA machine, or set "
                 "engine.attention='sdpa' (or 'auto' to fall back)")


# --------------------------------------------------------------------------------------------------
# The SFD generator loss: reference torch or the fused Triton op
# --------------------------------------------------------------------------------------------------
KERNEL_CHOICES = ("auto", "torch", "triton")


def select_generator_loss(engine_cfg, device: torch.device):
    """The SFD generator-loss implementation for `engine.kernels`:

    * "torch":  the plain-torch reference `losses.generator_loss`;
    * "triton": the fused Triton op `sfd_fast.kernels.sfd_loss.sfd_generator_loss` (same signature and
      gradients). Without Triton: ImportError with the install hint. On CPU tensors it runs only in
      Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported; tests only, slow):
      otherwise a RuntimeError says so. Never a silent fallback (ARCHITECTURE.md property 5);
    * "auto":   Triton on CUDA when it imports, else the reference; logs what it chose.
    """
    from ..losses import generator_loss

    choice = getattr(engine_cfg, "kernels", "auto")
    device = torch.device(device)
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"engine.kernels={choice!r}; expected one of {KERNEL_CHOICES}")
    if choice == "torch":
        return generator_loss
    from ..kernels.triton_support import require_triton, triton_available

    if choice == "auto":
        if device.type == "cuda" and triton_available():
            from ..kernels import sfd_loss

            if not sfd_loss.kernel_interpreted():
                log.info("engine.kernels=auto -> triton (fused SFD generator loss on %s)", device)
                return sfd_loss.sfd_generator_loss
            why = "TRITON_INTERPRET=1 is set (interpreter mode is for tests, not speed)"
        else:
            why = "no CUDA device" if device.type != "cuda" else "triton is not importable"
        log.info("engine.kernels=auto -> torch reference generator loss (%s)", why)
        return generator_loss
    # explicit "triton": fail loudly, with what to do
    require_triton("engine.kernels='triton' (the fused SFD generator loss)")
    from ..kernels import sfd_loss

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


def _compile_backend(backend: str | None) -> str:
    import os

    return backend or os.environ.get(COMPILE_BACKEND_ENV) or "inductor"


def _compile_kwargs(engine_cfg, backend: str) -> dict:
    # mode applies to inductor only (the test backends take no options)
    mode = getattr(engine_cfg, "compile_mode", "default")
    return {"mode": mode} if backend == "inductor" and mode != "default" else {}


def compile_networks(denoisers, engine_cfg, backend: str | None = None) -> list[torch.nn.Module]:
    """torch.compile each denoiser's backbone `net` in place (`nn.Module.compile`), when
    `engine.compile` is true; returns the compiled nets (empty when off).

    Why per network and in place:
      * the networks are >99% of the FLOPs; compiling `net` keeps the step readable and the graphs
        small, one per (network, batch shape, grad mode);
      * `Module.compile` keeps the module object and its parameter names, so checkpoints, EMA
        (foreach over .parameters()), optimizers and FrozenView's functional_call are untouched
        (an `OptimizedModule` wrapper would prefix every state_dict key with `_orig_mod.`);
      * fullgraph=True: a graph break is an error, not a silent eager island;
      * dynamic=False: each network sees a fixed set of batch shapes (B, or 2B with CFG), so
        static graphs never recompile after the first step. Sample grids (other batch sizes) run
        eagerly under `torch.compiler.set_stance("force_eager")` (trainer.save_grid), so they add
        no graph either. dynamo's recompile limit is left at its default: a recompile storm is an
        error to fix, not to hide (tests/test_compile.py counts recompiles and graph breaks).
    Graph inventory per step (all cached after step 1): generator (grad and no_grad), fake score
    (trained, and FrozenView's detached weights), teacher. Frozen networks are never toggled
    (requires_grad is fixed at setup), so the guards stay stable.
    """
    if not getattr(engine_cfg, "compile", False):
        return []
    backend = _compile_backend(backend)
    kwargs = _compile_kwargs(engine_cfg, backend)
    nets, seen = [], set()
    for d in denoisers:
        net = d.net
        if id(net) in seen:
            continue
        seen.add(id(net))
        if getattr(engine_cfg, "compile_regions", False):  # repeated blocks only (engine/regional.py)
            from .regional import compile_regions
            compile_regions(net, backend, **kwargs)
        else:
            net.compile(backend=backend, dynamic=False, fullgraph=True, **kwargs)
        nets.append(net)
    log.info("engine.compile: torch.compile(backend=%s, dynamic=False, fullgraph=True%s) on %d networks",
             backend, "".join(f", {k}={v}" for k, v in kwargs.items()), len(nets))
    return nets


def compile_phases(fake_score_phase, generator_phase, engine_cfg, backend: str | None = None):
    """(fake_score_phase, generator_phase), compiled by phase when `engine.compile_phase`: the fake
    score phase as ONE region (generator sample, noise corruption, fake-score evaluation with CFG, the
    loss with its masking and statistics); the generator phase as two (the sample x_g = G(z), then
    everything after it: corruption, both score evaluations with CFG, the SFD loss, its masking and
    statistics), joined in eager code by the hook that zeroes the gradient of non-finite rows at x_g
    (step.zero_rows_of_grad): that hook is known only after the forward, and a hook registered late
    on an intermediate of a compiled graph is mis-ordered by Dynamo (torch 2.11's Inductor refuses
    the graph). fullgraph=True and dynamic=False as for the networks. Returns the plain functions when
    off. When on, the generator phase returned is built from step.generator_sample and
    step.generator_loss_of_sample (the parts of step.generator_phase), not from the function passed in.
    The networks must not be compiled separately then."""
    if not getattr(engine_cfg, "compile_phase", False):
        return fake_score_phase, generator_phase
    from ..step import generator_sample, generator_loss_of_sample, zero_rows_of_grad

    backend = _compile_backend(backend)
    kwargs = dict(backend=backend, dynamic=False, fullgraph=True, **_compile_kwargs(engine_cfg, backend))
    log.info("engine.compile_phase: each phase compiled by regions (fake score 1, generator 2) (%s)", kwargs)
    sample, rest = torch.compile(generator_sample, **kwargs), torch.compile(generator_loss_of_sample, **kwargs)

    def compiled_generator_phase(ctx, draws):
        x_g = sample(ctx, draws)
        loss, stats, finite = rest(ctx, draws, x_g)
        zero_rows_of_grad(x_g, finite)
        return loss, stats
    return torch.compile(fake_score_phase, **kwargs), compiled_generator_phase


# cuBLAS picks a reduction split per call unless its workspace is fixed; this value is the one the
# CUDA and torch docs give for reproducible GEMMs (":16:8" uses less memory and is slower)
CUBLAS_WORKSPACE = ":4096:8"


def set_determinism(engine_cfg) -> dict:
    """engine.deterministic: the settings under which a CUDA run repeats bit for bit (and so a
    resumed run continues bit for bit): cudnn.benchmark off (autotuning may pick another kernel in
    another process), cudnn.deterministic, torch.use_deterministic_algorithms (warn_only: an op that
    has no deterministic CUDA implementation logs a warning naming itself instead of stopping the
    run) and CUBLAS_WORKSPACE_CONFIG (set before the first cuBLAS call: preflight and accelerate()
    both call this). Cost: the convolutions lose autotuning and some ops (scatter/index_add
    backward) take slower deterministic paths. On CPU every op used here is deterministic already."""
    if not getattr(engine_cfg, "deterministic", False):
        return {}
    import os
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    return {"deterministic": True, "cublas_workspace": os.environ["CUBLAS_WORKSPACE_CONFIG"]}


def set_device_flags(nets: list, engine_cfg, device: torch.device) -> dict:
    """cudnn.benchmark on CUDA (the UNet's convolutions run at fixed shapes: autotuned once, as the
    reference's training loop does) unless engine.deterministic; channels_last on the UNets when
    engine.channels_last (off by default: unmeasured on a GPU, and a CPU timing of the tiny UNet
    says nothing about GPU convolution layouts; docs/performance.md)."""
    done = set_determinism(engine_cfg)
    if device.type == "cuda" and not done:
        torch.backends.cudnn.benchmark = True
        done["cudnn_benchmark"] = True
    if getattr(engine_cfg, "channels_last", False):
        for _, net in nets:
            net.to(memory_format=torch.channels_last)
        done["channels_last"] = True
    return done


# --------------------------------------------------------------------------------------------------
# Explicit requests, checked before any model is built
# --------------------------------------------------------------------------------------------------

def check_xformers(device: torch.device | None = None):
    """Raise with the install hint unless xformers imports and can run (CUDA only)."""
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:
        raise RuntimeError(XFORMERS_HINT.format(err=f"{type(e).__name__}: {e}")) from None
    if device is not None and device.type != "cuda":
        raise RuntimeError(XFORMERS_HINT.format(err=f"xformers kernels run on CUDA only; run.device is {device}"))


def preflight(cfg, device: torch.device | None = None):
    """Every 'explicit request' of the engine section, checked before any model is built."""
    e = cfg.engine
    set_determinism(e)     # before anything can create a cuBLAS handle
    if e.backend == "deepspeed":
        from .distributed import validate_world, world_size_from_env
        validate_world(cfg, world_size_from_env())
        try:
            import deepspeed  # noqa: F401
        except Exception as err:
            from .distributed import DS_HINT
            raise RuntimeError(DS_HINT.format(err=f"{type(err).__name__}: {err}")) from None
    if e.optimizer == "adam8bit":
        from .optim import require_bitsandbytes
        require_bitsandbytes()
    if e.attention == "xformers":
        if device is None:
            device = resolve_device(cfg.run.device)
        check_xformers(device)
    if e.deepspeed_config and e.backend == "deepspeed":
        from .distributed import read_user_ds_json
        read_user_ds_json(e.deepspeed_config)


def resolve_attention(requested: str, device: torch.device | None) -> str:
    """The one attention policy: 'sdpa' | 'xformers' as asked ('xformers' raises with the install
    hint when it cannot run); 'auto' -> xformers on a CUDA device where it imports, else SDPA, and
    says which it chose."""
    if requested == "xformers":
        check_xformers(device)
        return "xformers"
    if requested != "auto":
        return requested
    choice, why = "sdpa", "not a CUDA device"
    if device is not None and device.type == "cuda":
        try:
            check_xformers(device)
            choice, why = "xformers", "xformers imports"
        except RuntimeError as e:
            why = str(e).split("(", 1)[-1].split(")", 1)[0]
    log.info("engine.attention auto -> %s (%s)", choice, why)
    return choice


# ---------------------------------------------------------------------------------------------------
# attention backend and activation checkpointing (both backends)
# ---------------------------------------------------------------------------------------------------

_CKPT_CLASSES: dict = {}


def _checkpointed_class(cls):
    """A subclass of `cls` whose forward runs under torch.utils.checkpoint (state_dict unchanged)."""
    if getattr(cls, "_sfd_checkpointed", False):
        return cls
    if cls not in _CKPT_CLASSES:
        def forward(self, *args, **kwargs):
            if getattr(self, "_sfd_recompute", False) or not torch.is_grad_enabled():
                return cls.forward(self, *args, **kwargs)
            # The weights go into the checkpoint as explicit inputs, so the recomputation uses the
            # same tensors as the forward, also under functional_call (FrozenView's detached weights).
            named = dict(self.named_parameters())
            names, n = list(named), len(args)

            def run(*flat):
                self._sfd_recompute = True
                try:
                    return torch.func.functional_call(self, dict(zip(names, flat[n:])), tuple(flat[:n]), kwargs)
                finally:
                    self._sfd_recompute = False
            return torch.utils.checkpoint.checkpoint(run, *args, *named.values(), use_reentrant=False)
        _CKPT_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (cls,),
                                  {"forward": forward, "_sfd_checkpointed": True})
    return _CKPT_CLASSES[cls]


def apply_attention_and_checkpointing(nets: list, engine_cfg, device: torch.device | None = None) -> dict:
    """Attention backend and activation checkpointing on `nets` [(role, module)] (idempotent).

    diffusers UNets: set_attn_processor(AttnProcessor2_0) (SDPA) or
    enable_xformers_memory_efficient_attention(); enable_gradient_checkpointing().
    Digits MLP (no attention): its residual blocks run under torch.utils.checkpoint.
    Returns what was applied, per network, for the log."""
    applied = {}
    attention = resolve_attention(engine_cfg.attention, device)
    for role, net in nets:
        done = []
        has_attn = hasattr(net, "set_attn_processor")
        if has_attn and attention == "xformers":
            net.enable_xformers_memory_efficient_attention()
            done.append("xformers")
        elif has_attn:
            from diffusers.models.attention_processor import AttnProcessor2_0
            net.set_attn_processor(AttnProcessor2_0())
            done.append("sdpa")
        if engine_cfg.activation_checkpointing:
            if hasattr(net, "enable_gradient_checkpointing"):
                net.enable_gradient_checkpointing()
                done.append("checkpointing(diffusers)")
            elif isinstance(getattr(net, "blocks", None), nn.ModuleList):
                for block in net.blocks:
                    block.__class__ = _checkpointed_class(type(block))
                done.append(f"checkpointing({len(net.blocks)} blocks)")
            else:
                raise RuntimeError(f"engine.activation_checkpointing: the {role} network "
                                   f"({type(net).__name__}) has no known checkpointing hook")
        applied[role] = done
    if any(applied.values()):
        log.info("attention/checkpointing: %s", applied)
    return applied
