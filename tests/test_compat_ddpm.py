"""sfd_fast.compat.ddpm against a plain restatement of SFD:DDPM/functions/losses.py (spec §1a, §6.2).

A tiny class-conditional model with the reference's call convention model(x, t, c, mode=..., cond_drop_prob=...,
cond_drop_mask=..., cond_scale=...) (CFG in "test" mode as (1 + s) cond - s null, label dropout in
"train" mode); a tiny generator makes x0 so that parameter gradients flow. Outputs and gradients
(w.r.t. x0's generator parameters and the networks' parameters) must agree.

Tolerance: both sides do the same float32 operations in the same order on the same inputs; the
compat side reuses a cached (1 - b).cumprod table computed by the same ops. 1e-6 relative + 1e-6 of
the tensor's scale absolute leaves room for a different reduction order only (a real difference,
e.g. a wrong label, alpha or omega, changes the loss by O(1) of its scale).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sfd_fast.compat import ddpm as compat

N_CLASSES = 10


class TinyCondModel(nn.Module):
    """eps(x, t, c): conv net with time and label embeddings (null label = N_CLASSES)."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)
        self.label = nn.Embedding(N_CLASSES + 1, 8)
        for p in self.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.calls = []

    def _forward(self, x, t, c, cond_drop_prob=None, cond_drop_mask=None):
        if cond_drop_mask is None and cond_drop_prob:
            cond_drop_mask = torch.rand(c.shape[0], device=c.device) < cond_drop_prob
        if cond_drop_mask is not None:
            c = torch.where(cond_drop_mask, torch.full_like(c, N_CLASSES), c)
        h = self.conv1(x) + self.label(c)[:, :, None, None] + (t / 1000)[:, None, None, None]
        return self.conv2(torch.tanh(h))

    def forward(self, x, t, c, mode="train", cond_drop_prob=None, cond_drop_mask=None, cond_scale=0.0):
        self.calls.append(dict(mode=mode, cond_drop_prob=cond_drop_prob, cond_drop_mask=cond_drop_mask,
                               cond_scale=cond_scale, t_dtype=t.dtype))
        if mode == "train":
            return self._forward(x, t, c, cond_drop_prob, cond_drop_mask)
        out_c = self._forward(x, t, c)
        out_u = self._forward(x, t, c, cond_drop_mask=torch.ones_like(c, dtype=torch.bool))
        return (1 + cond_scale) * out_c - cond_scale * out_u


def tiny_classifier(x):
    """A fixed 'classifier' on [0, 1] images: channel means mixed into 10 logits."""
    w = torch.linspace(-2, 2, 3 * N_CLASSES).view(3, N_CLASSES)
    return x.mean(dim=(2, 3)) @ w * 5


# ---- the reference, restated -------------------------------------------------------------------
def ref_sg_loss(model, x0, t, c, e, b, cond_scale=0.0, cond_drop_prob=0.0, cond_drop_mask=None, keepdim=False):
    mode = "train" if cond_scale == 0.0 else "test"
    a = (1 - b).cumprod(dim=0).index_select(0, t).view(-1, 1, 1, 1)
    x = x0 * a.sqrt() + e * (1.0 - a).sqrt()
    out = model(x, t.float(), c, cond_drop_prob=cond_drop_prob, cond_drop_mask=cond_drop_mask, mode=mode,
                cond_scale=cond_scale)
    per = (e - out).square().sum(dim=(1, 2, 3))
    return per if keepdim else per.mean(dim=0)


