"""The worst-case forgetting attacks (sfd_fast/evaluation/attacks/): budgets hold at every iterate,
step counts are what was asked, results are a function of the seed, references are the right
subjects, and the bookkeeping (gap, headline reference) is right. Tiny random networks, CPU, seconds."""
import math

import pytest
import torch
from torch import nn

from sfd_fast.denoisers import ClassCondDenoiser
from sfd_fast.digits.model import DigitsEpsMLP
from sfd_fast.evaluation.attacks import classes
from sfd_fast.evaluation.attacks.classes import AttackParts, run_class_attacks, subjects, summarise_rates
from sfd_fast.evaluation.attacks.config import AttacksConfig
from sfd_fast.evaluation.attacks.search import embedding_search, noise_search, project_shell_chord
from sfd_fast.generator import OneStepGenerator
from sfd_fast.schedules import VPSchedule

# float32 on vectors of a few hundred entries: norms agree to ~1e-6 relative; 1e-5 leaves margin
REL = 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(1, 1, 8, 8), (5, 3, 7, 5), (2, 64)])
@pytest.mark.parametrize("radius", [0.05, 0.5, 1.9, 2.0])
def test_shell_chord_projection_holds_both_constraints(seed, shape, radius):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(shape, generator=g)
    z = z0 + 3.0 * torch.randn(shape, generator=g)           # far off the shell and the ball
    p = project_shell_chord(z, z0, radius)
    n0 = z0.flatten(1).norm(dim=1)
    assert torch.allclose(p.flatten(1).norm(dim=1), n0, rtol=REL)
    assert ((p - z0).flatten(1).norm(dim=1) <= radius * n0 * (1 + REL)).all()
    # a point already inside the bound is only put back on the shell (same direction)
    near = z0 * 1.3 + 1e-3 * torch.randn(shape, generator=g)
    q = project_shell_chord(near, z0, radius)
    assert torch.allclose(q, near / near.flatten(1).norm(dim=1).view(-1, *[1] * (len(shape) - 1))
                          * n0.view(-1, *[1] * (len(shape) - 1)), rtol=1e-4, atol=1e-5)


def test_noise_search_budget_and_step_count():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(6, 1, 8, 8, generator=g)
    w = torch.randn(64, generator=g)
    seen = []

    def objective(z):
        seen.append(z.detach().clone())
        return z.flatten(1) @ w                                  # ascent pushes along w without limit
    z = noise_search(objective, z0, steps=7, step_size=0.3, radius=0.4)
    assert len(seen) == 7
    n0 = z0.flatten(1).norm(dim=1)
    for it in seen[1:] + [z]:                                    # every iterate after a step
        assert torch.allclose(it.flatten(1).norm(dim=1), n0, rtol=REL)
        assert ((it - z0).flatten(1).norm(dim=1) <= 0.4 * n0 * (1 + REL)).all()
    # the objective rose, and the bound is active (a linear objective runs to the boundary)
    assert (z.flatten(1) @ w > z0.flatten(1) @ w).all()
    assert torch.allclose((z - z0).flatten(1).norm(dim=1), 0.4 * n0, rtol=1e-4)


def test_embedding_search_budget_and_step_count():
    e0 = torch.tensor([1.0, -2.0, 0.5])
    calls = []

    def objective(e):
        calls.append(1)
        return (e * torch.tensor([1.0, 1.0, 1.0])).sum()
    e = embedding_search(objective, e0, steps=9, step_size_abs=0.1, radius_abs=0.25)
    assert len(calls) == 9
    assert float((e - e0).norm()) <= 0.25 * (1 + REL)
    assert float((e - e0).norm()) == pytest.approx(0.25, rel=1e-5)   # 9 x 0.1 > 0.25: the ball binds


# ------------------------------------------------------------------ tiny class-family parts

class PixelJudge(nn.Module):
    """Logits that favour class `cls` when the mean pixel is above `threshold` (deterministic)."""

    def __init__(self, cls=0, threshold=0.0, num_classes=10):
        super().__init__()
        self.cls, self.threshold, self.num_classes = cls, threshold, num_classes

    def forward(self, x):
        m = x.flatten(1).mean(1)
        logits = torch.zeros(x.shape[0], self.num_classes)
        logits[:, self.cls] = 10 * (m - self.threshold)
        return logits


def tiny_generator(seed=0, hidden=32):
    torch.manual_seed(seed)
    sch = VPSchedule.from_betas("linear", 1e-4, 0.02, 1000, "epsilon")
    return OneStepGenerator(ClassCondDenoiser(DigitsEpsMLP(10, hidden, 1), sch, 10), 440).requires_grad_(False)


