"""Reference SFD / SiD losses in plain torch.

These are the single source of truth for the math (ARCHITECTURE.md, property 1). Every fast path
(Triton kernel, compiled step, DeepSpeed) is tested against these functions. They are pure: no RNG
draws, no reductions over the batch, no host syncs.

Notation (reference/sfd_spec.md §0): x_g is the one-step generator sample, y_real = D_teacher(x_t)
and y_fake = D_fake(x_t) are x0-estimates at the same noisy point x_t = a_t x_g + b_t n.
"""
from __future__ import annotations

import torch

OMEGA_MIN = 1e-5


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def sid_omega(x_g: torch.Tensor, y_real: torch.Tensor) -> torch.Tensor:
    """Per-sample SiD weight omega = mean_{CHW} |x_g - y_real|, clamped at 1e-5, no gradient.

    Computed in fp32 whatever the input dtype (a mean of |.| over 16k bf16 values loses ~3 digits).
    """
    with torch.no_grad():
        diff = (_flat(x_g).float() - _flat(y_real).float()).abs()
        return diff.mean(dim=1).clamp_min(OMEGA_MIN)


def generator_loss(
    x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float
) -> torch.Tensor:
    """SiD generator loss per sample, shape (B,).

    L = sum_{CHW} (y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake)) / omega

    Gradients flow into all three inputs: x_g directly, and y_real / y_fake (which the caller keeps
    attached to x_g through the frozen teacher and the fake score). omega carries no gradient.
    Accumulation is fp32 regardless of the input dtype.
    """
    if not (x_g.shape == y_real.shape == y_fake.shape):
        raise ValueError(
            f"generator_loss: shapes differ: x_g {tuple(x_g.shape)}, y_real {tuple(y_real.shape)}, "
            f"y_fake {tuple(y_fake.shape)}"
        )
    omega = sid_omega(x_g, y_real)
    xg, yr, yf = _flat(x_g).float(), _flat(y_real).float(), _flat(y_fake).float()
    score_diff = yr - yf
    per_sample = (score_diff * ((yr - xg) - alpha * score_diff)).sum(dim=1)
    return per_sample / omega


def generator_loss_alpha1(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor) -> torch.Tensor:
    """The reference code's alpha = 1 special case: sum (y_real - y_fake)(y_fake - x_g) / omega.

    Algebraically identical to generator_loss(..., alpha=1); kept to test that identity.
    """
    omega = sid_omega(x_g, y_real)
    xg, yr, yf = _flat(x_g).float(), _flat(y_real).float(), _flat(y_fake).float()
    return ((yr - yf) * (yf - xg)).sum(dim=1) / omega


def fake_score_weight(prediction: str, a_t: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor | None:
    """Per-row weight (B,) that makes the fake-score loss the epsilon-MSE whatever the network predicts.

    With x_t = a x0 + b n (a^2 + b^2 = 1) and x0_hat the network's x0-estimate, the three MSEs differ
    only by a per-t factor (schedules.py's closed forms):
        eps - n       = (a / b) (x0 - x0_hat)   ->  eps-MSE = (a/b)^2 |x0 - x0_hat|^2
        v - v_target  = (1 / b) (x0 - x0_hat)   ->  v-MSE   = (1/b)^2 |x0 - x0_hat|^2 = eps-MSE / a^2
        x0_hat - x0                             ->  x0-MSE  =         |x0 - x0_hat|^2 = eps-MSE (b/a)^2
    so eps-MSE = a^2 v-MSE = (a/b)^2 x0-MSE. The fake score is trained with the epsilon weighting
    for every parameterisation: that is the reference SFD's loss (spec §1a/§1b; its v-path weights
    the v-MSE by SNR/(SNR+1) = a^2), and it makes an epsilon and a v model of one x0-predictor train
    identically (docs/sd.md, "The fake-score loss for v-prediction models").
    Unweighted v-MSE would weigh the high-noise end 1/a^2 times more (~170x at SD's t = 979).
    Returns None for epsilon (weight 1, no multiply).
    """
    if prediction == "epsilon":
        return None
    if prediction == "v_prediction":
        return a_t.float().square()
    if prediction == "sample":
        return (a_t.float() / b_t.float()).square()
    raise ValueError(f"fake_score_weight: unknown prediction type {prediction!r}")


def fake_score_loss(prediction: torch.Tensor, target: torch.Tensor,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Denoising score matching per sample, shape (B,): weight_i * sum_{CHW} (prediction - target)^2.

    `prediction` is the fake score's raw output at x_t = a_t sg(x_g) + b_t n (epsilon, or v for
    v-prediction networks) and `target` the matching target (n, or a_t n - b_t x_g). `weight` (B,)
    is `fake_score_weight(...)`: a_t^2 for v-prediction, so that every parameterisation trains the
    epsilon-MSE (see there). The caller evaluates the network on a stop-gradient generator sample;
    this function only does the math.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"fake_score_loss: prediction {tuple(prediction.shape)} vs target {tuple(target.shape)}"
        )
    per_row = (_flat(prediction).float() - _flat(target).float()).square().sum(dim=1)
    if weight is None:
        return per_row
    if weight.shape != per_row.shape:
        raise ValueError(f"fake_score_loss: weight {tuple(weight.shape)} must be ({per_row.shape[0]},)")
    return per_row * weight.float()


def masked_weighted_sum(per_sample: torch.Tensor, coef: torch.Tensor, denom: float) -> torch.Tensor:
    """sum_i coef_i * L_i / denom, with non-finite rows replaced by 0 *without a host sync*.

    The reference drops NaN rows by boolean indexing (a sync and a dynamic shape) and keeps the same
    denominator; torch.where does the same with static shapes. Note NaN * 0 = NaN, so a multiply by
    a 0/1 mask would not do. Returns (loss, finite_mask).
    """
    finite = torch.isfinite(per_sample)
    safe = torch.where(finite, per_sample, torch.zeros_like(per_sample))
    return (safe * coef).sum() / denom, finite
