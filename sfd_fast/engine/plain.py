"""The plain backend: one process, two fused Adam optimizers, safetensors checkpoints.

A backend is what differs between running the SFD loop in one process and under DeepSpeed; the
loop itself (trainer.py) exists once. Its interface, which engine/deepspeed.py implements too:

    rank, world, is_rank0       who this process is
    denom                       rows of one branch per optimizer step on this rank (loss normaliser)
    phase_generator             the generator as the phases call it (module or engine)
    phase_fake_score            the fake score in its own update (its .output is trained)
    fake_score_view             the fake score inside the generator loss (weights detached)
    draw(phase, remain_coef, forget_coef) -> PhaseDraws       this rank's rows of one micro-batch
    backward(role, loss)        per micro-batch
    update(role)                after the accumulation: the optimizer step with the non-finite skip
    generator_phase()           context around the generator update (trainer.frozen_fake_score.during())
    ema_pairs()                 context -> (ema params, generator params) for the EMA lerp
    reduce_stats(stats)         per-rank sums -> global sums (a collective under DeepSpeed)
    sampling_generator()        the module to sample grids/evaluation from (collective under DeepSpeed)
    release_sampling()          after grids/evaluation: DeepSpeed frees its temporary fp32 copy
    save(state) -> Path         one atomic checkpoint folder; load(ckpt) -> trainer state dict
    barrier(), finish()
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, load_weights_into, optimizer_from_flat, save_checkpoint
from ..step import PhaseDraws, draw_phase
from .optim import make_optimizer, nonfinite_flag

ROLES = ("fake_score", "generator")


class PlainBackend:
    name = "plain"
    rank, world, is_rank0 = 0, 1, True

    def __init__(self, trainer):
        cfg = trainer.cfg
        self.trainer = trainer
        self.micro = cfg.train.batch_size // cfg.train.grad_accum
        self.denom = cfg.train.batch_size
        self.phase_generator = trainer.generator
        self.phase_fake_score = trainer.fake_score
        # the fake score inside the generator loss: the plan's FrozenFakeScore (denoisers.py)
        self.fake_score_view = trainer.frozen_fake_score.view
        modules = {"fake_score": trainer.fake_score, "generator": trainer.generator}
        self.params = {r: [p for p in modules[r].parameters() if p.requires_grad] for r in ROLES}
        # fused Adam (fp32 master weights), or bitsandbytes 8-bit Adam: engine/optim.py
        self.optimizers = {r: make_optimizer(getattr(cfg.optim, r), cfg.engine, self.params[r], trainer.device)
                           for r in ROLES}
        self.clip = {r: getattr(cfg.optim, r).grad_clip_value for r in ROLES}

    # ---------------------------------------------------------------- one step
    def draw(self, phase: str, remain_coef: float, forget_coef: float) -> PhaseDraws:
        t, s = self.trainer, self.trainer.cfg.sfd
        n_forget = self.micro if forget_coef > 0 else 0
        return draw_phase(t.parts.task, t.rng, self.micro, n_forget, t.parts.sample_shape, s.t_min, s.t_max,
                          remain_coef, forget_coef, t.device, phase)

    def backward(self, role: str, loss: torch.Tensor) -> None:
        loss.backward()

    def update(self, role: str) -> None:
        """One optimizer step, skipped on the device when any gradient is non-finite.

        The flag feeds fused Adam's `found_inf`: a set flag leaves weights and optimizer state
        exactly unchanged, with no host sync; the gradients are then discarded (set_to_none), so
        no per-parameter clean-up is needed."""
        params, opt = self.params[role], self.optimizers[role]
        grads = [p.grad for p in params if p.grad is not None]
        flag = nonfinite_flag(grads, grads[0].device if grads else self.trainer.device)
        if self.clip[role] is not None:
            torch.nn.utils.clip_grad_value_(params, self.clip[role], foreach=True)
        opt.found_inf = flag.to(self.trainer.device)
        opt.grad_scale = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.trainer.skipped[ROLES.index(role)] += flag

    def generator_phase(self):
        return self.trainer.frozen_fake_score.during()

    @contextlib.contextmanager
    def ema_pairs(self):
        t = self.trainer
        yield list(t.generator_ema.parameters()), [p.detach() for p in t.generator.parameters()]

    def reduce_stats(self, stats: torch.Tensor) -> torch.Tensor:
        return stats

    def sampling_generator(self):
        return self.trainer.generator_ema

    def release_sampling(self) -> None:
        pass    # generator_ema is the EMA copy (run state) or the generator itself: nothing to free

    # ---------------------------------------------------------------- checkpoints
    def save(self, state: dict) -> Path:
        t = self.trainer
        weights = {"generator": t.generator.net.state_dict(), "fake_score": t.fake_score.net.state_dict()}
        if t.ema_enabled:
            weights["generator_ema"] = t.generator_ema.net.state_dict()
        task_rng = t.parts.task.rng_state() if hasattr(t.parts.task, "rng_state") else None
        return save_checkpoint(t.run_dir, t.step, weights, self.optimizers, {**state, "backend": "plain"},
                               t.rng.get_state(), task_rng)

    def load(self, ckpt: Path) -> dict:
        t = self.trainer
        ck = load_checkpoint(ckpt)
        if ck["state"].get("backend", "plain") != "plain":
            raise RuntimeError(f"{ckpt} was written by the {ck['state']['backend']} backend; resume it with "
                               f"engine.backend={ck['state']['backend']!r}")
        for role, module in (("generator", t.generator), ("fake_score", t.fake_score),
                             ("generator_ema", t.generator_ema if t.ema_enabled else None)):
            if module is not None:
                load_weights_into(module.net, ck["weights"][role], ckpt / f"{role}.safetensors")
        meta = ck["state"]["optimizers"]
        for role in ROLES:
            optimizer_from_flat(self.optimizers[role], ck["optim"][role], meta[role])
        t.rng.set_state(ck["rng"])
        if ck.get("task_rng") is not None and hasattr(t.parts.task, "set_rng_state"):
            t.parts.task.set_rng_state(ck["task_rng"])
        return ck["state"]

    def barrier(self) -> None:
        pass

    def finish(self) -> None:
        pass
