"""Adversarial training against the noise attack (train.adversarial): in every generator phase,
the first ceil(share x n_forget) forget rows take their input noise from a short noise search
against the current generator (the surrogate's log-probability of the row's forgotten class,
search.noise_search with this budget), so the forget loss is also paid where the attack would look.

The search starts from the rows' own draws and uses no random numbers, so the trainer's generator
stream, a replayed step and --resume stay exact. The fake-score phase is unchanged (it learns the
generator's distribution at ordinary noises). Cost: `steps` forward + input-backward passes of the
generator and the surrogate on the adversarial rows per generator phase.
"""
from __future__ import annotations

import math

import torch

from .search import noise_search


def adversarial_forget_rows(n_remain: int, n_forget: int, share: float) -> slice:
    """The rows whose noise is searched: the first ceil(share x n_forget) forget rows."""
    return slice(n_remain, n_remain + min(n_forget, math.ceil(share * n_forget)))


def install_adversarial_noise(trainer, surrogate: torch.nn.Module, cfg) -> None:
    """Wrap trainer.backend.draw so that generator-phase draws carry searched forget-row noise
    (cfg: share, steps, step_size, radius)."""
    backend = trainer.backend
    plain_draw = backend.draw
    surrogate = surrogate.to(trainer.device).eval().requires_grad_(False)

    def draw(phase: str, remain_coef: float, forget_coef: float):
        d = plain_draw(phase, remain_coef, forget_coef)
        if phase != "generator":
            return d
        n_remain = backend.micro                    # rows: micro remain rows, then the forget rows (no sync)
        rows = adversarial_forget_rows(n_remain, d.z.shape[0] - n_remain, cfg.share)
        if rows.stop == rows.start:
            return d
        labels = d.cond.generator_cond[rows]        # the forgotten class of each row (class families)
        gen = backend.phase_generator

        def objective(z):
            logp = torch.log_softmax(surrogate(gen(z, labels)), 1)
            return logp.gather(1, labels.view(-1, 1)).squeeze(1)
        z_adv = noise_search(objective, d.z[rows], cfg.steps, cfg.step_size, cfg.radius)
        d.z = torch.cat([d.z[:rows.start], z_adv, d.z[rows.stop:]])
        return d
    backend.draw = draw
