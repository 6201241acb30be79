"""Noise schedules in closed form.

Discrete VP (DDPM / Stable Diffusion): alpha_bar_t = prod_{s<=t} (1 - beta_s), a_t = sqrt(alpha_bar_t),
b_t = sqrt(1 - alpha_bar_t), sigma_t = b_t / a_t. The tables are built in float64 (as diffusers does,
then cast) so a_t and b_t match diffusers' `DDPMScheduler.alphas_cumprod` to float32 rounding.

x0 from a network output, in closed form (no per-sample `scheduler.step`, no RNG consumption):
  epsilon:       x0 = (x_t - b_t eps) / a_t
  v_prediction:  x0 = a_t x_t - b_t v
  sample:        x0 = output
EDM sigmas (Karras et al.) are provided for the SiD-EDM family.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREDICTIONS = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear")


def make_betas(kind: str, beta_start: float, beta_end: float, num_timesteps: int) -> torch.Tensor:
    """Betas in float64: 'linear' (DDPM) or 'scaled_linear' (Stable Diffusion: linear in sqrt(beta))."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    raise ValueError(f"unknown beta schedule {kind!r}; expected one of {BETA_SCHEDULES}")


@dataclass
class VPSchedule:
    """Discrete variance-preserving schedule with per-timestep tables a_t, b_t (float32 on `device`)."""

    alphas_cumprod: torch.Tensor  # float64 (T,)
    prediction: str = "epsilon"

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {self.prediction!r}; expected one of {PREDICTIONS}")
        ac = self.alphas_cumprod.double()
        self.a_table = ac.sqrt().float()
        self.b_table = (1.0 - ac).sqrt().float()

    @classmethod
    def from_betas(cls, kind="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000,
                   prediction="epsilon") -> "VPSchedule":
        betas = make_betas(kind, beta_start, beta_end, num_timesteps)
        return cls(torch.cumprod(1.0 - betas, dim=0), prediction)

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def to(self, device) -> "VPSchedule":
        self.a_table = self.a_table.to(device)
        self.b_table = self.b_table.to(device)
        return self

    # -- per-timestep coefficients, broadcast to x's rank -----------------------------------------
    def coefs(self, t: torch.Tensor, like: torch.Tensor):
        """(a_t, b_t) gathered for integer timesteps t (B,), shaped (B, 1, ..., 1) like `like`."""
        shape = (t.shape[0],) + (1,) * (like.dim() - 1)
        idx = t.long()
        return self.a_table[idx].view(shape).to(like.dtype), self.b_table[idx].view(shape).to(like.dtype)

    def a(self, t: int) -> float:
        return float(self.alphas_cumprod[t].sqrt())

    def b(self, t: int) -> float:
        return float((1.0 - self.alphas_cumprod[t]).sqrt())

    def sigma(self, t: int) -> float:
        return self.b(t) / self.a(t)

    # -- closed-form conversions --------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = self.coefs(t, x0)
        return a * x0 + b * noise

    def x0_from_output(self, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = self.coefs(t, x_t)
        if self.prediction == "epsilon":
            return (x_t - b * output) / a
        if self.prediction == "v_prediction":
            return a * x_t - b * output
        return output

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output at x_t = a x0 + b noise (for the fake-score loss)."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "v_prediction":
            a, b = self.coefs(t, x0)
            return a * noise - b * x0
        return x0


def edm_sigmas_from_u(u: torch.Tensor, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> torch.Tensor:
    """SiD-EDM's generator-loss sigma: u = 0 gives sigma_min, u = 1 gives sigma_max (spec §1c)."""
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + (1 - u) * (lo - hi)) ** rho


def edm_precond(sigma: torch.Tensor, sigma_data: float = 0.5):
    """EDM preconditioning (c_skip, c_out, c_in, c_noise) for sigma (any shape)."""
    s2, d2 = sigma**2, sigma_data**2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1 / (s2 + d2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Evenly spaced ('leading', as diffusers' DDIM default) timesteps, descending."""
    ratio = num_timesteps // steps
    return [i * ratio for i in range(steps)][::-1]


def sigma_to_vp(sigma: float) -> tuple[float, float]:
    """(a, b) of the VP point with noise-to-signal ratio sigma."""
    a = 1.0 / math.sqrt(1.0 + sigma * sigma)
    return a, sigma * a
