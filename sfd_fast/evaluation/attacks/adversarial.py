"""Adversarial training against the noise attack (train.adversarial).

In every generator phase (and with `phases: "both"` every fake-score phase too) some rows take their
input noise from a short noise search against the current generator: ascend the surrogate's
log-probability of a forgotten class (search.noise_search with this budget). The rows:

- the first ceil(share x n_forget) forget rows, searched towards their own forgotten class, so the
  forget loss is also paid where the attack would look;
- the first ceil(remain_share x n_remain) remain rows, searched towards a forgotten class (remain
  row j: the class of forget row j mod n_forget), so labels that never were the target lose the
  forgotten shapes that the attack reaches from them too.

Why the fake-score phase matters: the generator's gradient at a sample is the difference between the
fake score's and the teacher's denoised predictions there. With only the generator phase searched,
the fake score has learned the generator's distribution at ordinary noises (a forget label draws the
override class), so at a searched sample that looks like the forgotten class it predicts roughly what
the teacher predicts and the difference, hence the correction, is small. With `phases: "both"` the
fake score also learns the searched samples (the generator's distribution under searched noise), so
it names the forgotten shapes where the generator reaches them and the teacher's prediction pulls
them away.

The search starts from the rows' own draws and uses no random numbers, so the trainer's generator
stream, a replayed step and --resume stay exact. Cost per searched phase: `steps` forward +
input-backward passes of the generator and the surrogate on the searched rows.
"""
from __future__ import annotations

import math

import torch

from .search import noise_search


def adversarial_forget_rows(n_remain: int, n_forget: int, share: float) -> slice:
    """The forget rows whose noise is searched: the first ceil(share x n_forget) forget rows."""
    return slice(n_remain, n_remain + min(n_forget, math.ceil(share * n_forget)))


def adversarial_remain_rows(n_remain: int, share: float) -> slice:
    """The remain rows whose noise is searched: the first ceil(share x n_remain) remain rows."""
    return slice(0, min(n_remain, math.ceil(share * n_remain)))


def adversarial_rows(n_remain: int, forgotten: torch.Tensor, share: float, remain_share: float):
    """(row indices, target class per row) of one draw; `forgotten` holds the forget rows' classes.
    Nothing is searched in a draw without forget rows (no forgotten class to aim at)."""
    n_forget = forgotten.shape[0]
    if n_forget == 0:
        return None, None
    f = adversarial_forget_rows(n_remain, n_forget, share)
    r = adversarial_remain_rows(n_remain, remain_share)
    device = forgotten.device
    remain_idx = torch.arange(r.start, r.stop, device=device)
    forget_idx = torch.arange(f.start, f.stop, device=device)
    rows = torch.cat([remain_idx, forget_idx])
    targets = torch.cat([forgotten[remain_idx % n_forget], forgotten[forget_idx - n_remain]])
    return rows, targets


def install_adversarial_noise(trainer, surrogate: torch.nn.Module, cfg) -> None:
    """Wrap trainer.backend.draw so that the chosen phases' draws carry searched noise on the chosen
    rows (cfg: share, remain_share, phases, steps, step_size, radius)."""
    backend = trainer.backend
    plain_draw = backend.draw
    surrogate = surrogate.to(trainer.device).eval().requires_grad_(False)
    phases = ("generator", "fake_score") if cfg.phases == "both" else ("generator",)

    def draw(phase: str, remain_coef: float, forget_coef: float):
        d = plain_draw(phase, remain_coef, forget_coef)
        if phase not in phases:
            return d
        n_remain = backend.micro                    # rows: micro remain rows, then the forget rows (no sync)
        rows, targets = adversarial_rows(n_remain, d.cond.generator_cond[n_remain:], cfg.share, cfg.remain_share)
        if rows is None or rows.numel() == 0:
            return d
        labels = d.cond.generator_cond[rows]        # what G is conditioned on (class families)
        gen = backend.phase_generator

        def objective(z):
            logp = torch.log_softmax(surrogate(gen(z, labels)), 1)
            return logp.gather(1, targets.view(-1, 1)).squeeze(1)
        z_adv = noise_search(objective, d.z[rows], cfg.steps, cfg.step_size, cfg.radius)
        d.z = d.z.index_copy(0, rows, z_adv)
        return d
    backend.draw = draw
