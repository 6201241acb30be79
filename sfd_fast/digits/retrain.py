"""The "retrain" reference of the attacks: a generator that never knew the forgotten classes.

A digits teacher is pretrained on the data without the forgotten classes (their label embeddings
stay at their random initialisation), then distilled with the run's own SFD recipe (same config:
forget -> override, steps, batch, learning rates, EMA, seed), so the reference differs from the
run only in what its teacher ever saw. Both are cached under <run.root>/cache/ (the teacher as a
safetensors file, the distillation as a run directory), keyed by everything that determines them,
and reused by later attacks; an interrupted distillation is resumed.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from ..checkpoint import atomic_write_text, checkpoint_folders, generator_weights_file
from ..conditions import forget_targets
from .pretrain import _key, pretrain_digits_teacher, teacher_cache_path

log = logging.getLogger("sfd_fast")
DONE = "retrain_done.json"


def retrain_config(cfg, teacher_path: Path) -> dict:
    """The run's config for the reference distillation: its own teacher, no evaluation extras."""
    d = copy.deepcopy(cfg.to_dict())
    d["model"]["teacher"] = str(teacher_path)
    d["model"]["generator_init"] = "teacher"
    d["eval"]["every"] = 0
    d["eval"]["report"] = False
    d["eval"]["attacks"]["enabled"] = False      # never attack inside the reference's own run
    d["eval"]["attacks"]["during"] = False
    d["train"]["progress"] = False
    # the plain recipe: training against a search for a class the teacher never knew says nothing, and
    # the cache key leaves train.adversarial out, so the reference must not depend on it
    d["train"]["adversarial"] |= {"share": 0.0, "remain_share": 0.0}
    return d


def retrain_run_dir(cfg, teacher_path: Path) -> Path:
    d = cfg.to_dict()
    key = _key({k: d[k] for k in ("schedule", "sfd", "optim", "pretrain")} |
               {"model": {"hidden": cfg.model.hidden, "blocks": cfg.model.blocks}, "teacher": teacher_path.name,
                "train": {k: d["train"][k] for k in ("batch_size", "total_steps", "ema", "grad_accum")},
                "seed": cfg.run.seed, "precision": cfg.engine.precision, "v": 1})
    return Path(cfg.run.root) / "cache" / f"digits-retrain-{key}"


def retrain_generator_weights(cfg) -> Path:
    """The reference generator's weights file (EMA else raw), trained on first use."""
    if cfg.model.teacher != "auto":
        raise ValueError("eval.attacks.references 'retrain' pretrains a teacher without the forgotten classes "
                         "from the run's pretrain settings; this run's model.teacher is a file "
                         f"({cfg.model.teacher}), so that teacher cannot be re-made: remove 'retrain'")
    forget = forget_targets(cfg.sfd)[0]
    teacher_path = teacher_cache_path(cfg, exclude=tuple(forget))
    if not teacher_path.is_file():
        log.info("retrain reference: pretraining a digits teacher without class(es) %s", forget)
        pretrain_digits_teacher(cfg, teacher_path, exclude=tuple(forget))
    run_dir = retrain_run_dir(cfg, teacher_path)
    if not (run_dir / DONE).is_file():
        _distil(cfg, teacher_path, run_dir)
    return generator_weights_file(run_dir)


def _distil(cfg, teacher_path: Path, run_dir: Path) -> None:
    from ..train import main as train_main
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    config_file = run_dir.parent / (run_dir.name + ".config.json")
    atomic_write_text(config_file, json.dumps(retrain_config(cfg, teacher_path), indent=1))
    if checkpoint_folders(run_dir):
        log.info("retrain reference: resuming the interrupted distillation in %s", run_dir)
        argv = ["--resume", str(run_dir)]
    else:
        log.info("retrain reference: distilling with the run's recipe (%d steps) -> %s",
                 cfg.train.total_steps, run_dir)
        argv = ["--config", str(config_file), "--run-dir", str(run_dir)]
    result = train_main(argv)
    atomic_write_text(run_dir / DONE, json.dumps({"eval": result.get("eval")}, indent=1))
