"""The fake-score loss is the epsilon-MSE for every prediction type (losses.fake_score_weight).

For an x0-estimate x0_hat at x_t = a x0 + b n (a^2 + b^2 = 1):
    eps_hat = (x_t - a x0_hat) / b,  v_hat = (a x_t - x0_hat) / b   (schedules.x0_from_output inverted)
    eps_hat - n = (a/b)(x0 - x0_hat),  v_hat - v = (1/b)(x0 - x0_hat)
so  |eps_hat - n|^2 = a^2 |v_hat - v|^2 = (a/b)^2 |x0_hat - x0|^2  row by row.
"""
import copy

import pytest
import torch
from torch import nn

from sfd_fast.denoisers import ClassCondDenoiser
from sfd_fast.digits.model import DigitsEpsMLP
from sfd_fast.generator import OneStepGenerator
from sfd_fast.losses import fake_score_loss, fake_score_weight
from sfd_fast.schedules import VPSchedule

from tests.test_step import _draws
from tests.helpers import fake_phase


def _schedule(prediction):
    return VPSchedule.from_betas("linear", 1e-4, 0.02, 1000, prediction)


def _outputs_from_x0_hat(x0, noise, x0_hat, t, dtype):
    """eps and v outputs that decode (schedules.x0_from_output) to x0_hat, with their targets."""
    eps_s, v_s = _schedule("epsilon"), _schedule("v_prediction")
    a64 = eps_s.alphas_cumprod[t].sqrt().to(dtype).view(-1, *[1] * (x0.dim() - 1))
    b64 = (1 - eps_s.alphas_cumprod[t]).sqrt().to(dtype).view_as(a64)
    x_t = a64 * x0 + b64 * noise
    eps_hat, v_hat = (x_t - a64 * x0_hat) / b64, (a64 * x_t - x0_hat) / b64
    return x_t, eps_hat, eps_s.target(x0, noise, t), v_hat, a64 * noise - b64 * x0, a64.flatten(), b64.flatten()


def test_weighted_v_loss_equals_eps_loss_row_by_row_float64():
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 37, 38, 440, 711, 980, 999])     # the whole table, both ends included
    x0 = torch.randn(8, 3, 5, 4, generator=g, dtype=torch.float64)   # odd shape
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x0_hat = x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t, eps_hat, eps_target, v_hat, v_target, a, b = _outputs_from_x0_hat(x0, noise, x0_hat, t, torch.float64)
    # the outputs really are eps and v networks' outputs for x0_hat
    torch.testing.assert_close(_schedule("v_prediction").x0_from_output(x_t, v_hat.float(), t).double(), x0_hat,
                               rtol=0, atol=1e-4)   # the schedule's float32 tables: ~1e-7 x |x_t| / b
    eps_loss = fake_score_loss(eps_hat, eps_target)
    v_loss = fake_score_loss(v_hat, v_target, fake_score_weight("v_prediction", a, b))
    x0_loss = fake_score_loss(x0_hat, x0, fake_score_weight("sample", a, b))
    # fake_score_loss accumulates in float32: relative error ~1e-6 per row (60-element sums of squares
    # rounded once to float32); rtol 1e-5 is a 10x margin. The unweighted loss differs by 1/a^2 - 1,
    # 1e-4 at t = 0 and 200x at t = 999, checked row by row on the next lines.
    torch.testing.assert_close(v_loss, eps_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(x0_loss, eps_loss, rtol=1e-5, atol=0)
    unweighted = fake_score_loss(v_hat, v_target)
    ratio = (unweighted / eps_loss).double()
    torch.testing.assert_close(ratio, 1 / a.square(), rtol=1e-5, atol=0)   # the derivation's 1/a^2
    assert ratio[-1] > 150   # what the weight removes: the high-noise rows weighed up to ~200x


def test_weighted_v_loss_float32_batch1_and_nan_rows():
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([38, 200, 500, 711])
    x0 = torch.randn(4, 7, generator=g)
    noise = torch.randn(4, 7, generator=g)
    x0_hat = x0 + 0.2 * torch.randn(4, 7, generator=g)
    x0_hat[2, 3] = float("nan")
    _, eps_hat, eps_target, v_hat, v_target, a, b = _outputs_from_x0_hat(x0, noise, x0_hat, t, torch.float32)
    eps_loss = fake_score_loss(eps_hat, eps_target)
    v_loss = fake_score_loss(v_hat, v_target, fake_score_weight("v_prediction", a, b))
    assert torch.isnan(v_loss[2]) and torch.isnan(eps_loss[2]) and torch.isfinite(v_loss[[0, 1, 3]]).all()
    # float32 inputs: (x_t - a x0_hat)/b amplifies rounding by <= 1/b_38 ~ 8 -> ~1e-6 relative; rtol 1e-4
    # is a 100x margin and still 20x below the smallest unweighted gap here (1/a^2 - 1 = 0.2% at t = 38)
    keep = [0, 1, 3]
    torch.testing.assert_close(v_loss[keep], eps_loss[keep], rtol=1e-4, atol=0)
    one = fake_score_loss(v_hat[1:2], v_target[1:2], fake_score_weight("v_prediction", a[1:2], b[1:2]))
    torch.testing.assert_close(one, eps_loss[1:2], rtol=1e-4, atol=0)   # batch 1


def test_weight_rules():
    a, b = torch.tensor([0.6]), torch.tensor([0.8])
    assert fake_score_weight("epsilon", a, b) is None
    torch.testing.assert_close(fake_score_weight("v_prediction", a, b), torch.tensor([0.36]))
    torch.testing.assert_close(fake_score_weight("sample", a, b), torch.tensor([0.5625]))
    with pytest.raises(ValueError, match="unknown prediction type 'flow'"):
        fake_score_weight("flow", a, b)
    with pytest.raises(ValueError, match="weight"):
        fake_score_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))


