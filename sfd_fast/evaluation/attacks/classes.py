"""Attacks on class-conditional one-step generators (digits, ddpm), each run with the same budget,
the same noises and the same seed on the attacked generator and on references that never knew
the class. The surrogate classifier guides every search; the judge (the family's evaluation
classifier) decides every verdict, on samples clamped to [-1, 1] as a saved image would be.

Subjects for a forgotten class f (override o):
  attack                 the run's generator, conditioned on f
  label o (override), label k ...   the same generator on labels that never were f (the override first)
  retrain                a generator distilled with the same recipe from a teacher that never saw f
  teacher                the teacher-initialised generator (it knows f: the upper bound)
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .search import embedding_search, noise_search


@dataclass
class AttackParts:
    """What a class family hands the attacks (digits/robustness.py builds it)."""
    generator: nn.Module                      # OneStepGenerator: generator(z, labels)
    references: dict                          # "teacher" / "retrain" -> OneStepGenerator
    judge: nn.Module                          # logits(x in [-1, 1]); decides
    surrogate: nn.Module                      # logits(x); guides (differentiable, another network)
    sample_shape: tuple
    num_classes: int
    forget: list
    overrides: list                           # one per forgotten class ([] with override "random")
    teacher_samples: Optional[Callable] = None   # (labels, seed) -> images, for the relearning attack
    meta: dict = field(default_factory=dict)


def subjects(parts: AttackParts, f: int, other_labels: int) -> list[tuple[str, nn.Module, int]]:
    """(name, generator, label) for the attack on class f and its references, attack first."""
    i = parts.forget.index(f)
    override = parts.overrides[i] if i < len(parts.overrides) else None
    labels = [override] if override is not None else []
    labels += [c for c in range(parts.num_classes) if c not in parts.forget and c not in labels]
    out = [("attack", parts.generator, f)]
    out += [(f"label {c}" + (" (override)" if c == override else ""), parts.generator, c)
            for c in labels[:other_labels + (override is not None)]]
    out += [(name, gen, f) for name, gen in parts.references.items()]
    return out


def _noises(parts, n: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn((n, *parts.sample_shape), generator=g, device=device)


def _judged(parts, x: torch.Tensor, f: int) -> torch.Tensor:
    with torch.no_grad():
        return (parts.judge(x.clamp(-1, 1)).argmax(1) == f).float()


def noise_attack(parts: AttackParts, gen, label: int, f: int, cfg, n: int, seed: int) -> dict:
    """Success rate: share of n noises whose searched z makes the judge see f (and the rate before)."""
    device = next(gen.parameters()).device
    z0 = _noises(parts, n, seed, device)
    labels = torch.full((n,), label, dtype=torch.long, device=device)

    def objective(z):
        return torch.log_softmax(parts.surrogate(gen(z, labels)), 1)[:, f]
    z = noise_search(objective, z0, cfg.steps, cfg.step_size, cfg.radius)
    with torch.no_grad():
        before, after = _judged(parts, gen(z0, labels), f), _judged(parts, gen(z, labels), f)
    return {"rate": float(after.mean()), "rate_before": float(before.mean())}


def class_embedding(net: nn.Module, num_classes: int) -> nn.Embedding:
    """The network's class-embedding table: its one nn.Embedding with num_classes (+1 null) rows."""
    found = [m for m in net.modules() if isinstance(m, nn.Embedding) and m.num_embeddings in (num_classes, num_classes + 1)]
    if len(found) != 1:
        raise ValueError(f"the condition attack needs exactly one class-embedding table with {num_classes} "
                         f"(+1) rows in the generator; found {len(found)}")
    return found[0]


@contextlib.contextmanager
def embedding_override(table: nn.Embedding, vector_ref: list):
    """While open, every lookup of `table` returns vector_ref[0] (one free embedding for all rows)."""
    handle = table.register_forward_hook(lambda m, inp, out: vector_ref[0].to(out.dtype).expand_as(out))
    try:
        yield
    finally:
        handle.remove()


def condition_attack(parts: AttackParts, gen, label: int, f: int, cfg, n: int, seed: int) -> dict:
    """One free class embedding, started at `label`'s, fitted on cfg.fit_samples noises, judged on n others."""
    device = next(gen.parameters()).device
    table = class_embedding(gen.net, parts.num_classes)
    weights = table.weight.detach()
    scale = float(weights[:parts.num_classes].norm(dim=1).mean())    # the learned embeddings' mean norm
    e0 = weights[label].clone()
    ref = [e0]
    z_fit = _noises(parts, cfg.fit_samples, seed + 1, device)
    z_eval = _noises(parts, n, seed, device)
    lab_fit = torch.full((z_fit.shape[0],), label, dtype=torch.long, device=device)
    lab_eval = torch.full((n,), label, dtype=torch.long, device=device)

    def objective(e):
        ref[0] = e
        return torch.log_softmax(parts.surrogate(gen(z_fit, lab_fit)), 1)[:, f].mean()
    with embedding_override(table, ref):
        e = embedding_search(objective, e0, cfg.steps, cfg.step_size * scale, cfg.radius * scale)
        ref[0] = e
        after = _judged(parts, gen(z_eval, lab_eval), f)
    before = _judged(parts, gen(z_eval, lab_eval), f)
    return {"rate": float(after.mean()), "rate_before": float(before.mean()),
            "distance": float((e - e0).norm() / scale)}


