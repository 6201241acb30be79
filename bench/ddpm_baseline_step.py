"""The reference-structured SFD step for the ddpm family (spec §1a, SFD:DDPM/runners/diffusion.py
train_sfd L639-812), kept ONLY to measure the fast step against. It has the reference loop's
structure (spec §5.2), on purpose:

  * remain and forget run as separate passes (G, fake score and teacher each run twice at B);
  * a "dataset" batch (images + labels) is made on the host and copied every step, only for its
    labels and shape; t is drawn on the CPU and copied;
  * `(1 - b).cumprod()` is recomputed inside every loss call;
  * `.item()` after every loss (the reference also all-reduces it; one process here);
  * `.train()/.eval()/.requires_grad_()` toggles of whole networks every step;
  * plain torch.optim.Adam, clip_grad_value_ per network, a per-parameter EMA loop, and the
    early-stage snapshot list recomputed with numpy every step.
The network is the same DDPMUNet in both providers (the reference's module computes the same
function, tests/test_ddpm_model.py), so the ratio measures the step's structure, not the network.
"""
from __future__ import annotations

import copy

import numpy as np
import torch


class BaselineDDPMSFD:
    def __init__(self, net: torch.nn.Module, batch: int, device, shape: tuple, alpha=1.2, t_init=440,
                 t_min=38, t_max=712, forget=0, override=1, lrs=(1e-5, 1e-5), coefs=(1.0, 0.01, 1.0, 0.01),
                 ema_rate=0.9999, seed=0):
        self.device, self.n, self.shape = torch.device(device), batch, shape
        self.p_model = copy.deepcopy(net).to(device).eval().requires_grad_(False)
        self.sg_model = copy.deepcopy(net).to(device).train().requires_grad_(True)
        self.g_model = copy.deepcopy(net).to(device).train().requires_grad_(True)
        self.sg_opt = torch.optim.Adam(self.sg_model.parameters(), lr=lrs[0], betas=(0.0, 0.999), eps=1e-8)
        self.g_opt = torch.optim.Adam(self.g_model.parameters(), lr=lrs[1], betas=(0.0, 0.999), eps=1e-8)
        self.shadow = {k: p.data.detach().clone() for k, p in self.g_model.named_parameters()}
        self.b = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64).float().to(device)
        ac = (1 - self.b).cumprod(0)
        self.init_a, self.init_b = ac[t_init].sqrt(), (1 - ac[t_init]).sqrt()
        self.init_sigma = (1 / ac[t_init] - 1).sqrt()
        self.alpha, self.t_init, self.t_min, self.t_max = alpha, t_init, t_min, t_max
        self.forget, self.override, self.coefs, self.mu = forget, override, coefs, ema_rate
        self.gen = torch.Generator().manual_seed(seed)
        self.step = 0

    def next_batch(self):
        """Stand-in for the reference's real-image loader: host images + remain labels, copied."""
        x = torch.randn((self.n, *self.shape), generator=self.gen)
        r = torch.randint(0, 9, (self.n,), generator=self.gen)
        c = r + (r >= self.forget).long()
        return x.to(self.device), c.to(self.device)

    def run_generator(self, x, c, net, z=None):
        """x0 = xt / a_init - sigma_init * eps(xt), xt = b_init * z (z drawn here unless given)."""
        t = torch.empty(x.size(0), device=self.device).fill_(self.t_init)
        xt = self.init_b * (torch.randn_like(x) if z is None else z)
        return xt / self.init_a - self.init_sigma * net(xt, t, c)

    def draw_t(self):
        return torch.randint(self.t_min, self.t_max, (self.n,), generator=self.gen).to(self.device)

    def sg_loss(self, x0, t, c, e):
        a = (1 - self.b).cumprod(dim=0).index_select(0, t).view(-1, 1, 1, 1)
        x = x0 * a.sqrt() + e * (1.0 - a).sqrt()
        return (e - self.sg_model(x, t.float(), c)).square().sum(dim=(1, 2, 3)).mean(dim=0)

    def g_loss(self, x0, t, p_c, sg_c, e):
        a = (1 - self.b).cumprod(dim=0).index_select(0, t).view(-1, 1, 1, 1)
        x = x0 * a.sqrt() + e * (1.0 - a).sqrt()
        sg_x = (x - (1 - a).sqrt() * self.sg_model(x, t.float(), sg_c)) / a.sqrt()
        p_x = (x - (1 - a).sqrt() * self.p_model(x, t.float(), p_c)) / a.sqrt()
        with torch.no_grad():
            w = (p_x - x0).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)
        loss = (p_x - sg_x) * ((p_x - x0) - self.alpha * (p_x - sg_x)) / w
        return loss.sum(dim=(1, 2, 3)).mean(dim=0)

    def train_step(self):
        sg_r, sg_f, g_r, g_f = self.coefs
        # fake-score update: remain pass, then forget pass
        self.sg_model.train().requires_grad_(True)
        self.sg_opt.zero_grad(set_to_none=True)
        x, c = self.next_batch()
        forget_c = torch.empty_like(c).fill_(self.forget)
        for labels, coef in ((c, sg_r), (forget_c, sg_f)):
            with torch.no_grad():
                x0 = self.run_generator(x, labels, self.g_model)
            loss = self.sg_loss(x0, self.draw_t(), labels, torch.randn_like(x0))
            loss.mul(coef).backward()
            loss.detach().item()
        torch.nn.utils.clip_grad_value_(self.sg_model.parameters(), 1.0)
        self.sg_opt.step()
        # generator update: remain pass, then forget pass (teacher on the override label)
        self.sg_model.eval().requires_grad_(False)
        self.g_model.train().requires_grad_(True)
        self.g_opt.zero_grad(set_to_none=True)
        override_c = torch.empty_like(c).fill_(self.override)
        for g_c, p_c, coef in ((c, c, g_r), (forget_c, override_c, g_f)):
            x0 = self.run_generator(x, g_c, self.g_model)
            loss = self.g_loss(x0, self.draw_t(), p_c, g_c, torch.randn_like(x0))
            loss.mul(coef).backward()
            loss.detach().item()
        torch.nn.utils.clip_grad_value_(self.g_model.parameters(), 1.0)
        self.g_opt.step()
        self.g_model.eval().requires_grad_(False)
        for name, p in self.g_model.named_parameters():  # FixedEMAHelper.update
            self.shadow[name].copy_(p.data.detach().lerp(self.shadow[name], self.mu))
        np.exp(np.linspace(np.log(5000) // 15, np.log(5000), 15)).astype(np.int64)[:-1]
        self.step += 1
