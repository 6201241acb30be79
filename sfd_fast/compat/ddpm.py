"""Drop-in replacements for SFD:DDPM/functions/losses.py (spec §6.2).

    # from functions.losses import loss_registry_conditional
    from sfd_fast.compat.ddpm import loss_registry_conditional

Same signatures, defaults, model calls (the same keyword arguments reach `Conditional_Model`:
cond_drop_prob, cond_drop_mask, mode = "train" if cond_scale == 0 else "test", cond_scale) and
the same arithmetic in the same order, so outputs and gradients match the reference to rounding.
What is faster: the reference recomputes `(1 - b).cumprod(0)` on every call; here the
sqrt(alpha_bar) and sqrt(1 - alpha_bar) tables are computed once per beta tensor (keyed on its
identity, version counter, device and dtype, so an in-place edit of `b` rebuilds them).

Kept on purpose (reference semantics, see docs/compat.md): with use_diffinst=True the teacher and
fake outputs are computed under no_grad, but p_x and sg_x are still formed from x = a x0 + b e, so
the loss's gradient w.r.t. x0 cancels to zero (up to rounding); and with use_diffinst and
alpha == 1 the weight omega is 1 instead of mean|p_x - x0|.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from contextlib import nullcontext

import torch

from ._checks import check_labels, check_latents, check_same_shape, check_timesteps

__all__ = ["noise_estimation_loss", "noise_estimation_loss_conditional", "sid_sg_loss_conditional",
           "sid_g_loss_conditional", "loss_registry", "loss_registry_conditional"]

# id(beta tensor) -> (weakref to it, (version, device, dtype), sqrt(alpha_bar), sqrt(1 - alpha_bar)).
# Keyed by id with the weak reference checked on lookup (tensors cannot be WeakKeyDictionary keys:
# their == is elementwise); a few schedules at most are in use, the oldest is dropped past 16.
_ALPHAS: "OrderedDict[int, tuple]" = OrderedDict()


def _coefs(b: torch.Tensor, t: torch.Tensor):
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) as [n,1,1,1], computed as the reference does:
    a = (1 - b).cumprod(0)[t], then a.sqrt() and (1 - a).sqrt(), in b's dtype on b's device."""
    key = (b._version, b.device, b.dtype)
    hit = _ALPHAS.get(id(b))
    if hit is None or hit[0]() is not b or hit[1] != key:
        alpha_bar = (1 - b.detach()).cumprod(dim=0)
        hit = (weakref.ref(b), key, alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt())
        _ALPHAS[id(b)] = hit
        while len(_ALPHAS) > 16:
            _ALPHAS.popitem(last=False)
    _, _, sqrt_a, sqrt_1ma = hit
    return sqrt_a.index_select(0, t).view(-1, 1, 1, 1), sqrt_1ma.index_select(0, t).view(-1, 1, 1, 1)


def _check(x0, t, e, c=None, c_name="c"):
    n = check_latents("x0", x0)
    check_timesteps("t", t, n)
    check_same_shape("e", e, "x0", x0)
    if c is not None:
        check_labels(c_name, c, n)


def _reduce(per_sample: torch.Tensor, keepdim: bool) -> torch.Tensor:
    return per_sample if keepdim else per_sample.mean(dim=0)


def noise_estimation_loss(model, x0, t, e, b, keepdim=False):
    """Unconditional DDPM loss: sum_CHW (e - model(x_t, t))^2, batch mean (or [n] with keepdim)."""
    _check(x0, t, e)
    aa, bb = _coefs(b, t)
    output = model(x0 * aa + e * bb, t.float())
    return _reduce((e - output).square().sum(dim=(1, 2, 3)), keepdim)


def noise_estimation_loss_conditional(model, x0, t, c, e, b, cond_drop_prob=0.1, keepdim=False):
    """Class-conditional DDPM loss (model in "train" mode with cond_drop_prob)."""
    _check(x0, t, e, c)
    aa, bb = _coefs(b, t)
    output = model(x0 * aa + e * bb, t.float(), c, cond_drop_prob=cond_drop_prob, mode="train")
    return _reduce((e - output).square().sum(dim=(1, 2, 3)), keepdim)