def relearn_attack(parts: AttackParts, gen, label: int, f: int, cfg, n: int, seed: int) -> dict:
    """Fine-tune a copy of `gen` on cfg.images teacher samples of f, given as `label`, until the
    judge's UA on n fixed noises drops below cfg.ua_threshold (checked every cfg.check_every steps).

    The loss is the one-step generator's own: || G(z, label) - x_i ||^2 with fresh noises z (the
    generator's input distribution) and images x_i drawn from the handful; no noise is paired with
    an image, so the attacker needs only the images. Its minimiser over G is the images' mean for
    every z: the attack measures how few updates move the class's output into the judge's f region.
    steps: the first checked step count with UA below the threshold, None if not within cfg.max_steps."""
    device = next(gen.parameters()).device
    model = copy.deepcopy(gen).requires_grad_(True)
    g = torch.Generator(device=device).manual_seed(seed + 2)
    images = parts.teacher_samples(torch.full((cfg.images,), f, dtype=torch.long, device=device), seed + 3)
    z_eval = _noises(parts, n, seed, device)
    lab_eval = torch.full((n,), label, dtype=torch.long, device=device)
    lab_train = torch.full((cfg.batch_size,), label, dtype=torch.long, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    curve, steps = [], None
    for step in range(cfg.max_steps + 1):
        if step % cfg.check_every == 0:
            with torch.no_grad():
                ua = 1.0 - float(_judged(parts, model(z_eval, lab_eval), f).mean())
            curve.append([step, ua])
            if ua < cfg.ua_threshold:
                steps = step
                break
        if step == cfg.max_steps:
            break
        idx = torch.randint(0, cfg.images, (cfg.batch_size,), generator=g, device=device)
        z = torch.randn((cfg.batch_size, *parts.sample_shape), generator=g, device=device)
        with torch.enable_grad():
            loss = (model(z, lab_train) - images[idx]).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
    return {"steps": steps, "ua_curve": curve}


ATTACKS = {"noise": noise_attack, "condition": condition_attack, "relearn": relearn_attack}


def rate_gap(attack: float, reference: float, n: int) -> dict:
    """Gap in points with its standard error (two independent binomial shares of n each)."""
    se = math.sqrt(max(attack * (1 - attack) + reference * (1 - reference), 0.0) / n)
    return {"gap": attack - reference, "gap_se": se}


def summarise_rates(rows: dict, n: int) -> dict:
    """Headline reference: retrain when present, else the override label, else the first label."""
    names = [k for k in rows if k != "attack"]
    ref = "retrain" if "retrain" in rows else next((k for k in names if "override" in k), names[0] if names else None)
    out = {"rate": rows["attack"]["rate"], "references": {k: rows[k]["rate"] for k in names}, "details": rows}
    if ref is not None:
        out.update({"reference": ref, "reference_rate": rows[ref]["rate"], **rate_gap(rows["attack"]["rate"], rows[ref]["rate"], n)})
        labels = [k for k in names if k.startswith("label")]
        if labels:
            out["max_label_rate"] = max(rows[k]["rate"] for k in labels)
    return out


def summarise_relearn(rows: dict) -> dict:
    out = {"steps": rows["attack"]["steps"], "references": {k: v["steps"] for k, v in rows.items() if k != "attack"},
           "details": rows}
    ref = "retrain" if "retrain" in rows else next((k for k in rows if "override" in k), None)
    if ref is not None:
        a, r = rows["attack"]["steps"], rows[ref]["steps"]
        out.update({"reference": ref, "reference_steps": r,
                    "fewer_steps_than_reference": None if a is None or r is None else max(r - a, 0)})
    return out


def run_class_attacks(parts: AttackParts, acfg, progress: Callable = lambda msg: None) -> dict:
    """Every enabled attack on every forgotten class and its subjects -> the eval.json "attacks"."""
    out = {"samples": acfg.samples, "seed": acfg.seed, **parts.meta, "per_class": {}}
    for name in ATTACKS:
        sec = getattr(acfg, name)
        if sec.enabled:
            out.setdefault("budgets", {})[name] = dict(vars(sec))
    for f in parts.forget:
        per = {}
        for name, fn in ATTACKS.items():
            sec = getattr(acfg, name)
            if not sec.enabled or (name == "relearn" and parts.teacher_samples is None):
                continue
            rows = {}
            others = 0 if name == "relearn" else acfg.other_labels   # relearning: the override label only
            for who, gen, label in subjects(parts, f, others):
                progress(f"{name} attack, class {f}: {who}")
                rows[who] = {"label": label, **ATTACKS[name](parts, gen, label, f, sec, acfg.samples, acfg.seed)}
            per[name] = summarise_relearn(rows) if name == "relearn" else summarise_rates(rows, acfg.samples)
        out["per_class"][str(f)] = per
    return out
