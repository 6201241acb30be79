"""SFD on a class-conditional 2-D Gaussian teacher, with networks that hold the optimum exactly.

Class k: x0 ~ N(mu_k, Sigma_k). Under VP noise x_t = a x0 + b n the exact x0-estimate is
    E[x0 | x_t, k] = mu_k + a Sigma_k (a^2 Sigma_k + b^2 I)^-1 (x_t - a mu_k).
- teacher: that formula with the true (mu_k, Sigma_k), frozen;
- fake score: the same formula with learnable (mu_k, Cholesky factor of Sigma_k), started from the
  teacher's values (SFD starts the fake score as a copy of the teacher). Whatever Gaussian the
  generator produces, this family holds its exact score at every t;
- generator: an affine map per class, x_g = m_k + M_k z (M_k a full 2x2 matrix), written as an
  epsilon/v network evaluated at t_init, started from the teacher's own one-step x0-map at t_init
  (m = mu, M = diag(a b s^2 / (a^2 s^2 + b^2))). Every Gaussian, including the target, is reachable.
With both trained networks exact in their family, SiD's fixed point (generator = teacher's
distribution on the remain classes, = the override class's distribution on the forgotten class) is
reachable exactly, so what is asserted converges to the target up to optimisation noise, which is
measured (see test_gaussian_sfd.py).

This module holds the fixtures and the training driver; test_gaussian_sfd.py holds the assertions.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sfd_fast.conditions import ClassForgetTask
from sfd_fast.config import Config
from sfd_fast.denoisers import ClassCondDenoiser
from sfd_fast.generator import OneStepGenerator
from sfd_fast.schedules import VPSchedule
from sfd_fast.trainer import RunParts, SFDTrainer

MEANS = torch.tensor([[2.0, 0.0], [-1.0, 1.5], [-1.0, -1.5]])
STDS = torch.tensor([[0.3, 0.5], [0.5, 0.3], [0.4, 0.4]])
DIM = MEANS.shape[1]
FORGET, OVERRIDE, T_INIT = 0, 1, 440


def _output(kind: str, x_t, x0, a, b):
    """The network output that decodes to x0 at x_t: epsilon (x_t - a x0)/b or v = a eps - b x0."""
    eps = (x_t - a * x0) / b
    return eps if kind == "epsilon" else a * eps - b * x0


class GaussianScoreNet(nn.Module):
    """Exact denoiser of a per-class Gaussian N(mean_k, L_k L_k^T) (L_k lower triangular); eps or v out."""

    def __init__(self, schedule: VPSchedule, means, stds, trainable: bool, dtype=torch.float32):
        super().__init__()
        self.kind = schedule.prediction
        self.register_buffer("a", schedule.a_table.to(dtype).clone())
        self.register_buffer("b", schedule.b_table.to(dtype).clone())
        self.mean = nn.Parameter(means.to(dtype).clone(), requires_grad=trainable)
        self.chol = nn.Parameter(torch.diag_embed(stds.to(dtype)), requires_grad=trainable)

    def forward(self, x_t, t, labels):
        x_t = x_t.to(self.mean.dtype)
        a, b = self.a[t][:, None], self.b[t][:, None]
        mu = self.mean[labels]
        low = torch.tril(self.chol[labels])
        cov = low @ low.transpose(1, 2)
        eye = torch.eye(x_t.shape[1], dtype=x_t.dtype)
        lhs = (a * a)[:, :, None] * cov + (b * b)[:, :, None] * eye          # a^2 Sigma + b^2 I
        post = torch.linalg.solve(lhs, (x_t - a * mu)[:, :, None])           # (B, D, 1)
        x0 = mu + a * (cov @ post)[:, :, 0]
        return _output(self.kind, x_t, x0, a, b)


class AffineGeneratorNet(nn.Module):
    """x0 = m_k + M_k x / b_t as an epsilon/v network; at t_init (x = b z) this is x_g = m_k + M_k z."""

    def __init__(self, schedule: VPSchedule, means, stds, t_init: int, dtype=torch.float32):
        super().__init__()
        self.kind = schedule.prediction
        self.register_buffer("a", schedule.a_table.to(dtype).clone())
        self.register_buffer("b", schedule.b_table.to(dtype).clone())
        a, b = schedule.a(t_init), schedule.b(t_init)
        var = stds.to(dtype) ** 2
        self.mean = nn.Parameter(means.to(dtype).clone())
        self.scale = nn.Parameter(torch.diag_embed(a * b * var / (a * a * var + b * b)))  # teacher's map

    def forward(self, x, t, labels):
        x = x.to(self.mean.dtype)
        a, b = self.a[t][:, None], self.b[t][:, None]
        x0 = self.mean[labels] + torch.einsum("nij,nj->ni", self.scale[labels], x) / b
        return _output(self.kind, x, x0, a, b)


def moments(generator, z: torch.Tensor) -> torch.Tensor:
    """(3 classes, 2 DIM + 1): means, stds, largest |correlation| of the generator's samples G(z, k)."""
    rows = []
    with torch.no_grad():
        for k in range(3):
            x = generator(z, torch.full((z.shape[0],), k)).double()
            corr = torch.corrcoef(x.T) - torch.eye(x.shape[1], dtype=x.dtype)
            rows.append(torch.cat([x.mean(0), x.std(0), corr.abs().max().view(1)]))
    return torch.stack(rows)


