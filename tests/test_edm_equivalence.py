"""One SFD step of the edm family (the engine's step.py, unchanged) against SiD's EDM loss
(compat.edm.SID_EDMLoss, the drop-in tested against SiD's sid_loss.py in tests/test_compat_edm.py).

SiD draws continuous sigmas; the engine draws grid indices t. The test replays SiD's draws (same
seed) through the engine with a schedule whose t = 0..n-1 are exactly SiD's sigmas
(SigmaGridSchedule(sigmas=...)), so both compute on the same noisy points:
  generator loss: identical per row (SiD's per-element tensor summed over C, H, W);
  fake-score loss: the engine trains the epsilon-MSE (1/sigma^2 |D - y|^2, losses.fake_score_weight),
  SiD weights the same error by lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2: per row
  SiD = (sigma^2 + sd^2) / sd^2 * engine. With those per-row coefficients the totals agree.
Tolerances (fp32): losses rtol 1e-4 (the engine forms x = (a x0 + b n) / a instead of x0 + sigma n:
rounding-level input differences, amplified in the SiD loss, a difference of near-equal terms);
gradients max abs error <= 1e-3 of the largest entry per tensor, for the same reason (as
tests/test_ddpm_equivalence.py). Dropout off (eval) so both sides run the same networks.
"""
import math

import pytest
import torch

from sfd_fast.compat.edm import SID_EDMLoss
from sfd_fast.conditions import PhaseConditions
from sfd_fast.denoisers import FrozenView
from sfd_fast.edm.build import set_dropout
from sfd_fast.edm.denoiser import EDMDenoiser, SigmaGridSchedule, SigmaOneStepGenerator
from sfd_fast.schedules import edm_sigmas_from_u
from sfd_fast.step import PhaseDraws
from tests.edm_helpers import tiny_vp
from tests.helpers import fake_phase, gen_phase

N, SHAPE, SIGMA_INIT, SD = 5, (3, 8, 8), 2.5, 0.5


def _nets(seed):
    nets = [tiny_vp(seed=seed + i)[0] for i in range(3)]
    for n in nets:
        set_dropout(n, 0.0)
        n.eval().requires_grad_(True)
    return nets


def _grads_close(a, b):
    for (k, ga), gb in zip(a.items(), b.values()):
        err = (ga - gb).abs().max().item()
        assert err <= 1e-3 * gb.abs().max().item() + 1e-12, (k, err)


def _cond(labels):
    return PhaseConditions(labels, labels, labels, None, None, torch.zeros(N, dtype=torch.bool))


@pytest.mark.parametrize("seed", [0, 1])
def test_generator_phase_matches_sid_generator_loss(seed):
    teacher, fake, gen = _nets(10 * seed)
    g = torch.Generator().manual_seed(seed)
    z, labels = torch.randn((N, *SHAPE), generator=g), torch.randint(0, 10, (N,), generator=g)
    onehot = torch.nn.functional.one_hot(labels, 10).float()
    # SiD: G(init_sigma z, init_sigma, labels, augment_labels=0), then generator_loss (its own draws)
    x_g = gen(SIGMA_INIT * z, torch.full((N, 1, 1, 1), SIGMA_INIT), onehot, augment_labels=torch.zeros(N, 9))
    torch.manual_seed(100 + seed)
    sid = SID_EDMLoss().generator_loss(teacher.requires_grad_(False), fake, x_g, onehot, alpha=1.2, tmax=800)
    sid_total = sid.sum()
    sid_grads = dict(zip(dict(gen.named_parameters()), torch.autograd.grad(sid_total, list(gen.parameters()))))
    torch.manual_seed(100 + seed)            # replay SiD's draws
    u = torch.rand([N, 1, 1, 1]) * 0.8
    noise = torch.randn_like(x_g)
    sched = SigmaGridSchedule(sigmas=edm_sigmas_from_u(u.double()))
    # the engine: its generator at sigma_init, its generator phase on those sigmas (t = 0..N-1)
    generator = SigmaOneStepGenerator(EDMDenoiser(gen, sched, 10), SIGMA_INIT)
    fake_den, teacher_den = EDMDenoiser(fake, sched, 10), EDMDenoiser(teacher, sched, 10)
    torch.testing.assert_close(generator(z, labels), x_g, rtol=0, atol=0)    # SiD's generator exactly
    draws = PhaseDraws(z, noise, torch.arange(N), _cond(labels), torch.ones(N))
    loss, _ = gen_phase(generator, FrozenView(fake_den), teacher_den, sched, draws, 1.2, 1.0, 1.0, 1.0)
    assert loss.item() == pytest.approx(sid_total.item(), rel=1e-4)
    # (map_augment is unused without augment labels: its gradient is 0, as SiD's with all-zero labels)
    grads = torch.autograd.grad(loss, list(gen.parameters()), allow_unused=True)
    ours = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(gen.named_parameters(), grads)}
    _grads_close(ours, sid_grads)
    assert not any(p.grad is not None for p in fake.parameters())           # input-only through the fake score


