"""sfd_fast.compat.edm.SID_EDMLoss against a plain restatement of SiD:training/sid_loss.py (spec §1c, §6.3).

Tiny EDM-preconditioned networks D(x, sigma, labels, augment_labels) = c_skip x + c_out F(c_in x, c_noise);
a tiny generator makes `images` so that parameter gradients flow. The same seed must give the same
random draws (sigma, noise) on both sides, hence the same unreduced tensors and gradients.

Tolerance: identical float32 operations on identical inputs up to the order of a few elementwise
ops; 1e-6 relative + 1e-6 of the tensor's scale absolute (a wrong sigma draw or weight changes the
values by O(1) of their scale).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sfd_fast.compat.edm import SID_EDMLoss


class TinyEDM(nn.Module):
    def __init__(self, seed, nan_label=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.label = nn.Linear(4, 3)
        self.aug = nn.Linear(9, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.nan_label = nan_label

    def forward(self, x, sigma, labels, augment_labels=None):
        s2 = sigma**2 + 0.25
        c_skip, c_out, c_in, c_noise = 0.25 / s2, sigma * 0.5 / s2.sqrt(), 1 / s2.sqrt(), sigma.log() / 4
        h = self.conv(x * c_in) + c_noise + self.label(labels)[:, :, None, None]
        if augment_labels is not None:
            h = h + self.aug(augment_labels)[:, :, None, None]
        out = c_skip * x + c_out * torch.tanh(h)
        if self.nan_label is not None:  # rows whose label is nan_label produce NaN
            out = torch.where((labels.argmax(1) == self.nan_label)[:, None, None, None], float("nan"), out)
        return out


def ref_generator_loss(true_score, fake_score, images, labels=None, augment_pipe=None, alpha=1.2, tmax=800):
    rho = 7.0
    lo, hi = 0.002 ** (1 / rho), 80 ** (1 / rho)
    u = torch.rand([images.shape[0], 1, 1, 1], device=images.device) * tmax / 1000
    sigma = (hi + (1 - u) * (lo - hi)) ** rho
    y, aug = augment_pipe(images) if augment_pipe is not None else (images, torch.zeros(images.shape[0], 9))
    n = torch.randn_like(y) * sigma
    y_real = true_score(y + n, sigma, labels, augment_labels=aug)
    y_fake = fake_score(y + n, sigma, labels, augment_labels=aug)
    nan = sum(torch.isnan(v).flatten(1).any(1).int() for v in (y, y_real, y_fake)) > 0
    y, y_real, y_fake = y[~nan], y_real[~nan], y_fake[~nan]
    with torch.no_grad():
        w = (y - y_real).abs().float().mean(dim=[1, 2, 3], keepdim=True).clip(min=1e-5)
    return (y_real - y_fake) * ((y_real - y) - alpha * (y_real - y_fake)) / w


def ref_fake_loss(fake_score, images, labels=None, augment_pipe=None, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
    sigma = (torch.randn([images.shape[0], 1, 1, 1]) * P_std + P_mean).exp()
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    y, aug = augment_pipe(images) if augment_pipe is not None else (images, None)
    y_fake = fake_score(y + torch.randn_like(y) * sigma, sigma, labels, augment_labels=aug)
    nan = torch.isnan(y).flatten(1).any(1) | torch.isnan(y_fake).flatten(1).any(1)
    return weight[~nan] * (y_fake[~nan] - y[~nan]) ** 2


def flip_augment(images):
    return images.flip(3), torch.ones(images.shape[0], 9) * 0.5


def assert_close(actual, expected, what):
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * max(scale, 1e-12), msg=lambda m: f"{what}: {m}")


def _setup(nan_label=None):
    g = torch.Generator().manual_seed(0)
    generator = nn.Conv2d(3, 3, 3, padding=1)
    with torch.no_grad():
        for p in generator.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    z = torch.randn(5, 3, 8, 8, generator=g) * 2.5
    labels = torch.eye(4)[torch.tensor([0, 1, 2, 3, 1])]
    return generator, z, labels, TinyEDM(1), TinyEDM(2, nan_label)


def _with_grads(fn, nets, seed):
    for net in nets:
        net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = fn()
    loss.sum().backward()
    return loss.detach(), [torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
                           for net in nets]


@pytest.mark.parametrize("alpha", [1.0, 1.2])
@pytest.mark.parametrize("augment", [None, flip_augment])
@pytest.mark.parametrize("nan_label", [None, 2])
def test_generator_loss_matches_reference(alpha, augment, nan_label):
    generator, z, labels, teacher, fake = _setup(nan_label)
    nets = (generator, teacher, fake)
    ref = _with_grads(lambda: ref_generator_loss(teacher, fake, generator(z), labels, augment, alpha), nets, 3)
    new = _with_grads(lambda: SID_EDMLoss().generator_loss(teacher, fake, generator(z), labels, augment, alpha),
                      nets, 3)
    assert new[0].shape == ((4 if nan_label is not None else 5), 3, 8, 8)
    assert_close(new[0], ref[0], "loss")
    for a, b, what in zip(new[1], ref[1], ("grad generator", "grad teacher", "grad fake")):
        assert_close(a, b, what)
    assert ref[1][0].abs().max() > 0


@pytest.mark.parametrize("augment", [None, flip_augment])
@pytest.mark.parametrize("nan_label", [None, 3])
def test_fake_score_loss_matches_reference(augment, nan_label):
    generator, z, labels, _, fake = _setup(nan_label)
    images = generator(z).detach()
    ref = _with_grads(lambda: ref_fake_loss(fake, images, labels, augment), (fake,), 4)
    new = _with_grads(lambda: SID_EDMLoss()(fake, images, labels, augment), (fake,), 4)
    assert new[0].shape[0] == (4 if nan_label is not None else 5)
    assert_close(new[0], ref[0], "loss")
    assert_close(new[1][0], ref[1][0], "grad fake")


def test_bad_input():
    _, _, labels, teacher, fake = _setup()
    with pytest.raises(ValueError, match=r"images must be a floating tensor of shape \[B, C, H, W\]"):
        SID_EDMLoss().generator_loss(teacher, fake, torch.zeros(3, 8, 8), labels)
