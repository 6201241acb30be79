"""SFD proves itself on an analytic Gaussian: the forgotten class lands on the override's Gaussian.

Setup (tests/gaussian_sfd.py): exact Gaussian teacher; fake score and generator in families that hold
the exact optimum (a per-class Gaussian denoiser, a per-class affine generator), both started from
the teacher as in SFD; trained by the real SFDTrainer (plain backend).

Why the previous version of this test hung on one CPU's rounding: its generator and fake score were
128-wide MLPs trained 1500 steps at lr 1e-3 with the reference's Adam(betas=(0, 0.999)). Tracking
that run every 250 steps (seed 0, this machine) showed no convergence at all: the forgotten class's
std swung between (0.47, 0.36) and (0.95, 0.74), the kept class 2 stayed at std (0.40, 0.47) instead
of (0.4, 0.4), and at step 3250 the run diverged (means ~1e8). Step 1500 was one sample of that
oscillation, so a different rounding (Intel vs AMD) picked a different point: (0.456, 0.404) there.
With networks that hold the exact optimum (no capacity bias), a cosine lr decay and the generator
EMA, the quantities below do converge; the test checks that they stopped
moving before it compares them with the target.

Tolerances. Each run's moments are estimated from n = 20000 fixed samples z per seed:
    SE(mean) = s / sqrt(n)              <= 0.5 / 141   = 0.0035
    SE(std)  = s / sqrt(2 (n - 1))      <= 0.5 / 200   = 0.0025   (Gaussian samples)
    SE(corr) = (1 - r^2) / sqrt(n)      <= 1 / 141     = 0.0071   (r ~ 0 at the target)
On top of that the trained parameters are not exactly at the fixed point: Adam without momentum
makes steps of ~lr whatever the gradient noise, so the final parameters sit at a seed-dependent
distance from the optimum. That allowance A is measured (this machine, tests/gaussian_sfd.py's
train_gaussian_sfd with this file's settings): the largest |error| over 9 runs (float32 seeds 0-3 at
1 thread, seed 0 at 2 threads, float64 parameters for seeds 0-1, v-prediction for seeds 0 and 3) is
MEASURED_MAX below; A = 2 x that (the maximum of ~130 roughly normal errors sits near 2.5-3 of
their standard deviations, so A is ~5-6 of them), and each tolerance is 5 SE + A. Rounding does not move
the result: 2 threads vs 1 and float64 vs float32 parameters changed the final moments by <= 1e-3
(the fixed point attracts; a rounding difference is damped, not amplified as in the old MLP run).
A wrong fixed point (override ignored, wrong sign, fake score not trained on forget rows) misses by
>= 0.2 in a std or >= 1.5 in a mean, several times these tolerances.
"""
import functools
import math

import pytest
import torch

from tests.gaussian_sfd import (FORGET, MEANS, OVERRIDE, STDS, GaussianScoreNet, target_moments,
                                train_gaussian_sfd)
from sfd_fast.schedules import VPSchedule

N_EVAL = 20000
STEPS, DECAY, EVAL_EVERY = 1500, 1000, 100
SE = {"mean": 0.5 / math.sqrt(N_EVAL), "std": 0.5 / math.sqrt(2 * (N_EVAL - 1)), "corr": 1 / math.sqrt(N_EVAL)}
MEASURED_MAX = {"mean": 0.026, "std": 0.017, "corr": 0.090}      # see the module docstring
TOL = {k: 5 * SE[k] + 2 * MEASURED_MAX[k] for k in SE}            # mean 0.070, std 0.047, corr 0.215
# Converged: the last 3 evaluations (steps 1300-1500, lr <= 10% of its peak) agree within the
# tolerance (measured spread at most: mean 0.037, std 0.028, corr 0.087). Common z across
# evaluations: only parameter changes move them, not resampling.
LAST_K = 3


@functools.lru_cache(maxsize=None)
def _history(seed: int, prediction: str) -> torch.Tensor:
    """Generator-EMA moments every EVAL_EVERY steps of one SFD run (cached: two tests share a run)."""
    return train_gaussian_sfd(seed, STEPS, prediction, decay_steps=DECAY, eval_every=EVAL_EVERY, n_eval=N_EVAL)


def _columns(dim):
    return {"mean": slice(0, dim), "std": slice(dim, 2 * dim), "corr": slice(2 * dim, 2 * dim + 1)}


def test_teacher_is_the_exact_gaussian_denoiser():
    """The fixture's batched-solve formula against the per-dimension closed form (diagonal Sigma),
    for epsilon and v outputs decoded by the schedule."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (64,), generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    x_t = torch.randn(64, 2, generator=g) * 2
    for prediction in ("epsilon", "v_prediction"):
        sched = VPSchedule.from_betas("linear", 1e-4, 0.02, 1000, prediction)
        out = GaussianScoreNet(sched, MEANS, STDS, trainable=False, dtype=torch.float64)(x_t.double(), t, labels)
        a, b = sched.a_table[t][:, None].double(), sched.b_table[t][:, None].double()
        mu, var = MEANS[labels].double(), STDS[labels].double() ** 2
        expected = mu + a * var / (a * a * var + b * b) * (x_t.double() - a * mu)
        # float64 arithmetic, but decoding v uses a^2 + b^2 = 1, which the float32 tables satisfy only
        # to ~1e-7 relative: 1e-6 (|x0| <= ~6 here)
        torch.testing.assert_close(sched.x0_from_output(x_t.double(), out, t), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("seed,prediction", [(0, "epsilon"), (1, "epsilon"), (2, "epsilon"), (3, "v_prediction")])
def test_sfd_moves_forgotten_class_onto_override_gaussian(seed, prediction):
    history = _history(seed, prediction)
    cols = _columns(MEANS.shape[1])
    last = history[-LAST_K:]
    spread = last.max(0).values - last.min(0).values
    target = target_moments()
    error = (history[-1] - target).abs()
    names = {0: "forgotten class 0 (target: override class 1)", 1: "kept class 1", 2: "kept class 2"}
    for kind, sl in cols.items():
        assert (spread[:, sl] < TOL[kind]).all(), (
            f"seed {seed}: {kind} still moving over the last {LAST_K} evaluations: {spread[:, sl].tolist()}")
        for row, name in names.items():
            assert (error[row, sl] < TOL[kind]).all(), (
                f"seed {seed} {prediction}: {name} {kind} {history[-1][row, sl].tolist()} vs "
                f"{target[row, sl].tolist()} (tolerance {TOL[kind]:.3f})")
    # the forgotten class really moved: from the teacher's class-0 Gaussian to the override's
    assert (history[-1][FORGET, cols["mean"]] - MEANS[FORGET].double()).abs().max() > 1.0
    assert torch.equal(target[FORGET], target[OVERRIDE])


@pytest.mark.slow
def test_v_prediction_trains_the_same_sfd_as_epsilon():
    """With the a_t^2 weight (losses.fake_score_weight) an epsilon and a v model of the same Gaussian
    train the same objective: seed 3's two runs differ only by rounding. Measured over the last 3
    evaluations: v vs epsilon 1.0e-3, float64 vs float32 parameters (a pure rounding change) 0.9e-3,
    and the unweighted v-loss vs epsilon 0.032. 0.01 is 10x the rounding difference and 3x below what
    the unweighted objective gives, so this check fails without the weight."""
    diff = (_history(3, "v_prediction") - _history(3, "epsilon"))[-LAST_K:].abs().max().item()
    assert diff < 0.01, diff