@pytest.mark.parametrize("seed", [0, 1])
def test_fake_score_phase_matches_sid_loss_up_to_its_weighting(seed):
    teacher, fake, gen = _nets(10 * seed + 3)
    g = torch.Generator().manual_seed(seed)
    z, labels = torch.randn((N, *SHAPE), generator=g), torch.randint(0, 10, (N,), generator=g)
    onehot = torch.nn.functional.one_hot(labels, 10).float()
    with torch.no_grad():
        x_g = gen(SIGMA_INIT * z, torch.full((N,), SIGMA_INIT), onehot)
    torch.manual_seed(200 + seed)
    sid = SID_EDMLoss()(fake, x_g, onehot)
    sid_total = sid.sum()
    sid_grads = {k: torch.zeros_like(p) if g is None else g for (k, p), g in
                 zip(fake.named_parameters(), torch.autograd.grad(sid_total, list(fake.parameters()), allow_unused=True))}
    torch.manual_seed(200 + seed)            # replay: sigma = exp(N(-1.2, 1.2^2)), then the noise
    sigma = (torch.randn([N, 1, 1, 1]) * 1.2 - 1.2).exp()
    noise = torch.randn_like(x_g)
    sched = SigmaGridSchedule(sigmas=sigma.double())
    generator = SigmaOneStepGenerator(EDMDenoiser(gen, sched, 10), SIGMA_INIT)
    s2 = sigma.flatten().double() ** 2
    coef = ((s2 + SD ** 2) / SD ** 2).float()          # lambda(sigma) sigma^2: SiD's weight over the engine's
    draws = PhaseDraws(z, noise, torch.arange(N), _cond(labels), coef)
    loss, _ = fake_phase(generator, EDMDenoiser(fake, sched, 10), sched, draws, 1.0, 1.0)
    assert loss.item() == pytest.approx(sid_total.item(), rel=1e-4)
    grads = torch.autograd.grad(loss, list(fake.parameters()), allow_unused=True)
    ours = {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(fake.named_parameters(), grads)}
    _grads_close(ours, sid_grads)


