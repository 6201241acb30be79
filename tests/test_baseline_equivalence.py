"""The fast step and the reference-structured baseline (bench/baseline_step.py) compute the same
losses and gradients from the same draws, on the tiny SD pipeline (fp32, CPU).

Both sides get the SAME z / noise / t / prompts explicitly: diffusers' scheduler.step() in the
baseline draws (and discards) variance noise from the global RNG, so the two cannot share a
generator stream; the fast step's closed-form x0 draws nothing.

Tolerances (fp32): losses rtol 1e-4 — the fast step runs remain+forget and cond+uncond as one
batch, uses float64-built a_t/b_t tables (diffusers: float32 cumprod), computes x0 by division in
a different association, and sums per row then over rows; each is rounding-level (~1e-6 relative),
and the SiD loss is a difference of near-equal terms, so a few ulps of its inputs become ~1e-5 of it.
Gradients: max abs error <= 1e-3 of the largest gradient entry, per tensor, for the same reasons.
"""
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import sd_parts  # noqa: E402
from baseline_step import BaselineSFD, BranchDraws  # noqa: E402
from sfd_fast.step import PhaseDraws, STAT_SUM  # noqa: E402
from sfd_fast.conditions import PhaseConditions  # noqa: E402
from tests.helpers import fake_phase, gen_phase

B = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sfd_fast.sd.tiny import build_tiny_sd

    d = build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))
    sd = sd_parts.build_tiny(d)
    # non-trivial fake score / generator: perturb the copies so the three nets differ
    cfg = sd_parts.sd_config(B, "fp32")
    tr = sd_parts.build_fast_trainer(sd, cfg, "cpu", tmp_path_factory.mktemp("run"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for net in (tr.fake_score.net, tr.generator.net):
            for p in net.parameters():
                p.add_(1e-2 * torch.randn(p.shape, generator=g))
    base = BaselineSFD(sd, B, "cpu")
    base.fake_score.load_state_dict(tr.fake_score.net.state_dict())
    base.G.load_state_dict(tr.generator.net.state_dict())
    return sd, tr, base


def _draws(sd, seed):
    """Explicit draws for both sides: prompt indices, z, noise, t for remain then forget rows."""
    g = torch.Generator().manual_seed(seed)
    ir = torch.randint(0, len(sd.remain_prompts), (B,), generator=g)
    jf = torch.randint(0, len(sd.forget_prompts), (B,), generator=g)
    shape = (2 * B, *sd.latent_shape)
    z, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.randint(20, 980, (2 * B,), generator=g)
    return ir, jf, z, noise, t


def _fast_draws(sd, task, ir, jf, z, noise, t):
    """The same rows through the product's text cache (sfd_fast.sd.text.TextEncoderCache)."""
    remain = [sd.remain_prompts[i] for i in ir.tolist()]
    forget = [sd.forget_prompts[j] for j in jf.tolist()]
    gen = task.cache.encode(remain + forget)
    teacher = task.cache.encode(remain + [sd_parts.override_of(p) for p in forget])
    uncond = task.cache.encode([""] * (2 * B))
    is_forget = torch.arange(2 * B) >= B
    cond = PhaseConditions(gen, gen, teacher, uncond, uncond, is_forget)
    return PhaseDraws(z, noise, t, cond, torch.ones(2 * B))


def _branches(sd, ir, jf, z, noise, t):
    remain = [sd.remain_prompts[i] for i in ir.tolist()]
    forget = [sd.forget_prompts[j] for j in jf.tolist()]
    return (BranchDraws(remain, remain, z[:B], noise[:B], t[:B]),
            BranchDraws(forget, [sd_parts.override_of(p) for p in forget], z[B:], noise[B:], t[B:]))


def _close_grads(params_a, params_b):
    n = 0
    for a, b in zip(params_a, params_b):
        if a.grad is None and b.grad is None:
            continue
        scale = max(a.grad.abs().max().item(), 1e-12)
        assert (a.grad - b.grad).abs().max().item() <= 1e-3 * scale
        n += 1
    assert n > 0


def test_fake_score_phase_matches_baseline(setup):
    sd, tr, base = setup
    ir, jf, z, noise, t = _draws(sd, 0)
    tr.fake_score.zero_grad(set_to_none=True)
    loss, stats = fake_phase(tr.generator, tr.fake_score, tr.schedule,
                                   _fast_draws(sd, tr.parts.task, ir, jf, z, noise, t), 4.5, B)
    loss.backward()
    base.fake_score.zero_grad(set_to_none=True)
    r, f = _branches(sd, ir, jf, z, noise, t)
    l_r, l_f = base.fake_score_round(r, 1.0), base.fake_score_round(f, 1.0)
    assert loss.item() == pytest.approx(l_r + l_f, rel=1e-4)
    assert stats[0, STAT_SUM].item() / B == pytest.approx(l_r, rel=1e-4)
    assert stats[1, STAT_SUM].item() / B == pytest.approx(l_f, rel=1e-4)
    _close_grads(list(tr.fake_score.net.parameters()), list(base.fake_score.parameters()))


def test_generator_phase_matches_baseline(setup):
    sd, tr, base = setup
    ir, jf, z, noise, t = _draws(sd, 1)
    tr.generator.zero_grad(set_to_none=True)
    tr.fake_score.zero_grad(set_to_none=True)
    loss, stats = gen_phase(tr.generator, tr.backend.fake_score_view, tr.teacher, tr.schedule,
                                  _fast_draws(sd, tr.parts.task, ir, jf, z, noise, t), 1.0, 4.5, 4.5, B)
    loss.backward()
    # FrozenView: no fake-score weight gradients from the generator phase
    assert all(p.grad is None for p in tr.fake_score.parameters())
    base.G.zero_grad(set_to_none=True)
    base.fake_score.eval().requires_grad_(False)  # as the reference's G phase
    r, f = _branches(sd, ir, jf, z, noise, t)
    l_r, l_f = base.generator_round(r, 1.0), base.generator_round(f, 1.0)
    base.fake_score.requires_grad_(True)
    assert loss.item() == pytest.approx(l_r + l_f, rel=1e-4)
    assert stats[0, STAT_SUM].item() / B == pytest.approx(l_r, rel=1e-4)
    assert stats[1, STAT_SUM].item() / B == pytest.approx(l_f, rel=1e-4)
    _close_grads(list(tr.generator.net.parameters()), list(base.G.parameters()))


def test_baseline_full_step_runs_and_is_finite(setup):
    sd, tr, base = setup
    out = base.train_step()
    assert set(out) == {"fake_score/remain", "fake_score/forget", "generator/remain", "generator/forget"}
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())


def test_bench_fast_trainer_runs_the_product_text_task(setup):
    """The benchmark's fast side is the product path: the SD family's TextForgetTask (issue #10)."""
    from sfd_fast.sd.text import TextEncoderCache, TextForgetTask

    sd, tr, _ = setup
    assert type(tr.parts.task) is TextForgetTask
    assert type(tr.parts.task.cache) is TextEncoderCache and tr.parts.task.use_cache
    assert not hasattr(sd_parts, "CachedTextTask")