def ref_g_loss(p_model, sg_model, x0, t, p_c, sg_c, e, b, alpha, cond_scale=0.0, cond_drop_prob=0.0,
               cond_drop_mask=None, keepdim=False, label_to_forget=0, clf=None, pseudo_label_type="amax",
               use_diffinst=False):
    mode = "train" if cond_scale == 0.0 else "test"
    a = (1 - b).cumprod(dim=0).index_select(0, t).view(-1, 1, 1, 1)
    bb, aa = (1.0 - a).sqrt(), a.sqrt()
    x = x0 * aa + e * bb
    kw = dict(cond_drop_prob=cond_drop_prob, cond_drop_mask=cond_drop_mask, mode=mode, cond_scale=cond_scale)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not use_diffinst):
        sg_e = sg_model(x, t.float(), sg_c, **kw)
    sg_x = (x - bb * sg_e) / aa
    if p_c is None:
        logits = clf(sg_x.add(1.0).div(2.0).clamp(0, 1))
        logits[:, label_to_forget] = -torch.inf
        p_c = logits.argmax(-1) if pseudo_label_type == "amax" else torch.distributions.Categorical(
            logits=logits).sample()
    with torch.set_grad_enabled(torch.is_grad_enabled() and not use_diffinst):
        p_e = p_model(x, t.float(), p_c, **kw)
    p_x = (x - bb * p_e) / aa
    with torch.no_grad():
        omega = (p_x - x0).abs().float().mean(dim=[1, 2, 3], keepdim=True).clamp(min=1e-5)
    if use_diffinst and alpha == 1.0:
        loss = ((p_x - sg_x) * (sg_x - x0)).sum(dim=(1, 2, 3))
    else:
        loss = ((p_x - sg_x) * ((p_x - x0) - alpha * (p_x - sg_x))).div(omega).sum(dim=(1, 2, 3))
    return loss if keepdim else loss.mean(dim=0)


def ref_simple_loss(model, x0, t, c, e, b, cond_drop_prob=0.1, keepdim=False):
    a = (1 - b).cumprod(dim=0).index_select(0, t).view(-1, 1, 1, 1)
    x = x0 * a.sqrt() + e * (1.0 - a).sqrt()
    per = (e - model(x, t.float(), c, cond_drop_prob=cond_drop_prob, mode="train")).square().sum(dim=(1, 2, 3))
    return per if keepdim else per.mean(dim=0)


# ---- fixtures ------------------------------------------------------------------------------------
BETAS = torch.linspace(1e-4, 0.02, 1000)


def _setup(n=5):
    g = torch.Generator().manual_seed(0)
    generator = nn.Conv2d(3, 3, 3, padding=1)
    with torch.no_grad():
        for p in generator.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    z = torch.randn(n, 3, 8, 8, generator=g)
    e = torch.randn(n, 3, 8, 8, generator=g)
    t = torch.tensor([38, 711, 440, 100, 600][:n])
    c = torch.tensor([0, 3, 9, 1, 0][:n])
    return generator, z, e, t, c, TinyCondModel(1), TinyCondModel(2)


def assert_close(actual, expected, what):
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * max(scale, 1e-12), msg=lambda m: f"{what}: {m}")


def _grads(fn, nets):
    for net in nets:
        net.zero_grad(set_to_none=True)
    loss = fn()
    loss.sum().backward()
    return loss.detach(), [torch.cat([p.grad.flatten() for p in net.parameters()]) if any(
        p.grad is not None for p in net.parameters()) else torch.zeros(0) for net in nets]


@pytest.mark.parametrize("alpha", [1.0, 1.2])
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("cond_scale", [0.0, 2.0])
@pytest.mark.parametrize("use_diffinst", [False, True])
def test_g_loss_matches_reference(alpha, keepdim, cond_scale, use_diffinst):
    generator, z, e, t, c, teacher, fake = _setup()
    forget = torch.zeros_like(c)
    mask = torch.tensor([True, False, False, True, False])
    kw = dict(alpha=alpha, cond_scale=cond_scale, cond_drop_mask=mask if cond_scale == 0 else None, keepdim=keepdim,
              use_diffinst=use_diffinst)
    nets = (generator, teacher, fake)
    ref = _grads(lambda: ref_g_loss(teacher, fake, generator(z), t, c, forget, e, BETAS, **kw), nets)
    ref_calls = teacher.calls + fake.calls
    teacher.calls, fake.calls = [], []
    new = _grads(lambda: compat.sid_g_loss_conditional(teacher, fake, generator(z), t, c, forget, e, BETAS, **kw), nets)
    assert new[0].shape == ((5,) if keepdim else ())
    assert_close(new[0], ref[0], "loss")
    for a, b, what in zip(new[1], ref[1], ("grad generator", "grad teacher", "grad fake")):
        if b.numel():
            assert_close(a, b, what)
        else:
            assert a.numel() == 0, f"{what}: compat produced gradients where the reference has none"
    assert teacher.calls + fake.calls == ref_calls  # the same kwargs (mode, cond_scale, mask, float t)
    if not use_diffinst:
        assert ref[1][0].abs().max() > 0


