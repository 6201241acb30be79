"""EDM networks as denoisers of the SFD engine: the sigma grid, the denoiser and the one-step generator.

The engine's loop is written in VP form: x_t = a_t x_g + b_t n at integer t, networks return an
x0-estimate (reference/sfd_spec.md §0). An EDM preconditioner takes the sigma form x = x0 + sigma n.
The two are the same point: sigma_t = b_t / a_t and x = x_t / a_t (a_t = 1/sqrt(1 + sigma_t^2)), and
D(x, sigma) is already the x0-estimate (prediction "sample": x0 in closed form, no conversion).

The grid: t in [0, T) indexes SiD's generator-loss sigmas, sigma_t = (smax^(1/rho) + (1 - t/T)
(smin^(1/rho) - smax^(1/rho)))^rho with smin 0.002, smax 80, rho 7, T 1000 (sfd_fast.schedules.
edm_sigmas_from_u at u = t/T). SiD draws u ~ U(0, tmax/1000) continuously; the engine draws
t ~ U{t_min, ..., t_max - 1}, so the paper's t_min / t_max = 0 / 800 is SiD's tmax = 800 on a
1000-point grid (sigma 0.002 ... 24.3).

The generator is G(z) = D(sigma_init z; sigma_init, c), exactly SiD's (sigma_init 2.5 is not on the
grid; it does not need to be).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..denoisers import ClassCondDenoiser
from ..schedules import VPSchedule, edm_sigmas_from_u


class SigmaGridSchedule(VPSchedule):
    """A VP schedule whose alpha_bar_t = 1 / (1 + sigma_t^2) for the Karras sigma grid above."""

    def __init__(self, num_steps: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 sigmas: torch.Tensor | None = None):
        """The Karras grid; or, with `sigmas`, exactly those sigmas at t = 0, 1, ... (tests replay
        another code's continuous sigma draws through the engine this way)."""
        if sigmas is None:
            u = torch.arange(num_steps, dtype=torch.float64) / num_steps
            sigmas = edm_sigmas_from_u(u, sigma_min, sigma_max, rho)
        self.sigma64 = sigmas.double().flatten()
        super().__init__(1.0 / (1.0 + self.sigma64 ** 2), "sample")
        self.sigma_table = self.sigma64.float()

    def to(self, device) -> "SigmaGridSchedule":
        super().to(device)
        self.sigma_table = self.sigma_table.to(device)
        return self

    def sigma_of(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_table[t.long()]


class EDMDenoiser(ClassCondDenoiser):
    """An EDM preconditioner (net(x, sigma, one_hot_labels)) behind the engine's (x_t, t, labels) call.

    Labels are class indices; the null class (index num_classes) is the all-zero label row, which is
    what EDM feeds for "no class". `update_dropout`: dropout on exactly when this network's own
    weights are being trained (grad mode on and its weights require grad), as SiD's train()/eval()
    toggles do (the fake score drops out in its update, the generator in its update, the teacher and
    the FrozenView of the fake score never)."""

    def __init__(self, net: nn.Module, schedule: SigmaGridSchedule, num_classes: int):
        super().__init__(net, schedule, num_classes)
        self.update_dropout = False

    def labels(self, cond: torch.Tensor) -> torch.Tensor:
        return F.one_hot(cond.long(), self.num_classes + 1)[:, : self.num_classes].float()

    def _set_dropout(self) -> None:
        active = self.update_dropout and torch.is_grad_enabled() and next(self.net.parameters()).requires_grad
        if self.net.training != active:
            self.net.train(active)

    def at_sigma(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """D(x; sigma, c) in the sigma form, fp32."""
        self._set_dropout()
        return self.net(x, sigma, self.labels(cond))

    def forward_raw(self, x_t, t, cond):
        a, _ = self.schedule.coefs(t, x_t)
        sigma = self.schedule.sigma_of(t).to(x_t.dtype)
        return self.at_sigma(x_t / a, sigma, cond)


class SigmaOneStepGenerator(nn.Module):
    """x_g = D_theta(sigma_init z; sigma_init, c): SiD's EDM generator (spec §1c)."""

    def __init__(self, denoiser: EDMDenoiser, sigma_init: float):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_init = float(sigma_init)

    @property
    def net(self) -> nn.Module:
        return self.denoiser.net

    def forward(self, z: torch.Tensor, cond) -> torch.Tensor:
        sigma = torch.full((z.shape[0],), self.sigma_init, device=z.device)
        return self.denoiser.at_sigma(self.sigma_init * z, sigma, cond)
