"""Digits unlearning evaluation (written to eval.json).

- ua: share of one-step samples conditioned on the forgotten digit that the classifier does NOT
  call the forgotten digit (unlearning accuracy, as the reference's ua_ddpm.py); with several
  forgotten digits, `ua` is their mean and `ua_per_class` gives each.
- retained_accuracy: classifier accuracy on one-step samples of the digits that are not forgotten
  (`retained_accuracy_per_class` gives each).
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

from ..checkpoint import atomic_write_json
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


def _as_list(classes) -> list[int]:
    return [int(c) for c in (classes if isinstance(classes, (list, tuple)) else [classes])]


def _one_step(gen, labels, seed):
    g = torch.Generator(device=labels.device).manual_seed(seed)
    z = torch.randn((labels.shape[0], 1, 8, 8), generator=g, device=labels.device)
    return gen(z, labels).clamp(-1, 1)


@torch.no_grad()
def forgetting_metrics(classifier, gen, forget_classes, num_classes: int, samples_per_class: int,
                       seed: int, real_feats=None) -> tuple[dict, torch.Tensor]:
    """UA per forgotten class and retained accuracy (overall and per class) of one-step samples from
    fixed seeds; with `real_feats`, also fd (Frechet distance of the remain samples' features).
    Returns (metrics, the remain samples' labels)."""
    forget = _as_list(forget_classes)
    device = next(gen.parameters()).device
    remain = [c for c in range(num_classes) if c not in forget]
    labels_remain = torch.tensor(remain, device=device).repeat_interleave(samples_per_class)
    labels_forget = torch.tensor(forget, device=device).repeat_interleave(samples_per_class)
    pred_forget = classifier(_one_step(gen, labels_forget, seed)).argmax(1).view(len(forget), -1)
    x_remain = _one_step(gen, labels_remain, seed + 1)
    correct = (classifier(x_remain).argmax(1) == labels_remain).float()
    ua = {str(c): float((pred_forget[i] != c).float().mean()) for i, c in enumerate(forget)}
    out = {"ua": float(np.mean(list(ua.values()))), "ua_per_class": ua,
           "retained_accuracy": float(correct.mean()),
           "retained_accuracy_per_class": {str(c): float(v) for c, v in
                                           zip(remain, correct.view(len(remain), -1).mean(1).tolist())},
           "forget_samples_predicted_as": {str(c): np.bincount(pred_forget[i].cpu().numpy(),
                                                               minlength=num_classes).tolist()
                                           for i, c in enumerate(forget)}}
    if real_feats is not None:
        out["fd"] = frechet_distance(real_feats, classifier.features(x_remain).cpu().numpy())
    return out, labels_remain


def remain_real_features(classifier, forget_classes, device):
    """The classifier's penultimate features of the real digits that are not forgotten."""
    x_real, y_real = load_digits_tensors()
    keep = ~torch.isin(y_real, torch.tensor(_as_list(forget_classes)))
    return classifier.features(x_real[keep].to(device)).cpu().numpy()


@torch.no_grad()
def evaluate_digits(classifier, final_gen, init_gen, teacher: Denoiser, forget_classes,
                    num_classes: int, samples_per_class: int, teacher_steps: int, seed: int = 7) -> dict:
    """eval.json metrics (module docstring); `forget_classes` is a class or a list of classes."""
    device = next(final_gen.parameters()).device
    classifier = classifier.to(device)
    real_feats = remain_real_features(classifier, forget_classes, device)
    final, labels_remain = forgetting_metrics(classifier, final_gen, forget_classes, num_classes,
                                              samples_per_class, seed, real_feats)
    if len(_as_list(forget_classes)) == 1:   # single target: the per-class histogram as before
        final["forget_samples_predicted_as"] = next(iter(final["forget_samples_predicted_as"].values()))

    def feats(x):
        return classifier.features(x).cpu().numpy()

    x_init = _one_step(init_gen, labels_remain, seed + 1)
    x_teacher = ddim_sample(teacher, labels_remain, teacher_steps, seed + 2).clamp(-1, 1)
    return {
        **final,
        "fd_final": final.pop("fd"),
        "fd_init": frechet_distance(real_feats, feats(x_init)),
        "fd_teacher": frechet_distance(real_feats, feats(x_teacher)),
        "init_retained_accuracy": float((classifier(x_init).argmax(1) == labels_remain).float().mean()),
        "teacher_retained_accuracy": float((classifier(x_teacher).argmax(1) == labels_remain).float().mean()),
        "samples_per_class": samples_per_class,
        "teacher_ddim_steps": teacher_steps,
    }


DURING_SEED = 11   # forget rows: seed, remain rows: seed + 1, the teacher's DDIM noise: seed + 2 (as evaluate_digits)


@torch.no_grad()
def teacher_fd(classifier, teacher: Denoiser, labels_remain, real_feats, steps: int, seed: int) -> float:
    """FD of the teacher's `steps`-step DDIM samples of `labels_remain` (clamped as saved images)."""
    x = ddim_sample(teacher, labels_remain, steps, seed).clamp(-1, 1)
    return frechet_distance(real_feats, classifier.features(x).cpu().numpy())


def make_evaluate_during(cfg, parts, device):
    """The digits evaluation during training (eval.every): UA per forgotten digit, retained accuracy
    and FD on `eval.during_samples_per_class` fixed-seed samples per class; -> callable(generator).
    The teacher's FD on the same sample count, seed scheme and features (`eval.teacher_steps` DDIM
    steps, as the final evaluation) is computed once, here, before training: each record carries it
    as fd_teacher and fd_ratio = fd / fd_teacher (sfd_fast/quality.py)."""
    from ..conditions import forget_targets
    from .pretrain import get_digits_classifier

    classifier = get_digits_classifier(cfg)[0].to(device)
    forget = forget_targets(cfg.sfd)[0]
    real_feats = remain_real_features(classifier, forget, device)
    n = cfg.eval.during_samples_per_class
    remain = [c for c in range(cfg.sfd.num_classes) if c not in _as_list(forget)]
    labels_remain = torch.tensor(remain, device=device).repeat_interleave(n)
    teacher = parts.teacher.to(device).eval()
    teacher.schedule.to(device)
    fd_teacher = teacher_fd(classifier, teacher, labels_remain, real_feats, cfg.eval.teacher_steps, DURING_SEED + 2)
    log.info("evaluation during training: teacher FD %.4g (%d-step DDIM, %d samples per class)", fd_teacher,
             cfg.eval.teacher_steps, n)
    attack_during = None
    if cfg.eval.attacks.during:   # worst-case forgetting during training (docs/robustness.md)
        from .surrogate import make_attack_during
        attack_during = make_attack_during(cfg, classifier, device)

    @torch.no_grad()
    def evaluate(gen) -> dict:
        m, _ = forgetting_metrics(classifier, gen, forget, cfg.sfd.num_classes, n, seed=DURING_SEED,
                                  real_feats=real_feats)
        out = {f"ua/{c}": v for c, v in m["ua_per_class"].items()}
        if attack_during is not None:
            out.update(attack_during(gen))
        return {**out, "retained_accuracy": m["retained_accuracy"], "fd": m["fd"], "fd_teacher": fd_teacher,
                "fd_ratio": m["fd"] / fd_teacher if fd_teacher > 0 else float("inf")}
    return evaluate


def evaluate_run(cfg, parts, trainer, run_dir: Path) -> dict:
    """The end-of-run evaluation of a digits run: eval.json and the final grid (rank 0 only)."""
    from .build import load_generator_init, make_schedule
    from .pretrain import get_digits_classifier

    clf, clf_meta = get_digits_classifier(cfg)
    device = trainer.device
    init_net = load_generator_init(cfg, parts.teacher.net).to(device)
    init_gen = OneStepGenerator(ClassCondDenoiser(init_net, make_schedule(cfg).to(device), cfg.sfd.num_classes),
                                cfg.sfd.t_init)
    from ..conditions import forget_targets
    metrics = evaluate_digits(clf, trainer.generator_ema, init_gen, trainer.teacher, forget_targets(cfg.sfd)[0],
                              cfg.sfd.num_classes, cfg.eval.samples_per_class, cfg.eval.teacher_steps)
    metrics["classifier_accuracy"] = clf_meta["heldout_accuracy"]
    metrics["step"] = trainer.step
    metrics.update(quality_summary(cfg, run_dir, metrics, trainer.clock.seconds()))
    atomic_write_json(run_dir / "eval.json", metrics)
    grid = run_dir / "samples_final.png"
    parts.save_grid(trainer.generator_ema, grid)
    log.info("eval: %s", json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}))
    log.info("eval.json: %s  grid (one row per digit 0-9): %s", run_dir / "eval.json", grid)
    return {"eval": metrics, "grid": str(grid)}


def quality_summary(cfg, run_dir: Path, final: dict, sfd_seconds: float) -> dict:
    """eval.json's quality-against-time keys (sfd_fast/quality.py): the final fd ratio and whether the
    final evaluation meets eval.targets, time_to_target and the curve from stats.jsonl's eval records."""
    from ..evaluation.report import read_stats
    from ..quality import meets_targets, quality_curve, time_to_target
    tg = cfg.eval.targets
    ratio = final["fd_final"] / final["fd_teacher"] if final["fd_teacher"] > 0 else float("inf")
    as_record = {"eval/fd_ratio": ratio, "eval/retained_accuracy": final["retained_accuracy"],
                 **{f"eval/ua/{c}": v for c, v in final["ua_per_class"].items()}}
    evals = read_stats(run_dir)[1]
    every = cfg.eval.every if cfg.eval.enabled else 0
    return {"sfd_seconds": sfd_seconds, "fd_ratio": ratio, "final_meets_targets": meets_targets(as_record, tg),
            "time_to_target": time_to_target(evals, tg, every), "curve": quality_curve(evals)}