@pytest.mark.parametrize("pseudo_label_type", ["amax", "prob"])
def test_g_loss_classifier_pseudo_labels(pseudo_label_type):
    generator, z, e, t, c, teacher, fake = _setup()
    kw = dict(alpha=1.2, label_to_forget=0, clf=tiny_classifier, pseudo_label_type=pseudo_label_type)
    torch.manual_seed(11)
    ref = ref_g_loss(teacher, fake, generator(z), t, None, c, e, BETAS, keepdim=True, **kw)
    torch.manual_seed(11)
    new = compat.sid_g_loss_conditional(teacher, fake, generator(z), t, None, c, e, BETAS, keepdim=True, **kw)
    assert_close(new, ref, "loss with pseudo labels")
    with pytest.raises(ValueError, match="p_c=None needs clf"):
        compat.sid_g_loss_conditional(teacher, fake, generator(z), t, None, c, e, BETAS, alpha=1.2)


@pytest.mark.parametrize("cond_scale,cond_drop_prob", [(0.0, 0.0), (0.0, 0.5), (3.0, 0.0)])
@pytest.mark.parametrize("keepdim", [False, True])
def test_sg_and_simple_loss_match_reference(cond_scale, cond_drop_prob, keepdim):
    generator, z, e, t, c, _, fake = _setup()
    x0 = generator(z).detach()
    kw = dict(cond_scale=cond_scale, cond_drop_prob=cond_drop_prob, keepdim=keepdim)
    torch.manual_seed(5)
    ref = _grads(lambda: ref_sg_loss(fake, x0, t, c, e, BETAS, **kw), (fake,))
    torch.manual_seed(5)
    new = _grads(lambda: compat.sid_sg_loss_conditional(fake, x0, t, c, e, BETAS, **kw), (fake,))
    assert_close(new[0], ref[0], "sg loss")
    assert_close(new[1][0], ref[1][0], "sg grad")
    torch.manual_seed(6)
    ref = ref_simple_loss(fake, x0, t, c, e, BETAS, cond_drop_prob=cond_drop_prob, keepdim=keepdim)
    torch.manual_seed(6)
    new = compat.noise_estimation_loss_conditional(fake, x0, t, c, e, BETAS, cond_drop_prob=cond_drop_prob,
                                                   keepdim=keepdim)
    assert_close(new, ref, "simple loss")


def test_beta_table_cache_follows_in_place_edits():
    generator, z, e, t, c, _, fake = _setup()
    x0 = generator(z).detach()
    betas = BETAS.clone()
    first = compat.sid_sg_loss_conditional(fake, x0, t, c, e, betas)
    betas.mul_(0.5)
    assert_close(compat.sid_sg_loss_conditional(fake, x0, t, c, e, betas), ref_sg_loss(fake, x0, t, c, e, betas),
                 "after editing b")
    assert (first - ref_sg_loss(fake, x0, t, c, e, betas)).abs() > 1e-4


def test_bad_inputs():
    generator, z, e, t, c, teacher, fake = _setup()
    x0 = generator(z).detach()
    with pytest.raises(ValueError, match=r"t must be a tensor of shape \[5\]"):
        compat.sid_sg_loss_conditional(fake, x0, t[:4], c, e, BETAS)
    with pytest.raises(ValueError, match=r"c must be a tensor of shape \[5\]"):
        compat.sid_sg_loss_conditional(fake, x0, t, c[:3], e, BETAS)
    with pytest.raises(ValueError, match="e must have the shape of x0"):
        compat.sid_sg_loss_conditional(fake, x0, t, c, e[:, :2], BETAS)
    with pytest.raises(ValueError, match=r"p_c must be a tensor of shape \[5\]"):
        compat.sid_g_loss_conditional(teacher, fake, x0, t, c[:1], c, e, BETAS, alpha=1.0)
