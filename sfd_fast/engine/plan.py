"""The acceleration plan: the ONE place that decides how a run executes, in a fixed order.

    1. precision      autocast around each phase (bf16 or off); trained weights stay fp32 (master
                      weights), frozen networks keep the dtype their family built them in; the
                      device numerics flags (engine.deterministic / cudnn autotuning, channels_last)
    2. attention      one policy (accelerate.resolve_attention) on every UNet, the EMA copy included
    3. checkpointing  activation checkpointing of the teacher, fake score and generator; with it the
                      fake score's freeze in the generator phase (FrozenFakeScore, decided once)
    4. loss kernel    the reference torch generator loss or the fused Triton op (engine.kernels)
    5. compile        each network's backbone, or each whole phase (engine.compile / compile_phase)
    6. micro-batch    train.micro_batch "auto": estimate, one probe step on the networks as they
                      will run (compiled ones included), the choice written into cfg.train
    7. backend        plain optimizers or two DeepSpeed ZeRO engines: last, because the DeepSpeed
                      config takes the micro-batch and the engines wrap the finished networks

`plan_acceleration(trainer)` applies them in this order and returns the `AccelerationPlan`, which
the trainer logs as one block and writes to RUN_DIR/acceleration_plan.json, so a reader of a run
knows exactly what ran. The helpers that do the work live in accelerate.py, autobatch.py and the
backends; no other module calls them (tests/test_plan.py greps for it).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint import atomic_write_json
from ..denoisers import FrozenFakeScore

log = logging.getLogger("sfd_fast")
PLAN_FILE = "acceleration_plan.json"


@dataclass
class AccelerationPlan:
    precision: dict = field(default_factory=dict)
    attention: dict = field(default_factory=dict)
    checkpointing: dict = field(default_factory=dict)
    fake_score_in_generator_phase: str = ""
    loss_kernel: str = ""
    compile: dict = field(default_factory=dict)
    micro_batch: dict = field(default_factory=dict)
    backend: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        d = self.as_dict()
        steps = [("1. precision", d["precision"]), ("2. attention", d["attention"]),
                 ("3. checkpointing", d["checkpointing"]),
                 ("   fake score in the generator phase", d["fake_score_in_generator_phase"]),
                 ("4. loss kernel", d["loss_kernel"]), ("5. compile", d["compile"]),
                 ("6. micro-batch", d["micro_batch"]), ("7. backend", d["backend"])]
        return [f"  {name}: {value}" for name, value in steps]

    def log(self) -> None:
        log.info("acceleration plan (engine/plan.py, in this order):\n%s", "\n".join(self.lines()))

    def write(self, run_dir: Path) -> Path:
        return atomic_write_json(Path(run_dir) / PLAN_FILE, self.as_dict())


def _frozen_dtypes(trainer) -> dict:
    def dtype(module):
        p = next(iter(module.parameters()), None)
        return str(p.dtype).replace("torch.", "") if p is not None else "none"
    return {"teacher": dtype(trainer.teacher), "fake_score": dtype(trainer.fake_score),
            "generator": dtype(trainer.generator)}


def plan_acceleration(trainer, generator_loss_fn=None) -> AccelerationPlan:
    """Apply engine.* to a freshly built SFDTrainer, once, in the documented order (module docstring).
    Sets trainer.autocast, .frozen_fake_score, .loss_fn, .fake_score_phase_fn / .generator_phase_fn,
    .micro_batch_choice and .backend; returns the plan."""
    from ..step import fake_score_phase, generator_phase
    from . import make_backend
    from .accelerate import (apply_attention_and_checkpointing, compile_networks, compile_phases,
                             select_generator_loss, set_device_flags)
    from .device import autocast_context
    cfg, e, device = trainer.cfg, trainer.cfg.engine, trainer.device
    plan = AccelerationPlan()
    nets = [("teacher", trainer.teacher.net), ("fake_score", trainer.fake_score.net),
            ("generator", trainer.generator.net)]

    # 1. precision and numerics
    trainer.autocast = lambda: autocast_context(e.precision, device)
    plan.precision = {"autocast": e.precision, "weights": _frozen_dtypes(trainer),
                      **set_device_flags(nets, e, device)}

    # 2. attention and 3. activation checkpointing (one pass per network; the EMA copy never runs a
    #    backward, so it gets the attention policy only)
    applied = apply_attention_and_checkpointing(nets, e, device)
    if trainer.ema_enabled and hasattr(trainer.generator_ema.net, "set_attn_processor"):
        no_ckpt = copy.copy(e)
        no_ckpt.activation_checkpointing = False
        applied.update(apply_attention_and_checkpointing([("generator_ema", trainer.generator_ema.net)],
                                                         no_ckpt, device))
    plan.attention = {role: [d for d in done if not d.startswith("checkpointing")] or ["none (no attention)"]
                      for role, done in applied.items()}
    plan.checkpointing = {role: [d for d in done if d.startswith("checkpointing")] or ["off"]
                          for role, done in applied.items() if role != "generator_ema"}
    zero3 = e.backend == "deepspeed" and e.zero_stage == 3
    trainer.frozen_fake_score = FrozenFakeScore.for_run(trainer.fake_score, zero3)
    plan.fake_score_in_generator_phase = trainer.frozen_fake_score.describe()

    # 4. the SFD generator-loss implementation
    trainer.loss_fn = generator_loss_fn or select_generator_loss(e, device)
    plan.loss_kernel = getattr(trainer.loss_fn, "__module__", "?") + "." + getattr(trainer.loss_fn, "__name__", "?")

    # 5. compile: each network's backbone (after the EMA copy, which stays eager), or each phase
    compiled = compile_networks([trainer.teacher, trainer.fake_score, trainer.generator.denoiser], e)
    trainer.fake_score_phase_fn, trainer.generator_phase_fn = compile_phases(fake_score_phase, generator_phase, e)
    plan.compile = {"networks": len(compiled), "phases": bool(getattr(e, "compile_phase", False)),
                    "mode": getattr(e, "compile_mode", "default")}

    # 6. micro-batch: train.micro_batch "auto" is resolved on the networks as they will run
    trainer.micro_batch_choice = None
    t = cfg.train
    if t.micro_batch == "auto":
        from .autobatch import resolve_auto_micro_batch
        world = torch.distributed.get_world_size() if e.backend == "deepspeed" else 1
        trainer.micro_batch_choice = resolve_auto_micro_batch(trainer, world)
        plan.micro_batch = {k: v for k, v in trainer.micro_batch_choice.items() if k != "message"}
    else:
        plan.micro_batch = {"micro_batch": t.micro_batch, "grad_accum": t.grad_accum, "batch_size": t.batch_size}

    # 7. the backend wraps last
    trainer.backend = make_backend(trainer)
    plan.backend = {"name": trainer.backend.name, "world": trainer.backend.world, "optimizer": e.optimizer,
                    **({"zero_stage": e.zero_stage} if e.backend == "deepspeed" else {})}
    return plan
