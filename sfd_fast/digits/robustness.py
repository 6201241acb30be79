"""What the attacks (sfd_fast/evaluation/attacks/) need from a digits run.

- judge: the evaluation classifier (pretrain.get_digits_classifier), which decides every verdict;
- surrogate: a second classifier with another seed and another architecture (surrogate.py), cached
  like the classifier, whose gradients guide the searches, so that an adversarial example of the
  judge alone does not count as bringing the class back;
- references: the teacher-initialised generator (the upper bound) and the "retrain" generator: a
  teacher pretrained without the forgotten classes, distilled with the run's own recipe, cached
  under <run.root>/cache/ (retrain.py);
- teacher samples of the forgotten class (50-step DDIM) for the relearning attack.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..checkpoint import generator_weights_file
from ..conditions import forget_targets
from ..denoisers import ClassCondDenoiser
from ..generator import OneStepGenerator
from .pretrain import get_digits_classifier
from .surrogate import get_surrogate

log = logging.getLogger("sfd_fast")


def one_step_generator(cfg, net: nn.Module, device) -> OneStepGenerator:
    from .build import make_schedule
    den = ClassCondDenoiser(net.to(device), make_schedule(cfg).to(device), cfg.sfd.num_classes)
    return OneStepGenerator(den, cfg.sfd.t_init).eval().requires_grad_(False)


def load_generator(cfg, teacher_net: nn.Module, weights: Path, device) -> OneStepGenerator:
    import copy
    net = copy.deepcopy(teacher_net)
    net.load_state_dict(load_file(str(weights)))
    return one_step_generator(cfg, net, device)


def attack_parts(cfg, run_dir: Path, device, references: list):
    """The AttackParts of a finished digits run (sfd_fast/evaluation/attacks/classes.py)."""
    from ..evaluation.attacks.classes import AttackParts
    from .evaluate import ddim_sample
    from .pretrain import get_digits_teacher
    teacher_net, _ = get_digits_teacher(cfg)
    generator = load_generator(cfg, teacher_net, generator_weights_file(Path(run_dir)), device)
    judge, judge_meta = get_digits_classifier(cfg)
    surrogate, sur_meta = get_surrogate(cfg)
    refs = {}
    if "teacher" in references:
        import copy
        refs["teacher"] = one_step_generator(cfg, copy.deepcopy(teacher_net), device)
    if "retrain" in references:
        from .retrain import retrain_generator_weights
        refs["retrain"] = load_generator(cfg, teacher_net, retrain_generator_weights(cfg), device)
    teacher = ClassCondDenoiser(teacher_net.to(device), generator.denoiser.schedule, cfg.sfd.num_classes)
    teacher.requires_grad_(False)

    def teacher_samples(labels: torch.Tensor, seed: int) -> torch.Tensor:
        return ddim_sample(teacher, labels, cfg.eval.teacher_steps, seed).clamp(-1, 1)

    forget, overrides = forget_targets(cfg.sfd)
    return AttackParts(generator=generator, references=refs, judge=judge.to(device),
                       surrogate=surrogate.to(device), sample_shape=(1, 8, 8), num_classes=cfg.sfd.num_classes,
                       forget=forget, overrides=overrides, teacher_samples=teacher_samples,
                       meta={"judge": f"digits MLP classifier (held-out accuracy {judge_meta['heldout_accuracy']:.3f})",
                             "surrogate": f"digits CNN, {_surrogate_origin(cfg)} (held-out accuracy "
                                          f"{sur_meta.get('heldout_accuracy', float('nan')):.3f})"})


def _surrogate_origin(cfg) -> str:
    if cfg.eval.attacks.surrogate == "auto":
        return f"seed +{cfg.eval.attacks.surrogate_seed_offset}"
    return f"from {cfg.eval.attacks.surrogate}"


def run_attacks(cfg, run_dir: Path, device) -> dict:
    """families.py `attack` entry: every class attack of eval.attacks on this digits run."""
    from ..evaluation.attacks.classes import run_class_attacks
    acfg = cfg.eval.attacks
    parts = attack_parts(cfg, run_dir, device, list(acfg.references))
    return run_class_attacks(parts, acfg, progress=lambda msg: log.info("attack: %s", msg))