class X0AsOutput(nn.Module):
    """One x0-predictor exposed as an epsilon or a v network (the same function, two parameterisations)."""

    def __init__(self, x0_net: nn.Module, schedule: VPSchedule):
        super().__init__()
        self.x0_net, self.schedule = x0_net, schedule

    def forward(self, x_t, t, labels):
        a, b = self.schedule.coefs(t, x_t)
        x0 = self.x0_net(x_t, t, labels)
        return (x_t - a * x0) / b if self.schedule.prediction == "epsilon" else (a * x_t - x0) / b


def _fake_score_grads(prediction, x0_net, generator, draws, guidance):
    sched = _schedule(prediction)
    fake = ClassCondDenoiser(X0AsOutput(copy.deepcopy(x0_net), sched), sched, 10)
    loss, stats = fake_phase(generator, fake, sched, draws, guidance, 6.0)
    loss.backward()
    return loss.detach(), stats, [p.grad for p in fake.net.x0_net.parameters()]


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_eps_and_v_models_of_one_x0_predictor_get_the_same_fake_score_gradients(guidance):
    torch.manual_seed(0)
    x0_net = DigitsEpsMLP(10, 32, 1)     # read as an x0-predictor here
    generator = OneStepGenerator(ClassCondDenoiser(DigitsEpsMLP(10, 32, 1), _schedule("epsilon"), 10), 440)
    draws = _draws(5, 2, seed=3)         # 7 rows (odd), remain and forget, coefficients 1 and 0.5
    loss_e, stats_e, grads_e = _fake_score_grads("epsilon", x0_net, generator, draws, guidance)
    loss_v, stats_v, grads_v = _fake_score_grads("v_prediction", x0_net, generator, draws, guidance)
    # float32 end to end; the conversions amplify rounding by <= 1/b_38 ~ 8: ~1e-6 relative, 1e-4 margin
    torch.testing.assert_close(loss_v, loss_e, rtol=1e-4, atol=0)
    torch.testing.assert_close(stats_v, stats_e, rtol=1e-4, atol=0)
    for gv, ge in zip(grads_v, grads_e):
        torch.testing.assert_close(gv, ge, rtol=1e-4, atol=1e-6 * ge.abs().max().item())


def test_unweighted_v_loss_would_differ(monkeypatch):
    """The check above can fail: without the a_t^2 weight the v model trains another objective."""
    import sfd_fast.step as step
    torch.manual_seed(0)
    x0_net = DigitsEpsMLP(10, 32, 1)
    generator = OneStepGenerator(ClassCondDenoiser(DigitsEpsMLP(10, 32, 1), _schedule("epsilon"), 10), 440)
    draws = _draws(5, 2, seed=3)
    loss_e, _, grads_e = _fake_score_grads("epsilon", x0_net, generator, draws, 1.0)
    monkeypatch.setattr(step, "fake_score_weight", lambda *args: None)
    loss_v, _, grads_v = _fake_score_grads("v_prediction", x0_net, generator, draws, 1.0)
    assert loss_v > 1.1 * loss_e    # each row scaled by 1/a_t^2 in [1.02, 170] for t in [38, 712)
    with pytest.raises(AssertionError):
        for gv, ge in zip(grads_v, grads_e):
            torch.testing.assert_close(gv, ge, rtol=1e-4, atol=1e-6 * ge.abs().max().item())
