"""Digits unlearning evaluation (written to eval.json).

- ua: share of one-step samples conditioned on the forgotten digit that the classifier does NOT
  call the forgotten digit (unlearning accuracy, as the reference's ua_ddpm.py).
- retained_accuracy: classifier accuracy on one-step samples of the other digits.
- fd_final / fd_init / fd_teacher: Frechet distance between the classifier's penultimate features
  of the real remaining digits and of samples from the final one-step generator, the initial
  one-step generator, and the teacher with 50 DDIM steps (same labels, same count).
Samples are clamped to the data range [-1, 1] before classification, as a saved image would be.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write_text
from ..denoisers import ClassCondDenoiser, Denoiser
from ..evaluation.frechet import frechet_distance
from ..generator import OneStepGenerator
from ..schedules import ddim_timesteps
from .data import load_digits_tensors

log = logging.getLogger("sfd_fast")


@torch.no_grad()
def ddim_sample(teacher: Denoiser, labels: torch.Tensor, steps: int, seed: int, shape=(1, 8, 8)) -> torch.Tensor:
    """Deterministic DDIM (eta = 0), 'leading' timesteps, final alpha_bar = 1 (diffusers' defaults)."""
    sch = teacher.schedule
    g = torch.Generator(device=labels.device).manual_seed(seed)
    x = torch.randn((labels.shape[0], *shape), generator=g, device=labels.device)
    ts = ddim_timesteps(sch.num_timesteps, steps)
    for i, t in enumerate(ts):
        tt = torch.full((labels.shape[0],), t, dtype=torch.long, device=labels.device)
        x0 = teacher.x0(x, tt, labels)
        a, b = sch.a(t), sch.b(t)
        eps = (x - a * x0) / b
        if i + 1 < len(ts):
            a_prev, b_prev = sch.a(ts[i + 1]), sch.b(ts[i + 1])
        else:
            a_prev, b_prev = 1.0, 0.0
        x = a_prev * x0 + b_prev * eps
    return x


@torch.no_grad()
def evaluate_digits(classifier, final_gen, init_gen, teacher: Denoiser, forget_class: int,
                    num_classes: int, samples_per_class: int, teacher_steps: int, seed: int = 7) -> dict:
    device = next(final_gen.parameters()).device
    classifier = classifier.to(device)
    x_real, y_real = load_digits_tensors()
    keep = y_real != forget_class
    real_feats = classifier.features(x_real[keep].to(device)).cpu().numpy()

    remain = [c for c in range(num_classes) if c != forget_class]
    labels_remain = torch.tensor(remain, device=device).repeat_interleave(samples_per_class)
    labels_forget = torch.full((samples_per_class,), forget_class, device=device, dtype=torch.long)

    def gen_samples(gen, labels, s):
        g = torch.Generator(device=device).manual_seed(s)
        z = torch.randn((labels.shape[0], 1, 8, 8), generator=g, device=device)
        return gen(z, labels).clamp(-1, 1)

    def feats(x):
        return classifier.features(x).cpu().numpy()

    x_forget = gen_samples(final_gen, labels_forget, seed)
    pred_forget = classifier(x_forget).argmax(1)
    x_remain = gen_samples(final_gen, labels_remain, seed + 1)
    pred_remain = classifier(x_remain).argmax(1)
    x_init = gen_samples(init_gen, labels_remain, seed + 1)
    x_teacher = ddim_sample(teacher, labels_remain, teacher_steps, seed + 2).clamp(-1, 1)
    forget_pred_hist = np.bincount(pred_forget.cpu().numpy(), minlength=num_classes).tolist()
    return {
        "ua": float((pred_forget != forget_class).float().mean()),
        "retained_accuracy": float((pred_remain == labels_remain).float().mean()),
        "fd_final": frechet_distance(real_feats, feats(x_remain)),
        "fd_init": frechet_distance(real_feats, feats(x_init)),
        "fd_teacher": frechet_distance(real_feats, feats(x_teacher)),
        "forget_samples_predicted_as": forget_pred_hist,
        "init_retained_accuracy": float((classifier(x_init).argmax(1) == labels_remain).float().mean()),
        "teacher_retained_accuracy": float((classifier(x_teacher).argmax(1) == labels_remain).float().mean()),
        "samples_per_class": samples_per_class,
        "teacher_ddim_steps": teacher_steps,
    }


def evaluate_run(cfg, parts, trainer, run_dir: Path) -> dict:
    """The end-of-run evaluation of a digits run: eval.json and the final grid (rank 0 only)."""
    from .build import load_generator_init, make_schedule
    from .pretrain import get_digits_classifier

    clf, clf_meta = get_digits_classifier(cfg)
    device = trainer.device
    init_net = load_generator_init(cfg, parts.teacher.net).to(device)
    init_gen = OneStepGenerator(ClassCondDenoiser(init_net, make_schedule(cfg).to(device), cfg.sfd.num_classes),
                                cfg.sfd.t_init)
    metrics = evaluate_digits(clf, trainer.generator_ema, init_gen, trainer.teacher, cfg.sfd.forget_class,
                              cfg.sfd.num_classes, cfg.eval.samples_per_class, cfg.eval.teacher_steps)
    metrics["classifier_accuracy"] = clf_meta["heldout_accuracy"]
    metrics["step"] = trainer.step
    atomic_write_text(run_dir / "eval.json", json.dumps(metrics, indent=1))
    grid = run_dir / "samples_final.png"
    parts.save_grid(trainer.generator_ema, grid)
    log.info("eval: %s", json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}))
    log.info("eval.json: %s  grid (one row per digit 0-9): %s", run_dir / "eval.json", grid)
    return {"eval": metrics, "grid": str(grid)}
