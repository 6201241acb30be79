"""The SFD step: a fake-score update, then a generator update (reference/sfd_spec.md §1a, §1b).

Remain and forget rows run in ONE batch per network, with per-row conditions (conditions.py) and per-row
loss coefficients. Normalisation follows the reference: each branch's loss is a sum over its rows
divided by the per-step branch batch (`denom`), times the branch coefficient, so

    loss = sum_i coef_i * L_i / denom

equals coef_r * L_remain + coef_f * L_forget of the reference's separate passes.

Nothing here syncs with the host: non-finite rows are masked with torch.where, and the per-branch
statistics stay on the device until the trainer's log tick.

A non-finite row of the generator phase contributes exactly zero gradient (`zero_rows_of_grad`), so
the other rows update as if it had been dropped with the reference's normalisation (the same
`denom`). The loss mask alone does not do it: the masked row's zero gradient meets its NaN omega
and NaN teacher / fake-score activations on the way back (0 / NaN = NaN) and would reach the
generator's output, poisoning every weight gradient and so skipping the whole update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .denoisers import Denoiser
from .generator import OneStepGenerator
from .losses import fake_score_loss, fake_score_weight, generator_loss, masked_weighted_sum
from .schedules import VPSchedule
from .conditions import PhaseConditions, row_targets

# column layout of the per-phase statistics (n_targets + 1, NUM_STATS) tensor, kept on the device
# and summed over a tick; row 0 = remain rows, row 1 + k = forget rows of target k
STAT_SUM, STAT_N, STAT_NONFINITE = range(3)
NUM_STATS = 3


@dataclass
class PhaseContext:
    """Everything both phases need besides their draws, built once per trainer (and per probe):
    the networks as the backend calls them, the schedule and the loss settings."""
    generator: object                 # OneStepGenerator, or its DeepSpeed engine
    fake_score: object                # the fake score in its own update (`.output` is trained)
    fake_score_view: object           # the fake score inside the generator loss (FrozenFakeScore.view)
    teacher: Denoiser                 # frozen
    schedule: VPSchedule
    alpha: float                      # SiD alpha
    guidance_train_fake: float        # kappa1: fake-score training
    guidance_fake: float              # kappa2 = kappa3: fake score inside the generator loss
    guidance_real: float              # kappa4: teacher
    denom: float                      # rows of one branch per optimizer step (the loss normaliser)
    loss_fn: Callable = generator_loss   # losses.generator_loss or a fused kernel with its signature
    n_targets: int = 1                # forget targets (per-target statistics)

    @classmethod
    def for_trainer(cls, trainer, generator, fake_score, fake_score_view, denom: float) -> "PhaseContext":
        s = trainer.cfg.sfd
        return cls(generator, fake_score, fake_score_view, trainer.teacher, trainer.schedule, s.alpha,
                   s.cfg_train_fake, s.cfg_eval_fake, s.cfg_eval_real, denom, trainer.loss_fn,
                   len(trainer.target_names))


@dataclass
class PhaseDraws:
    """Every random input of one phase's micro-batch, drawn from the trainer's generator."""
    z: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    cond: PhaseConditions
    coef: torch.Tensor


def draw_phase(task, rng: torch.Generator, n_remain: int, n_forget: int, sample_shape: tuple,
               t_min: int, t_max: int, remain_coef: float, forget_coef: float, device,
               phase: str) -> PhaseDraws:
    """Draw conditions, z, noise and t in a fixed order (so a step can be replayed exactly)."""
    cond = task.draw(n_remain, n_forget, rng, device, phase)
    n = n_remain + n_forget
    z = torch.randn((n, *sample_shape), generator=rng, device=device)
    noise = torch.randn((n, *sample_shape), generator=rng, device=device)
    t = torch.randint(t_min, t_max, (n,), generator=rng, device=device)
    # device-side constants: torch.full + masked_fill take the coefficients as kernel arguments
    # (torch.tensor(x, device=cuda) would be a pageable host-to-device copy, i.e. a sync, per draw)
    coef = torch.full((n,), float(remain_coef), device=device).masked_fill_(cond.is_forget, float(forget_coef))
    return PhaseDraws(z, noise, t, cond, coef)


def phase_stats(per_row: torch.Tensor, cond: PhaseConditions, n_targets: int = 1) -> torch.Tensor:
    """(n_targets + 1, NUM_STATS) on the device: per group (remain, then each forget target) the sum
    of finite row losses, the count of finite rows and the count of non-finite rows. One index_add_
    (a scatter) from the per-row target index: no host sync, whatever the number of targets."""
    finite = torch.isfinite(per_row)
    safe = torch.where(finite, per_row, torch.zeros_like(per_row)).detach().float()
    group = row_targets(cond.is_forget, cond.target) + 1          # remain -1 -> row 0
    columns = torch.stack([safe, finite.float(), (~finite).float()], dim=1)
    return torch.zeros(n_targets + 1, NUM_STATS, device=per_row.device).index_add_(0, group, columns)


def tick_losses(stats: list, target_names: list[str]) -> dict:
    """stats.jsonl loss fields from a tick's summed (2, n_targets + 1, NUM_STATS) statistics (as a
    nested list): per network the mean remain and forget loss, and with several targets each
    target's mean forget loss ("fake_score_loss/forget/<target>"); nan where no finite row fell."""
    def mean(rows):
        total, n = sum(r[STAT_SUM] for r in rows), sum(r[STAT_N] for r in rows)
        return total / n if n else float("nan")
    out = {}
    for net, groups in zip(("fake_score_loss", "generator_loss"), stats):
        out[f"{net}/remain"] = mean(groups[:1])
        out[f"{net}/forget"] = mean(groups[1:])
        if len(target_names) > 1:
            for name, row in zip(target_names, groups[1:]):
                out[f"{net}/forget/{name}"] = mean([row])
    out["nonfinite_rows"] = sum(r[STAT_NONFINITE] for groups in stats for r in groups)
    return out


