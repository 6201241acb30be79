"""The one-step generator (spec §0).

    x_g = D_theta(b_init * z, t_init, c)  =  sigma_init * (z - eps_theta(b_init * z, t_init, c))   (eps-pred)

i.e. the network's x0-estimate at the VP-scaled pure noise b_{t_init} z. It is initialised from the
teacher's weights (SFD) or from another generator checkpoint ("two-stage").
"""
from __future__ import annotations

import torch
from torch import nn

from .denoisers import Denoiser


class OneStepGenerator(nn.Module):
    def __init__(self, denoiser: Denoiser, t_init: int):
        super().__init__()
        self.denoiser = denoiser
        self.t_init = int(t_init)
        self.b_init = denoiser.schedule.b(self.t_init)

    @property
    def net(self) -> nn.Module:
        return self.denoiser.net

    def forward(self, z: torch.Tensor, cond) -> torch.Tensor:
        t = torch.full((z.shape[0],), self.t_init, dtype=torch.long, device=z.device)
        return self.denoiser.x0(self.b_init * z, t, cond)
