"""Small builders shared by the CPU tests."""
import json
from pathlib import Path

import torch

from sfd_fast.checkpoint import save_safetensors_atomic
from sfd_fast.digits.model import DigitsEpsMLP


def random_digits_teacher(path: Path, hidden=32, blocks=1, seed=0) -> Path:
    torch.manual_seed(seed)
    net = DigitsEpsMLP(10, hidden, blocks)
    save_safetensors_atomic(net.state_dict(), Path(path))
    return Path(path)


def tiny_digits_config(tmp_path: Path, **sections) -> Path:
    """A digits config that trains in well under a second per step (random teacher, no eval)."""
    teacher = random_digits_teacher(tmp_path / "teacher.safetensors")
    cfg = {
        "run": {"name": "tiny", "root": str(tmp_path / "runs"), "seed": 3, "device": "cpu"},
        "model": {"kind": "digits", "teacher": str(teacher), "hidden": 32, "blocks": 1},
        "sfd": {"alpha": 1.2, "t_init": 440, "t_min": 38, "t_max": 712, "forget_class": 0,
                "override_class": 1},
        "optim": {"fake_score": {"lr": 1e-3}, "generator": {"lr": 1e-3}},
        "train": {"batch_size": 8, "total_steps": 6, "log_every": 2, "checkpoint_every": 3,
                  "sample_every": 3, "progress": False},
        "eval": {"enabled": False},
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path


def auto_cap_between(cfg_path, small: int, large: int, overrides=(), world: int = 1) -> float:
    """An engine.memory_limit_gib whose train.micro_batch="auto" budget fits `small` rows per rank but
    not `large`, from the same estimator the run uses (engine/memory_model.py) on the same seeded parts."""
    from sfd_fast.config import load_config
    from sfd_fast.engine.autobatch import HEADROOM
    from sfd_fast.engine.memory_model import micro_batch_estimator
    from sfd_fast.families import family, resolve
    cfg = load_config(cfg_path, list(overrides))
    torch.manual_seed(cfg.run.seed)
    parts = resolve(family(cfg.model.kind).build)(cfg)
    # as SFDTrainer holds the networks when it asks (its step 1): all in eval mode, the teacher frozen
    # (a frozen teacher saves no inputs for weight gradients: fewer activation bytes per row)
    parts.teacher.eval().requires_grad_(False)
    parts.fake_score.eval()
    parts.generator.eval()
    need = micro_batch_estimator(cfg, parts, torch.device("cpu"), world)
    lo, hi = need(small)["need"], need(large)["need"]
    assert lo < hi
    return (lo + hi) / 2 / HEADROOM / 2 ** 30


def fake_phase(generator, fake_score, schedule, draws, guidance, denom, n_targets=1):
    """step.fake_score_phase called with explicit pieces (tests), through its PhaseContext."""
    from sfd_fast.step import PhaseContext, fake_score_phase
    ctx = PhaseContext(generator, fake_score, None, None, schedule, 0.0, guidance, 1.0, 1.0, denom,
                       n_targets=n_targets)
    return fake_score_phase(ctx, draws)


def gen_phase(generator, fake_score_view, teacher, schedule, draws, alpha, guidance_fake, guidance_real, denom,
              loss_fn=None, n_targets=1):
    """step.generator_phase called with explicit pieces (tests), through its PhaseContext."""
    from sfd_fast.losses import generator_loss
    from sfd_fast.step import PhaseContext, generator_phase
    ctx = PhaseContext(generator, None, fake_score_view, teacher, schedule, alpha, 1.0, guidance_fake,
                       guidance_real, denom, loss_fn or generator_loss, n_targets)
    return generator_phase(ctx, draws)
