"""The reference loss math against hand-derived values."""
import torch

from sfd_fast.losses import (OMEGA_MIN, fake_score_loss, generator_loss, generator_loss_alpha1,
                             masked_weighted_sum, sid_omega)


def test_generator_loss_hand_values():
    # one sample, 2 elements: x_g = [0, 1], y_real = [1, 1], y_fake = [0.5, 2]
    x_g = torch.tensor([[0.0, 1.0]])
    y_r = torch.tensor([[1.0, 1.0]])
    y_f = torch.tensor([[0.5, 2.0]])
    # omega = mean |x_g - y_r| = (1 + 0)/2 = 0.5
    # d = y_r - y_f = [0.5, -1]; (y_r - x_g) = [1, 0]
    # alpha = 1.2: sum d * ((y_r - x_g) - 1.2 d) = 0.5*(1 - 0.6) + (-1)*(0 + 1.2) = 0.2 - 1.2 = -1.0
    # / omega -> -2.0
    assert torch.allclose(generator_loss(x_g, y_r, y_f, 1.2), torch.tensor([-2.0]))
    # alpha = 1: sum d*(y_f - x_g) = 0.5*0.5 + (-1)*1 = -0.75 -> / 0.5 = -1.5
    assert torch.allclose(generator_loss(x_g, y_r, y_f, 1.0), torch.tensor([-1.5]))
    assert torch.allclose(generator_loss_alpha1(x_g, y_r, y_f), torch.tensor([-1.5]))


def test_alpha1_form_equals_general_form():
    g = torch.Generator().manual_seed(0)
    x_g, y_r, y_f = (torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(generator_loss(x_g, y_r, y_f, 1.0), generator_loss_alpha1(x_g, y_r, y_f),
                               rtol=1e-6, atol=1e-6)  # float32 accumulation inside both


def test_omega_no_gradient_and_clamp():
    x_g = torch.zeros(2, 4, requires_grad=True)
    y_r = torch.zeros(2, 4, requires_grad=True)
    om = sid_omega(x_g, y_r)
    assert not om.requires_grad
    assert torch.equal(om, torch.full((2,), OMEGA_MIN))


def test_gradients_reach_x_g_through_both_scores():
    """x_g receives its direct gradient plus the gradients through y_real and y_fake."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 8, generator=g, requires_grad=True)
    W_r = torch.randn(8, 8, generator=g) * 0.3
    W_f = torch.randn(8, 8, generator=g) * 0.3
    x_g = 2 * z
    y_r = x_g @ W_r
    y_f = x_g @ W_f
    generator_loss(x_g, y_r, y_f, 1.2).sum().backward()
    full = z.grad.clone()
    # with y_real and y_fake detached, the gradient changes: both paths contribute
    for detach_r, detach_f in ((True, False), (False, True)):
        z.grad = None
        x_g = 2 * z
        yr = (x_g @ W_r).detach() if detach_r else x_g @ W_r
        yf = (x_g @ W_f).detach() if detach_f else x_g @ W_f
        generator_loss(x_g, yr, yf, 1.2).sum().backward()
        assert not torch.allclose(z.grad, full)
    # explicit chain rule: dL/dz = 2 (dL/dx_g + dL/dy_r W_r^T + dL/dy_f W_f^T)
    x_g = (2 * z).detach().requires_grad_(True)
    y_r = (x_g.detach() @ W_r).requires_grad_(True)
    y_f = (x_g.detach() @ W_f).requires_grad_(True)
    generator_loss(x_g, y_r, y_f, 1.2).sum().backward()
    manual = 2 * (x_g.grad + y_r.grad @ W_r.T + y_f.grad @ W_f.T)
    torch.testing.assert_close(manual, full, rtol=1e-5, atol=1e-5)


def test_fake_score_loss_and_masking():
    pred = torch.tensor([[1.0, 2.0], [0.0, float("nan")]])
    target = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    per = fake_score_loss(pred, target)
    assert per[0] == 5.0 and torch.isnan(per[1])
    loss, finite = masked_weighted_sum(per, torch.tensor([2.0, 1.0]), denom=4.0)
    assert loss.item() == 2.5 and finite.tolist() == [True, False]
