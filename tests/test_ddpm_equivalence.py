"""The ddpm family through the fast step equals the reference loop's formulas
(bench/ddpm_baseline_step.py: separate remain / forget passes, (1-b).cumprod() per call,
x0 = xt/a_init - sigma_init*eps), from the same explicit draws, on a tiny network without dropout.

Tolerances (fp32), as tests/test_baseline_equivalence.py: losses rtol 1e-4 (the fast step batches
remain+forget, builds a_t/b_t in float64, and computes x0 in another association: rounding-level
differences, amplified in the SiD loss, a difference of near-equal terms); gradients max abs error
<= 1e-3 of the largest entry per tensor, for the same reasons.
"""
import sys
from pathlib import Path

import pytest
import torch

from sfd_fast.conditions import PhaseConditions
from sfd_fast.ddpm.model import DDPMArch, DDPMUNet
from sfd_fast.denoisers import ClassCondDenoiser, FrozenView
from sfd_fast.generator import OneStepGenerator
from sfd_fast.losses import generator_loss
from sfd_fast.schedules import VPSchedule
from sfd_fast.step import PhaseDraws

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
from ddpm_baseline_step import BaselineDDPMSFD  # noqa: E402
from tests.helpers import fake_phase, gen_phase

B, SHAPE, COEFS, FORGET, OVERRIDE = 3, (3, 16, 16), (1.0, 0.01, 1.0, 0.01), 0, 1


def _net(seed):
    torch.manual_seed(seed)
    return DDPMUNet(DDPMArch(image_size=16, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8],
                             dropout=0.0))


@pytest.fixture(scope="module")
def nets():
    teacher, fake, gen = _net(0), _net(1), _net(2)
    sched = VPSchedule.from_betas()
    fast = dict(teacher=ClassCondDenoiser(teacher, sched, 10).requires_grad_(False),
                fake=ClassCondDenoiser(fake, sched, 10),
                gen=OneStepGenerator(ClassCondDenoiser(gen, sched, 10), 440), sched=sched)
    base = BaselineDDPMSFD(teacher, B, "cpu", SHAPE, coefs=COEFS, forget=FORGET, override=OVERRIDE)
    base.sg_model.load_state_dict(fake.state_dict())
    base.g_model.load_state_dict(gen.state_dict())
    return fast, base


def _draws():
    g = torch.Generator().manual_seed(7)
    c = torch.randint(1, 10, (B,), generator=g)
    z, e = torch.randn((2 * B, *SHAPE), generator=g), torch.randn((2 * B, *SHAPE), generator=g)
    t = torch.randint(38, 712, (2 * B,), generator=g)
    forget = torch.full((B,), FORGET)
    gen_c = torch.cat([c, forget])
    cond = PhaseConditions(gen_c, gen_c, torch.cat([c, torch.full((B,), OVERRIDE)]), None, None,
                           torch.arange(2 * B) >= B)
    coef = lambda r, f: torch.where(cond.is_forget, torch.tensor(f), torch.tensor(r))  # noqa: E731
    return c, forget, z, e, t, cond, coef


def _close_grads(fast_net, base_net):
    pairs = list(zip(fast_net.named_parameters(), base_net.parameters()))
    top = max(q.grad.abs().max().item() for _, q in pairs)
    bad = []
    for (name, p), q in pairs:
        err = (p.grad - q.grad).abs().max().item()
        # + 1e-6 of the network's largest entry: tensors whose exact gradient is 0 (attention key
        # biases; biases right before a one-channel-per-group GroupNorm) hold only rounding noise,
        # measured ~1e-8 of the largest entry
        if err > 1e-3 * q.grad.abs().max().item() + 1e-6 * top:
            bad.append((name, err, q.grad.abs().max().item()))
    assert not bad, f"largest gradient entry {top}: {bad[:3]}"


def test_fake_score_phase_matches_reference(nets):
    fast, base = nets
    c, forget, z, e, t, cond, coef = _draws()
    fast["fake"].zero_grad(set_to_none=True)
    loss, _ = fake_phase(fast["gen"], fast["fake"], fast["sched"], PhaseDraws(z, e, t, cond, coef(1.0, 0.01)),
                               1.0, B)
    loss.backward()
    base.sg_model.zero_grad(set_to_none=True)
    total = 0.0
    for rows, labels, k in ((slice(0, B), c, COEFS[0]), (slice(B, 2 * B), forget, COEFS[1])):
        with torch.no_grad():
            x0 = base.run_generator(z[rows], labels, base.g_model.eval(), z=z[rows])
        part = base.sg_loss(x0, t[rows], labels, e[rows]) * k
        part.backward()
        total += part.item()
    assert loss.item() == pytest.approx(total, rel=1e-4)
    _close_grads(fast["fake"].net, base.sg_model)


def test_generator_phase_matches_reference(nets):
    fast, base = nets
    c, forget, z, e, t, cond, coef = _draws()
    fast["gen"].zero_grad(set_to_none=True)
    loss, _ = gen_phase(fast["gen"], FrozenView(fast["fake"]), fast["teacher"], fast["sched"],
                              PhaseDraws(z, e, t, cond, coef(1.0, 0.01)), 1.2, 1.0, 1.0, B, generator_loss)
    loss.backward()
    base.sg_model.eval().requires_grad_(False)
    base.g_model.zero_grad(set_to_none=True)
    total = 0.0
    override = torch.full((B,), OVERRIDE)
    for rows, g_c, p_c, k in ((slice(0, B), c, c, COEFS[2]), (slice(B, 2 * B), forget, override, COEFS[3])):
        x0 = base.run_generator(z[rows], g_c, base.g_model, z=z[rows])
        part = base.g_loss(x0, t[rows], p_c, g_c, e[rows]) * k
        part.backward()
        total += part.item()
    assert loss.item() == pytest.approx(total, rel=1e-4)
    _close_grads(fast["gen"].net, base.g_model)