def target_moments() -> torch.Tensor:
    """What SFD must reach: the override's Gaussian for the forgotten class, their own for the others."""
    rows = [torch.cat([MEANS[k], STDS[k], torch.zeros(1)]) for k in (OVERRIDE, 1, 2)]
    return torch.stack(rows).double()


def train_gaussian_sfd(seed: int, steps: int, prediction: str = "epsilon", dtype=torch.float32,
                       batch: int = 256, lr: float = 1e-2, decay_steps: int = 0, ema: float = 0.99,
                       eval_every: int = 100, n_eval: int = 20000):
    """Run SFD through the real trainer; returns the generator-EMA moments every `eval_every` steps.

    Optimiser: the reference's Adam(betas=(0, 0.999)) at `lr` for both networks, cosine-decayed to
    1% over the last `decay_steps`. Evaluation uses one fixed z per seed (common random numbers):
    differences between evaluations are then parameter changes only, not resampling noise.
    """
    sched = lambda: VPSchedule.from_betas("linear", 1e-4, 0.02, 1000, prediction)
    s0 = sched()
    cfg = Config()
    cfg.run.seed = seed
    cfg.sfd.num_classes, cfg.sfd.forget_class, cfg.sfd.override_class = 3, FORGET, OVERRIDE
    cfg.sfd.alpha, cfg.sfd.t_init, cfg.sfd.t_min, cfg.sfd.t_max = 1.2, T_INIT, 38, 712
    cfg.optim.fake_score.lr = cfg.optim.generator.lr = lr
    cfg.train.batch_size, cfg.train.total_steps, cfg.train.ema.decay = batch, steps, ema
    cfg.train.log_every = cfg.train.checkpoint_every = cfg.train.sample_every = 10**9
    cfg.train.progress = False
    mk = lambda net: ClassCondDenoiser(net, sched(), 3)
    parts = RunParts(ClassForgetTask(3, FORGET, "fixed", OVERRIDE),
                     mk(GaussianScoreNet(s0, MEANS, STDS, trainable=False, dtype=dtype)),
                     mk(GaussianScoreNet(s0, MEANS, STDS, trainable=True, dtype=dtype)),
                     OneStepGenerator(mk(AffineGeneratorNet(s0, MEANS, STDS, T_INIT, dtype)), T_INIT), (DIM,))
    trainer = SFDTrainer(cfg, parts, None, torch.device("cpu"))     # run_dir None: nothing written
    z = torch.randn(n_eval, DIM, generator=torch.Generator().manual_seed(10_000 + seed))
    history = []
    for step in range(steps):
        into_decay = step - (steps - decay_steps)
        if decay_steps and into_decay >= 0:
            factor = max(0.5 * (1 + math.cos(math.pi * into_decay / decay_steps)), 0.01)
            for opt in trainer.backend.optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = lr * factor
        trainer.train_step()
        if (step + 1) % eval_every == 0:
            history.append(moments(trainer.generator_ema, z))
    return torch.stack(history)
