"""Closed-form VP arithmetic for a user's diffusers scheduler (DDPMScheduler / DDIMScheduler).

The reference calls `noise_scheduler.add_noise` (which copies `alphas_cumprod` to the device on
every call) and `noise_scheduler.step(...).pred_original_sample` (per sample in `sid_sd_denoise`),
each step doing host-synchronising comparisons and drawing a discarded variance noise. Here the
tables a_t = sqrt(alphas_cumprod[t]) and b_t = sqrt(1 - alphas_cumprod[t]) are built once per
(scheduler, device) in float32 with the same float32 operations diffusers uses, so add_noise and
x0 match the scheduler's to rounding (sfd_fast.schedules.VPSchedule builds b_t in float64, which
can differ from diffusers by an ulp; the compat functions must match the scheduler they are given).

x0 in closed form, as `step()` computes `pred_original_sample`:
    epsilon: (x_t - b_t out) / a_t;  v_prediction: a_t x_t - b_t out;  sample: out
then `thresholding` (dynamic, per group) or `clip_sample` (clamp), as the scheduler config says.
"""
from __future__ import annotations

import weakref

import torch

PREDICTIONS = ("epsilon", "v_prediction", "sample")

# Tables per scheduler object (weak keys: a scheduler that goes away drops its tables) and device.
_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

# Draw (and discard) the variance noise the reference's scheduler.step() draws, so that a training
# loop using the compat functions consumes the global RNG exactly as the reference does. Off by
# default: the draws cost time and memory and change nothing but the RNG position.
EMULATE_SCHEDULER_RNG = False


class SchedulerTables:
    """a_t, b_t (float32, on one device) and the x0 options of a diffusers VP scheduler."""

    def __init__(self, scheduler, device):
        cfg = scheduler.config
        prediction = cfg.get("prediction_type", "epsilon")
        if prediction not in PREDICTIONS:
            raise ValueError(f"noise_scheduler has prediction_type {prediction!r}; expected one of {PREDICTIONS}")
        ac = getattr(scheduler, "alphas_cumprod", None)
        if not torch.is_tensor(ac):
            raise ValueError(f"noise_scheduler ({type(scheduler).__name__}) has no alphas_cumprod table; pass the "
                             f"DDPMScheduler/DDIMScheduler that load_sd15 returns")
        ac = ac.detach().to(device=device, dtype=torch.float32)
        self.source = scheduler.alphas_cumprod  # the table these were built from (rebuild if replaced)
        self.a = ac**0.5
        self.b = (1 - ac) ** 0.5
        self.prediction = prediction
        self.thresholding = bool(cfg.get("thresholding", False))
        self.clip_sample = bool(cfg.get("clip_sample", False))
        self.clip_range = float(cfg.get("clip_sample_range", 1.0))
        self.threshold_ratio = float(cfg.get("dynamic_thresholding_ratio", 0.995))
        self.sample_max_value = float(cfg.get("sample_max_value", 1.0))
        # DDPMScheduler.step draws variance noise for t > 0; DDIMScheduler.step (eta = 0) draws none.
        self.step_draws_noise = type(scheduler).__name__.startswith("DDPM")

    def coefs(self, t: torch.Tensor, like: torch.Tensor):
        shape = (t.shape[0],) + (1,) * (like.dim() - 1)
        return self.a[t].view(shape), self.b[t].view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """a_t x0 + b_t noise in x0's dtype (diffusers' add_noise casts the table to x0's dtype)."""
        a, b = self.coefs(t, x0)
        return a.to(x0.dtype) * x0 + b.to(x0.dtype) * noise

    def x0(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor, group_dim: int) -> torch.Tensor:
        """pred_original_sample for per-sample timesteps t (B,); dynamic thresholding groups the
        elements from `group_dim` on (1: per sample, as a batched step; 2: per sample and channel,
        as the reference's per-sample step over [C, H, W])."""
        a, b = self.coefs(t, x_t)
        if self.prediction == "epsilon":
            x0 = (x_t - b * out) / a
        elif self.prediction == "v_prediction":
            x0 = a * x_t - b * out
        else:
            x0 = out
        if self.thresholding:
            x0 = self._threshold(x0, group_dim)
        elif self.clip_sample:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        return x0

    def _threshold(self, x0: torch.Tensor, group_dim: int) -> torch.Tensor:
        dtype = x0.dtype
        flat = x0.float().flatten(group_dim)
        s = torch.quantile(flat.abs(), self.threshold_ratio, dim=-1).clamp(1, self.sample_max_value)
        s = s.unsqueeze(-1)
        return (torch.clamp(flat, -s, s) / s).view(x0.shape).to(dtype)

    def discard_step_noise(self, out: torch.Tensor, t: torch.Tensor, per_sample: bool) -> None:
        """With EMULATE_SCHEDULER_RNG: the randn draws the reference's step() calls make (t > 0)."""
        if not (EMULATE_SCHEDULER_RNG and self.step_draws_noise):
            return
        if per_sample:
            for i in torch.nonzero(t > 0).flatten().tolist():
                torch.randn(out.shape[1:], device=out.device, dtype=out.dtype)
        elif int(t[0]) > 0:
            torch.randn(out.shape, device=out.device, dtype=out.dtype)


def tables_for(scheduler, device) -> SchedulerTables:
    """Cached SchedulerTables of `scheduler` on `device` (rebuilt if its alphas_cumprod or config
    object is replaced)."""
    device = torch.device(device)
    per_device = _TABLES.setdefault(scheduler, {})
    tab = per_device.get(device)
    if tab is None or tab.source is not scheduler.alphas_cumprod:
        tab = per_device[device] = SchedulerTables(scheduler, device)
    return tab