def sid_sg_loss_conditional(model, x0, t, c, e, b, cond_scale=0.0, cond_drop_prob=0.0, cond_drop_mask=None,
                            keepdim=False):
    """Fake-score loss sum_CHW (e - eps_psi(x_t, t, c))^2: batch mean, or per sample [n] with keepdim."""
    _check(x0, t, e, c)
    mode = "train" if cond_scale == 0.0 else "test"
    aa, bb = _coefs(b, t)
    output = model(x0 * aa + e * bb, t.float(), c, cond_drop_prob=cond_drop_prob, cond_drop_mask=cond_drop_mask,
                   mode=mode, cond_scale=cond_scale)
    return _reduce((e - output).square().sum(dim=(1, 2, 3)), keepdim)


def _pseudo_labels(clf, sg_x, label_to_forget, pseudo_label_type):
    """Teacher labels from a classifier on the fake x0 in [0, 1], the forget class excluded."""
    if clf is None:
        raise ValueError("p_c=None needs clf (a classifier giving pseudo labels for the teacher); pass p_c "
                         "(e.g. label_to_override) or clf")
    if pseudo_label_type not in ("amax", "prob"):
        raise NotImplementedError(pseudo_label_type)
    logits = clf(sg_x.add(1.0).div(2.0).clamp(0, 1))
    logits[:, label_to_forget] = -torch.inf
    if pseudo_label_type == "amax":
        return logits.argmax(dim=-1)
    return torch.distributions.Categorical(logits=logits).sample()


def sid_g_loss_conditional(p_model, sg_model, x0, t, p_c, sg_c, e, b, alpha, cond_scale=0.0, cond_drop_prob=0.0,
                           cond_drop_mask=None, keepdim=False, label_to_forget=0, clf=None, pseudo_label_type="amax",
                           use_diffinst=False):
    """SiD generator loss per sample: sum_CHW (p_x - sg_x)((p_x - x0) - alpha (p_x - sg_x)) / omega,
    omega = mean_CHW |p_x - x0| (no grad, >= 1e-5); teacher `p_model` on p_c, fake `sg_model` on
    sg_c. p_c=None: pseudo labels from `clf` ("amax" or "prob"). Batch mean, or [n] with keepdim.
    Neither network output is detached (gradients reach x0 through both), except with use_diffinst.
    """
    n = check_latents("x0", x0)
    _check(x0, t, e, sg_c, "sg_c")
    if p_c is not None:
        check_labels("p_c", p_c, n)
    mode = "train" if cond_scale == 0.0 else "test"
    aa, bb = _coefs(b, t)
    x = x0 * aa + e * bb
    tf = t.float()
    kw = dict(cond_drop_prob=cond_drop_prob, cond_drop_mask=cond_drop_mask, mode=mode, cond_scale=cond_scale)
    with torch.no_grad() if use_diffinst else nullcontext():
        sg_e = sg_model(x, tf, sg_c, **kw)
    sg_x = (x - bb * sg_e) / aa
    if p_c is None:
        p_c = _pseudo_labels(clf, sg_x, label_to_forget, pseudo_label_type)
    with torch.no_grad() if use_diffinst else nullcontext():
        p_e = p_model(x, tf, p_c, **kw)
    p_x = (x - bb * p_e) / aa
    with torch.no_grad():
        omega = (p_x - x0).abs_().float().mean(dim=[1, 2, 3], keepdim=True).clamp_(min=0.00001)
    if use_diffinst and alpha == 1.0:
        loss = ((p_x - sg_x) * (sg_x - x0)).div(1.0).sum(dim=(1, 2, 3))
    else:
        loss = ((p_x - sg_x) * ((p_x - x0) - alpha * (p_x - sg_x))).div(omega).sum(dim=(1, 2, 3))
    return _reduce(loss, keepdim)


loss_registry = {"simple": noise_estimation_loss}
loss_registry_conditional = {
    "simple": noise_estimation_loss_conditional,
    "sid-sg": sid_sg_loss_conditional,
    "sid-g": sid_g_loss_conditional,
}