def zero_rows_of_grad(x: torch.Tensor, keep: torch.Tensor) -> None:
    """In the backward, replace the gradient arriving at `x` (rows first) by exact zeros on the rows
    where `keep` is False, before it goes further back (into the generator).

    `keep` is only known after the forward (the loss decides it), hence a gradient hook rather than
    a forward-time select; torch.where (not a multiply) because 0 * NaN = NaN. Rows are independent
    in every backbone here (per-sample norms, no BatchNorm), so a dropped row's NaNs cannot reach the
    other rows downstream of `x`. What this cannot clean: a row whose own generator forward is
    non-finite (NaN z, overflow inside G) puts 0 * NaN into G's weight gradients; the optimizer then
    skips the whole update (engine/optim.py), as before."""
    if not x.requires_grad:
        return
    mask = keep.reshape(-1, *([1] * (x.dim() - 1)))
    x.register_hook(lambda grad: torch.where(mask, grad, torch.zeros_like(grad)))


def fake_score_phase(ctx: PhaseContext, draws: PhaseDraws):
    """Denoising score matching of the fake score on stop-gradient generator samples, epsilon-weighted
    for every prediction type (losses.fake_score_weight).

    Returns (loss to backpropagate, per-phase stats)."""
    c = draws.cond
    schedule = ctx.schedule
    with torch.no_grad():
        x_g = ctx.generator(draws.z, c.generator_cond)
    x_t = schedule.add_noise(x_g, draws.noise, draws.t)
    prediction = ctx.fake_score.output(x_t, draws.t, c.fake_cond, c.fake_uncond, ctx.guidance_train_fake)
    target = schedule.target(x_g, draws.noise, draws.t)
    # epsilon-MSE for every parameterisation (a_t^2 on v rows: losses.fake_score_weight)
    idx = draws.t.long()
    weight = fake_score_weight(schedule.prediction, schedule.a_table[idx], schedule.b_table[idx])
    per_row = fake_score_loss(prediction, target, weight)
    loss, _ = masked_weighted_sum(per_row, draws.coef, ctx.denom)
    return loss, phase_stats(per_row, c, ctx.n_targets)


def generator_phase(ctx: PhaseContext, draws: PhaseDraws):
    """SiD generator loss through the fake score and the frozen teacher (neither detached).

    `ctx.fake_score_view` evaluates the fake score with its weights frozen (denoisers.FrozenFakeScore),
    so the backward through it reaches x_t (and so G) but accumulates no fake-score gradients.
    `ctx.loss_fn` is the reference `losses.generator_loss` or a fused kernel with its signature."""
    x_g = generator_sample(ctx, draws)
    loss, stats, finite = generator_loss_of_sample(ctx, draws, x_g)
    zero_rows_of_grad(x_g, finite)     # a non-finite row: exactly zero gradient into G
    return loss, stats


def generator_sample(ctx: PhaseContext, draws: PhaseDraws):
    """x_g = G(z): the generator phase's first part (its own graph under engine.compile_phase)."""
    return ctx.generator(draws.z, draws.cond.generator_cond)


def generator_loss_of_sample(ctx: PhaseContext, draws: PhaseDraws, x_g):
    """The generator phase after the sample: corruption, both score evaluations with CFG, the loss,
    its non-finite-row mask and statistics -> (loss, stats, finite rows). The mask's gradient hook
    stays outside (generator_phase): it is known only after this forward, and Dynamo cannot place
    a hook registered late on an intermediate of its own graph (torch 2.11's Inductor rejects the
    graph it builds: "used before it has been defined")."""
    c, schedule = draws.cond, ctx.schedule
    x_t = schedule.add_noise(x_g, draws.noise, draws.t)
    y_fake = ctx.fake_score_view.x0(x_t, draws.t, c.fake_cond, c.fake_uncond, ctx.guidance_fake)
    y_real = ctx.teacher.x0(x_t, draws.t, c.teacher_cond, c.teacher_uncond, ctx.guidance_real)
    per_row = ctx.loss_fn(x_g, y_real, y_fake, ctx.alpha)
    loss, finite = masked_weighted_sum(per_row, draws.coef, ctx.denom)
    return loss, phase_stats(per_row, c, ctx.n_targets), finite