def test_sigma_grid_is_sids_generator_loss_ramp():
    s = SigmaGridSchedule()
    assert s.num_timesteps == 1000 and s.prediction == "sample"
    assert float(s.sigma64[0]) == pytest.approx(0.002, rel=1e-12)
    # t = 800 is SiD's u = tmax / 1000 = 0.8: (80^(1/7) + 0.2 (0.002^(1/7) - 80^(1/7)))^7
    hi, lo = 80 ** (1 / 7), 0.002 ** (1 / 7)
    assert float(s.sigma64[800]) == pytest.approx((hi + 0.2 * (lo - hi)) ** 7, rel=1e-12)
    assert bool((s.sigma64[1:] > s.sigma64[:-1]).all())
    a, b = s.a_table.double(), s.b_table.double()
    torch.testing.assert_close(a ** 2 + b ** 2, torch.ones(1000, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(b / a, s.sigma64, rtol=1e-6, atol=0)


def test_dropout_only_in_a_networks_own_update():
    net, _ = tiny_vp(seed=4)
    den = EDMDenoiser(net.eval(), SigmaGridSchedule(), 10)
    den.update_dropout = True
    x, t, c = torch.randn(3, *SHAPE), torch.tensor([100, 400, 700]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        ref = den.x0(x, t, c)
        assert torch.equal(den.x0(x, t, c), ref)              # sampling under no_grad: no dropout
    out1, out2 = den.x0(x, t, c), den.x0(x, t, c)              # its own update: dropout on (p 0.13)
    assert not torch.equal(out1, out2) and not torch.equal(out1, ref)
    assert torch.equal(FrozenView(den).x0(x, t, c), ref)      # detached weights (generator update): off
    net.requires_grad_(False)
    assert torch.equal(den.x0(x, t, c), ref)                  # frozen teacher: off


def test_null_class_is_the_zero_label_row():
    net, _ = tiny_vp(seed=6)
    den = EDMDenoiser(net.eval(), SigmaGridSchedule(), 10)
    x, t = torch.randn(2, *SHAPE), torch.tensor([300, 300])
    with torch.no_grad():
        null = den.x0(x, t, den.null_condition(2, "cpu"))
        a = den.schedule.a_table[300]
        torch.testing.assert_close(null, net(x / a, den.schedule.sigma_table[t], None), rtol=0, atol=0)
    assert math.isfinite(float(null.abs().max()))


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of N(0, I) data, D(x; sigma) = x / (1 + sigma^2), with a VP network's range."""
    sigma_min, sigma_max = 0.001, 152.0

    def forward(self, x, sigma, labels=None):
        s = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        return x.to(torch.float32) / (1 + s ** 2)


def test_heun_sampler_follows_edm():
    from sfd_fast.edm.sample import heun_sample, heun_sigmas
    sig = heun_sigmas(18, GaussianDenoiser.sigma_min, GaussianDenoiser.sigma_max)
    hi, lo = 80 ** (1 / 7), 0.002 ** (1 / 7)     # EDM's range: max(0.002, net min), min(80, net max)
    assert len(sig) == 19 and float(sig[-1]) == 0 and float(sig[0]) == pytest.approx(80, rel=1e-12)
    assert float(sig[17]) == pytest.approx(0.002, rel=1e-12)
    assert float(sig[9]) == pytest.approx((hi + 9 / 17 * (lo - hi)) ** 7, rel=1e-12)
    # EDM's edm_sampler loop restated literally (S_churn 0: t_hat = t_cur, x_hat = x_cur), float64
    net = GaussianDenoiser()
    z = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    x_next = z.to(torch.float64) * sig[0]
    for i, (t_cur, t_next) in enumerate(zip(sig[:-1], sig[1:])):
        x_hat, t_hat = x_next, t_cur
        d_cur = (x_hat - net(x_hat, t_hat.reshape(1)).to(torch.float64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < 17:
            d_prime = (x_next - net(x_next, t_next.reshape(1)).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    torch.testing.assert_close(heun_sample(net, z, None, 18), x_next.float(), rtol=1e-6, atol=1e-6)
    # and it solves the probability-flow ODE of N(0, I) data, x(0) = x(sigma_0) / sqrt(1 + sigma_0^2),
    # at second order: 2.8x the steps cut the error by more than 5x
    exact = z * 80 / math.sqrt(1 + 80 ** 2)
    err = {n: (heun_sample(net, z, None, n) - exact).abs().max().item() for n in (18, 50)}
    assert err[50] < err[18] / 5 and err[18] < 0.1 * exact.abs().max().item()
