"""Drop-in replacement for SiD:training/sid_loss.py `SID_EDMLoss` (spec §6.3).

    # loss_kwargs.class_name = 'training.sid_loss.SID_EDMLoss'
    loss_kwargs.class_name = 'sfd_fast.compat.edm.SID_EDMLoss'

Same constructor, methods, random draws (in the same order, on the same device, so a fixed seed
gives the same sigmas and noise as the reference) and the same unreduced per-element tensors with
NaN rows removed (the caller still does `loss.sum() * scale / batch_gpu_total`).
What is cheaper: the zero augment labels are allocated on the device (the reference builds them on
the host and copies); y + n is formed once for both networks; sigma arithmetic is shared.
The class is a plain Python class: the reference's `@persistence.persistent_class` only matters for
pickling the loss object, which SiD's training loop does not do.
"""
from __future__ import annotations

import torch

from ..schedules import edm_sigmas_from_u
from ._checks import check_latents

__all__ = ["SID_EDMLoss"]


def _drop_nan_rows(mask_from, *tensors):
    """The tensors without the rows where any of `mask_from` has a NaN (reference semantics: the
    returned batch is shorter; a host sync decides whether to index at all)."""
    nan = torch.zeros(mask_from[0].shape[0], dtype=torch.bool, device=mask_from[0].device)
    for m in mask_from:
        nan |= torch.isnan(m).flatten(start_dim=1).any(dim=1)
    if not nan.any():
        return tensors
    keep = ~nan
    return tuple(x[keep] for x in tensors)


class SID_EDMLoss:  # noqa: N801  (the reference's class name)
    """SiD losses for EDM-preconditioned networks called as net(x, sigma[n,1,1,1], labels, augment_labels=...)."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5, beta_d=19.9, beta_min=0.1):  # noqa: N803
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
        self.beta_d = beta_d  # unused, kept for the reference's constructor
        self.beta_min = beta_min

    def generator_loss(self, true_score, fake_score, images, labels=None, augment_pipe=None, alpha=1.2, tmax=800):
        """Per-element generator loss [n',C,H,W] (n' <= n after dropping NaN rows):
        (y_r - y_f)((y_r - y) - alpha (y_r - y_f)) / omega, omega = mean_CHW |y - y_r| (no grad,
        >= 1e-5), at sigma from u ~ U(0, tmax/1000) on the Karras ramp (0.002 .. 80, rho 7).
        Differentiable w.r.t. `images` through both networks (neither output is detached)."""
        n = check_latents("images", images)
        u = torch.rand([n, 1, 1, 1], device=images.device) * tmax / 1000
        sigma = edm_sigmas_from_u(u)
        if augment_pipe is not None:
            y, augment_labels = augment_pipe(images)
        else:
            y, augment_labels = images, torch.zeros(n, 9, device=images.device)
        x = y + torch.randn_like(y) * sigma
        y_real = true_score(x, sigma, labels, augment_labels=augment_labels)
        y_fake = fake_score(x, sigma, labels, augment_labels=augment_labels)
        y, y_real, y_fake = _drop_nan_rows((y, y_real, y_fake), y, y_real, y_fake)
        with torch.no_grad():
            omega = (y - y_real).abs().to(torch.float32).mean(dim=[1, 2, 3], keepdim=True).clip(min=0.00001)
        return (y_real - y_fake) * ((y_real - y) - alpha * (y_real - y_fake)) / omega

    def __call__(self, fake_score, images, labels=None, augment_pipe=None):
        """Per-element fake-score loss [n',C,H,W]: lambda(sigma) (D_psi(y + sigma n) - y)^2 with
        ln sigma ~ N(P_mean, P_std^2) and lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
        n = check_latents("images", images)
        sigma = (torch.randn([n, 1, 1, 1], device=images.device) * self.P_std + self.P_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        y_fake = fake_score(y + torch.randn_like(y) * sigma, sigma, labels, augment_labels=augment_labels)
        y_fake, y, weight = _drop_nan_rows((y, y_fake), y_fake, y, weight)
        return weight * ((y_fake - y) ** 2)
