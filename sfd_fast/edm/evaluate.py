"""End-of-run evaluation of an edm run: UA with the reference classifier, FID / IS of the one-step
EMA generator's samples (the ddpm family's evaluation functions; spec §4.4). Standalone:
`sfd-fast sample --run D ...` then `sfd-fast eval-ddpm --images DIR ...` (docs/edm.md)."""
from __future__ import annotations

import logging
from pathlib import Path


def evaluate_run(cfg, parts, trainer, run_dir: Path) -> dict:
    """UA (edm.classifier) and FID / IS (edm.fid_real_dir + edm.inception_weights) -> eval.json."""
    import sys

    from ..checkpoint import atomic_write_json
    from ..conditions import forget_targets
    from ..ddpm.evaluate import FID_SKIPPED, fid_inception_score, load_classifier, unlearning_accuracy
    from ..ddpm.sample import sample_to_folder
    from ..evaluation.fid import INSTALL_HINT, torchmetrics_available
    log = logging.getLogger("sfd_fast")
    s, e = cfg.sfd, cfg.edm
    forgotten = forget_targets(s)[0]
    result: dict = {"step": trainer.step, "skipped": []}
    if not e.classifier:
        result["skipped"].append("UA: no edm.classifier (the reference's train_classifier.py ResNet-34 state dict)")
    fid = bool(e.fid_real_dir and e.inception_weights)
    if not fid:
        result["skipped"].append(FID_SKIPPED.replace("ddpm.", "edm.")
                                 + ("" if torchmetrics_available() else f", and {INSTALL_HINT}"))
    fid_classes = [c for c in range(s.num_classes) if c not in forgotten]
    classes = sorted(set((forgotten if e.classifier else []) + (fid_classes if fid else [])))
    folder = run_dir / "eval_samples"
    if classes:
        sample_to_folder(trainer.generator_ema, classes, cfg.eval.samples_per_class, folder, parts.sample_shape,
                         progress=False)
    if e.classifier:
        clf = load_classifier(e.classifier, s.num_classes)
        for c in forgotten:
            r = unlearning_accuracy(folder, clf, c, trainer.device)
            result.update(r if len(forgotten) == 1 else {f"{k}/{c}": v for k, v in r.items()})
    if fid:
        result.update(fid_inception_score(folder, e.fid_real_dir, e.inception_weights, fid_classes,
                                          device=trainer.device, progress=cfg.train.progress and sys.stderr.isatty(),
                                          keys=("edm.fid_real_dir", "edm.inception_weights")))
    atomic_write_json(run_dir / "eval.json", result)
    for line in result["skipped"]:
        log.info("eval skipped: %s", line)
    return {"eval": result}
