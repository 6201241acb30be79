"""The batched SFD step against separate remain and forget passes, and NaN robustness."""
import copy

import torch

from sfd_fast.denoisers import ClassCondDenoiser, FrozenView
from sfd_fast.generator import OneStepGenerator
from sfd_fast.digits.model import DigitsEpsMLP
from sfd_fast.schedules import VPSchedule
from sfd_fast.step import STAT_N, STAT_NONFINITE, PhaseDraws
from sfd_fast.conditions import ClassForgetTask
from tests.helpers import fake_phase, gen_phase


def _nets(seed=0):
    torch.manual_seed(seed)
    sched = lambda: VPSchedule.from_betas("linear", 1e-4, 0.02, 1000)
    base = DigitsEpsMLP(10, 32, 1)
    fake = ClassCondDenoiser(copy.deepcopy(base), sched(), 10)
    gen = OneStepGenerator(ClassCondDenoiser(copy.deepcopy(base), sched(), 10), 440)
    teacher = ClassCondDenoiser(base, sched(), 10).requires_grad_(False)
    # perturb the trained copies so the three networks differ (as during training)
    with torch.no_grad():
        for p in list(fake.parameters()) + list(gen.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    return teacher, fake, gen


def _draws(n_remain, n_forget, seed, remain_coef=1.0, forget_coef=0.5):
    task = ClassForgetTask(10, 0, "fixed", 1)
    g = torch.Generator().manual_seed(seed)
    cond = task.draw(n_remain, n_forget, g, "cpu", "generator")
    n = n_remain + n_forget
    z, noise = torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 1, 8, 8, generator=g)
    t = torch.randint(38, 712, (n,), generator=g)
    coef = torch.where(cond.is_forget, torch.tensor(forget_coef), torch.tensor(remain_coef))
    return PhaseDraws(z, noise, t, cond, coef)


def _slice(d: PhaseDraws, sl):
    c = d.cond
    cond = type(c)(c.generator_cond[sl], c.fake_cond[sl], c.teacher_cond[sl], c.fake_uncond[sl],
                   c.teacher_uncond[sl], c.is_forget[sl])
    return PhaseDraws(d.z[sl], d.noise[sl], d.t[sl], cond, d.coef[sl])


def _grads(module):
    return [p.grad.clone() for p in module.parameters()]


def test_override_conditions():
    d = _draws(5, 3, 0)
    assert d.cond.generator_cond[5:].eq(0).all() and d.cond.fake_cond[5:].eq(0).all()
    assert d.cond.teacher_cond[5:].eq(1).all()
    assert (d.cond.generator_cond[:5] != 0).all()
    assert torch.equal(d.cond.generator_cond[:5], d.cond.teacher_cond[:5])
    random_task = ClassForgetTask(10, 0, "random")
    c = random_task.draw(0, 2000, torch.Generator().manual_seed(0), "cpu", "generator")
    counts = torch.bincount(c.teacher_cond, minlength=10)
    assert counts[0] == 0 and (counts[1:] > 150).all()  # uniform over 9 classes: ~222 each


def test_batched_equals_separate_passes():
    """One batch of remain+forget rows == the reference's separate remain and forget passes.

    Tolerance 1e-5 relative: both compute the same per-row math; only the matmul blocking over a
    different batch size changes float32 rounding (per-row networks: LayerNorm, no BatchNorm)."""
    teacher, fake, gen = _nets()
    nr, nf, denom = 6, 4, 6.0
    d = _draws(nr, nf, 1)
    for phase in ("fake", "generator"):
        losses, grads = [], []
        for parts in ([slice(0, nr + nf)], [slice(0, nr), slice(nr, nr + nf)]):
            gen.zero_grad(set_to_none=True)
            fake.zero_grad(set_to_none=True)
            total = 0.0
            for sl in parts:
                dd = _slice(d, sl)
                if phase == "fake":
                    loss, _ = fake_phase(gen, fake, teacher.schedule, dd, 1.0, denom)
                else:
                    loss, _ = gen_phase(gen, FrozenView(fake), teacher, teacher.schedule, dd,
                                              1.2, 1.0, 1.0, denom)
                loss.backward()
                total = total + loss.detach()
            losses.append(total)
            grads.append(_grads(fake if phase == "fake" else gen))
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_generator_phase_accumulates_no_fake_score_grads():
    teacher, fake, gen = _nets()
    d = _draws(4, 4, 2)
    loss, _ = gen_phase(gen, FrozenView(fake), teacher, teacher.schedule, d, 1.2, 1.0, 1.0, 4.0)
    loss.backward()
    assert all(p.grad is None for p in fake.parameters())
    assert all(p.grad is not None for p in gen.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_cfg_batched_equals_two_calls():
    teacher, _, _ = _nets()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 1, 8, 8, generator=g)
    t = torch.randint(38, 712, (5,), generator=g)
    c = torch.randint(0, 10, (5,), generator=g)
    u = torch.full((5,), 10)
    kappa = 4.5
    got = teacher.x0(x, t, c, u, kappa)
    x0c, x0u = teacher.x0(x, t, c), teacher.x0(x, t, u)
    torch.testing.assert_close(got, x0u + kappa * (x0c - x0u), rtol=1e-5, atol=1e-5)


def test_nan_row_is_masked_in_stats_and_loss():
    teacher, fake, gen = _nets()
    d = _draws(4, 4, 3)
    d.z[2] = float("nan")
    loss, stats = gen_phase(gen, FrozenView(fake), teacher, teacher.schedule, d, 1.2, 1.0, 1.0, 4.0)
    assert torch.isfinite(loss)
    assert stats[:, STAT_NONFINITE].tolist() == [1.0, 0.0]  # one non-finite row, a remain one
    assert stats[0, STAT_N].item() == 3.0 and stats[1, STAT_N].item() == 4.0  # finite remain / forget rows
