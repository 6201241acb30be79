"""Pretraining for the embedded digits default: a class-conditional DDPM teacher and a classifier.

Both are cached under the run root (`<root>/cache/`), keyed by a hash of everything that
determines them, so later runs reuse them. Files are safetensors written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from ..checkpoint import atomic_write_json, check_finite, save_safetensors_atomic
from ..config import Config
from ..schedules import VPSchedule
from .data import load_digits_tensors, train_test_split
from .model import DigitsClassifier, DigitsEpsMLP

log = logging.getLogger("sfd_fast")


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def teacher_cache_path(cfg: Config, exclude: tuple = ()) -> Path:
    """The cached teacher's file; `exclude`: classes left out of its training data (the "retrain"
    reference of the attacks, sfd_fast/evaluation/attacks/retrain.py). Without it the key is unchanged."""
    p = cfg.pretrain
    payload = {"hidden": cfg.model.hidden, "blocks": cfg.model.blocks, "classes": cfg.sfd.num_classes,
               "schedule": vars(cfg.schedule), "steps": p.steps, "batch": p.batch_size, "lr": p.lr,
               "drop": p.cond_drop_prob, "seed": cfg.run.seed, "v": 1}
    if exclude:
        payload["exclude"] = sorted(int(c) for c in exclude)
    name = "digits-teacher" + ("-without-" + "-".join(map(str, payload["exclude"])) if exclude else "")
    return Path(cfg.run.root) / "cache" / f"{name}-{_key(payload)}.safetensors"


def classifier_cache_path(cfg: Config) -> Path:
    key = _key({"epochs": cfg.pretrain.classifier_epochs, "seed": cfg.run.seed, "v": 1})
    return Path(cfg.run.root) / "cache" / f"digits-classifier-{key}.safetensors"


def _bar(total, desc):
    return tqdm(total=total, desc=desc, disable=not sys.stderr.isatty(), dynamic_ncols=True)


def pretrain_digits_teacher(cfg: Config, out: Path, exclude: tuple = ()) -> Path:
    """DDPM epsilon-prediction training with class dropout (null class) on all 1797 digits, or on
    those whose class is not in `exclude` (a teacher that never saw them)."""
    p = cfg.pretrain
    torch.manual_seed(cfg.run.seed)
    g = torch.Generator().manual_seed(cfg.run.seed)
    x, y = load_digits_tensors()
    if exclude:
        keep = ~torch.isin(y, torch.tensor([int(c) for c in exclude]))
        x, y = x[keep], y[keep]
    sch = cfg.schedule
    schedule = VPSchedule.from_betas(sch.beta_schedule, sch.beta_start, sch.beta_end, sch.num_timesteps,
                                     sch.prediction)
    net = DigitsEpsMLP(cfg.sfd.num_classes, cfg.model.hidden, cfg.model.blocks)
    opt = torch.optim.Adam(net.parameters(), lr=p.lr)
    lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=p.steps, pct_start=0.05)
    log.info("pretraining the digits teacher (%d steps, batch %d) -> %s", p.steps, p.batch_size, out)
    bar = _bar(p.steps, "digits teacher")
    for step in range(p.steps):
        idx = torch.randint(0, x.shape[0], (p.batch_size,), generator=g)
        x0, labels = x[idx], y[idx].clone()
        drop = torch.rand(p.batch_size, generator=g) < p.cond_drop_prob
        labels[drop] = cfg.sfd.num_classes
        t = torch.randint(0, sch.num_timesteps, (p.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = schedule.add_noise(x0, noise, t)
        target = schedule.target(x0, noise, t)
        loss = (net(x_t, t, labels) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        bar.update(1)
        if (step + 1) % 1000 == 0:
            log.info("teacher step %d loss %.4f", step + 1, loss.item())
    bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(net.state_dict(), out, metadata={"kind": "digits_teacher"})
    return out


def train_digits_classifier(cfg: Config, out: Path) -> dict:
    """A digits MLP classifier on a 75% split; returns and caches its held-out accuracy."""
    torch.manual_seed(cfg.run.seed + 1)
    g = torch.Generator().manual_seed(cfg.run.seed + 1)
    x, y = load_digits_tensors()
    tr, te = train_test_split(x.shape[0], 0.25, seed=cfg.run.seed)
    clf = DigitsClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-3)
    epochs = cfg.pretrain.classifier_epochs
    bar = _bar(epochs, "digits classifier")
    for _ in range(epochs):
        clf.train()
        perm = tr[torch.randperm(tr.shape[0], generator=g)]
        for i in range(0, perm.shape[0], 128):
            b = perm[i:i + 128]
            # light augmentation: pixel noise, so the classifier is not brittle on generated digits
            xb = x[b] + 0.05 * torch.randn(x[b].shape, generator=g)
            loss = torch.nn.functional.cross_entropy(clf(xb), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.update(1)
    bar.close()
    clf.eval()
    with torch.no_grad():
        acc = (clf(x[te]).argmax(1) == y[te]).float().mean().item()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(clf.state_dict(), out, metadata={"heldout_accuracy": f"{acc:.6f}"})
    atomic_write_json(out.with_suffix(".json"), {"heldout_accuracy": acc, "test_size": int(te.shape[0])}, indent=None)
    log.info("digits classifier held-out accuracy %.4f (%d test images)", acc, te.shape[0])
    return {"heldout_accuracy": acc}


def get_digits_teacher(cfg: Config) -> tuple[DigitsEpsMLP, Path]:
    path = Path(cfg.model.teacher) if cfg.model.teacher != "auto" else teacher_cache_path(cfg)
    if cfg.model.teacher == "auto" and not path.is_file():
        pretrain_digits_teacher(cfg, path)
    net = DigitsEpsMLP(cfg.sfd.num_classes, cfg.model.hidden, cfg.model.blocks)
    try:
        net.load_state_dict(load_file(str(path)))
    except Exception as e:  # wrong file / wrong architecture: say which and what to do
        raise ValueError(f"model.teacher {path}: cannot load as a digits teacher with hidden="
                         f"{cfg.model.hidden}, blocks={cfg.model.blocks} ({e}); point model.teacher at a "
                         "matching checkpoint or use 'auto'") from e
    check_finite(net.state_dict(), f"model.teacher {path}")   # a NaN teacher would skip every update
    return net, path


def get_digits_classifier(cfg: Config) -> tuple[DigitsClassifier, dict]:
    path = classifier_cache_path(cfg)
    if not path.is_file():
        train_digits_classifier(cfg, path)
    clf = DigitsClassifier()
    clf.load_state_dict(load_file(str(path)))
    clf.eval().requires_grad_(False)
    meta = json.loads(path.with_suffix(".json").read_text())
    return clf, meta