def tiny_parts(judge=None, refs=("teacher", "retrain")):
    torch.manual_seed(5)
    surrogate = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    references = {name: tiny_generator(seed=10 + i) for i, name in enumerate(refs)}

    def teacher_samples(labels, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.rand((labels.shape[0], 1, 8, 8), generator=g) * 2 - 1
    return AttackParts(generator=tiny_generator(), references=references, judge=judge or PixelJudge(),
                       surrogate=surrogate.requires_grad_(False), sample_shape=(1, 8, 8), num_classes=10,
                       forget=[0], overrides=[1], teacher_samples=teacher_samples)


def small_cfg(**kw) -> AttacksConfig:
    a = AttacksConfig(samples=16, other_labels=2)
    a.noise.steps, a.condition.steps, a.condition.fit_samples = 3, 3, 8
    a.relearn.max_steps, a.relearn.check_every, a.relearn.batch_size = 6, 2, 8
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def test_references_are_the_override_then_other_labels_then_models():
    parts = tiny_parts()
    names = [(n, label) for n, _, label in subjects(parts, 0, other_labels=2)]
    assert names == [("attack", 0), ("label 1 (override)", 1), ("label 2", 2), ("label 3", 3),
                     ("teacher", 0), ("retrain", 0)]
    gens = {n: g for n, g, _ in subjects(parts, 0, 2)}
    assert gens["attack"] is parts.generator and gens["label 2"] is parts.generator
    assert gens["retrain"] is parts.references["retrain"]
    # random override: no override label; the remaining labels in order, never a forgotten one
    parts.overrides, parts.forget = [], [0, 4]
    assert [label for n, _, label in subjects(parts, 4, 3) if n.startswith("label")] == [1, 2, 3]


def test_headline_reference_and_gap():
    rows = {"attack": {"rate": 0.9}, "label 1 (override)": {"rate": 0.6}, "label 2": {"rate": 0.7},
            "retrain": {"rate": 0.8}, "teacher": {"rate": 1.0}}
    s = summarise_rates(rows, 100)
    assert s["reference"] == "retrain" and s["gap"] == pytest.approx(0.1)
    assert s["gap_se"] == pytest.approx(math.sqrt((0.9 * 0.1 + 0.8 * 0.2) / 100))
    assert s["max_label_rate"] == 0.7
    del rows["retrain"]
    s = summarise_rates(rows, 100)
    assert s["reference"] == "label 1 (override)" and s["gap"] == pytest.approx(0.3)


@pytest.mark.parametrize("attack", ["noise", "condition", "relearn"])
def test_attacks_are_deterministic_by_seed(attack):
    parts = tiny_parts()
    fn = classes.ATTACKS[attack]
    cfg = getattr(small_cfg(), attack)
    a = fn(parts, parts.generator, 0, 0, cfg, 16, seed=3)
    b = fn(parts, parts.generator, 0, 0, cfg, 16, seed=3)
    assert a == b
    # the seed reaches the draws: another seed gives other noises (the surrogate scores differ)
    z3, z4 = classes._noises(parts, 4, 3, "cpu"), classes._noises(parts, 4, 4, "cpu")
    assert not torch.equal(z3, z4)


def test_attacks_leave_the_attacked_generator_unchanged():
    parts = tiny_parts()
    before = {k: v.clone() for k, v in parts.generator.state_dict().items()}
    cfg = small_cfg()
    for name, fn in classes.ATTACKS.items():
        fn(parts, parts.generator, 0, 0, getattr(cfg, name), 8, seed=0)
    table = classes.class_embedding(parts.generator.net, 10)
    assert not table._forward_hooks                    # the condition attack removed its hook
    for k, v in parts.generator.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_condition_attack_distance_within_budget():
    parts = tiny_parts()
    cfg = small_cfg().condition
    cfg.radius, cfg.steps, cfg.step_size = 0.2, 10, 0.1
    r = classes.condition_attack(parts, parts.generator, 1, 0, cfg, 8, seed=0)
    assert r["distance"] <= 0.2 * (1 + REL)
    assert r["distance"] == pytest.approx(0.2, rel=1e-4)    # 10 x 0.1 > 0.2: the budget binds


def test_relearn_step_counting():
    # a judge that always sees the forgotten class: UA 0 at the first check -> 0 steps, no update
    parts = tiny_parts(judge=PixelJudge(threshold=-10.0))
    cfg = small_cfg().relearn
    r = classes.relearn_attack(parts, parts.generator, 0, 0, cfg, 8, seed=0)
    assert r["steps"] == 0 and r["ua_curve"] == [[0, 0.0]]
    # a judge that never does: not within the budget, checked at 0, 2, 4, 6
    parts = tiny_parts(judge=PixelJudge(threshold=10.0))
    r = classes.relearn_attack(parts, parts.generator, 0, 0, cfg, 8, seed=0)
    assert r["steps"] is None and [s for s, _ in r["ua_curve"]] == [0, 2, 4, 6]
    assert all(ua == 1.0 for _, ua in r["ua_curve"])


def test_relearning_brings_a_class_back_on_a_learnable_judge():
    """The relearning loop really trains: bright teacher images and a judge that calls bright
    images 0 -> UA falls below 0.5 within the budget from a generator that draws grey."""
    parts = tiny_parts(judge=PixelJudge(threshold=0.5))
    parts.generator = tiny_generator(hidden=128)   # wider than the 64 pixels: it can draw any image
    parts.teacher_samples = lambda labels, seed: torch.full((labels.shape[0], 1, 8, 8), 0.9)
    cfg = small_cfg().relearn
    cfg.max_steps, cfg.check_every, cfg.lr = 200, 10, 3e-3
    r = classes.relearn_attack(parts, parts.generator, 0, 0, cfg, 16, seed=0)
    assert r["ua_curve"][0][1] > 0.5
    assert r["steps"] is not None and 0 < r["steps"] <= 200


def test_run_class_attacks_reports_every_attack_and_reference():
    parts = tiny_parts()
    out = run_class_attacks(parts, small_cfg())
    per = out["per_class"]["0"]
    assert set(per) == {"noise", "condition", "relearn"}
    for name in ("noise", "condition"):
        assert set(per[name]["references"]) == {"label 1 (override)", "label 2", "label 3", "teacher", "retrain"}
        assert per[name]["reference"] == "retrain"
        assert per[name]["gap"] == pytest.approx(per[name]["rate"] - per[name]["reference_rate"])
    assert set(per["relearn"]["references"]) == {"label 1 (override)", "teacher", "retrain"}
    assert out["budgets"]["noise"]["radius"] == 0.3
