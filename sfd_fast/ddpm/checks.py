"""Value checks of a `model.kind: ddpm` config (called from sfd_fast.config.validate)."""
from __future__ import annotations

from pathlib import Path

from ..conditions import validate_class_targets


def validate(cfg, bad) -> None:
    """Stop before anything is built: classes, architecture and checkpoint path."""
    s, d = cfg.sfd, cfg.ddpm
    n = s.num_classes
    if n < 2:
        bad("sfd.num_classes", f"must be >= 2 (the network's classes), got {n}")
    if s.forget_classes:  # several forgotten classes (issue #13): the shared class-target checks
        validate_class_targets(s, bad)
    elif s.forget_class == -1:  # stage-1 SiD of the two-stage setting: distil all classes, forget none
        if s.sg_forget_coef or s.g_forget_coef:
            bad("sfd.forget_class", "is -1 (no class forgotten: stage-1 SiD) but sfd.sg_forget_coef / "
                "g_forget_coef are not 0; set both to 0, or name a class to forget")
    elif not 0 <= s.forget_class < n:
        bad("sfd.forget_class", f"must be one of the model's classes [0, {n}) (or -1 for stage-1 SiD "
            f"without forgetting), got {s.forget_class}")
    if s.override not in ("fixed", "random"):
        bad("sfd.override", f"must be 'fixed' or 'random', got {s.override!r}")
    if s.override == "fixed" and s.forget_class != -1 and not s.forget_classes:
        if not 0 <= s.override_class < n:
            bad("sfd.override_class", f"must be one of the model's classes [0, {n}), got {s.override_class}")
        if s.override_class == s.forget_class:
            bad("sfd.override_class", f"equals sfd.forget_class ({s.forget_class}); choose another class or "
                "set sfd.override to 'random'")
    if cfg.schedule.prediction != "epsilon":
        bad("schedule.prediction", "must be 'epsilon' for the reference DDPM (an epsilon-prediction network)")
    if cfg.model.generator_init != "teacher":
        bad("model.generator_init", "is not used by model.kind 'ddpm': a two-stage start is a 6-entry SFD/SiD "
            "checkpoint in ddpm.checkpoint (teacher and fake score = its fake score, generator = its generator)")
    if not d.checkpoint:
        bad("ddpm.checkpoint", "is empty; give the reference ckpt.pth (base DDPM or SiD/SFD) or "
            "'random:DIR' for random weights (smoke runs)")
    if d.checkpoint.startswith("random:"):
        if not d.checkpoint[7:]:
            bad("ddpm.checkpoint", "is 'random:' without a folder; use e.g. 'random:runs/cache'")
    elif not Path(d.checkpoint).is_file():
        bad("ddpm.checkpoint", f"= {d.checkpoint!r} does not exist; give the reference checkpoint file "
            "(e.g. the ckpts/ckpt.pth written by the reference DDPM training)")
    if d.ch <= 0 or d.ch % 32:
        bad("ddpm.ch", f"must be a positive multiple of 32 (GroupNorm with 32 groups), got {d.ch}")
    if not d.ch_mult or not all(isinstance(m, int) and m > 0 for m in d.ch_mult):
        bad("ddpm.ch_mult", f"must be a non-empty list of positive integers, got {d.ch_mult}")
    levels = len(d.ch_mult)
    if d.image_size <= 0 or d.image_size % (2 ** (levels - 1)):
        bad("ddpm.image_size", f"must be divisible by 2^(len(ch_mult)-1) = {2 ** (levels - 1)}, got {d.image_size}")
    if d.num_res_blocks < 1:
        bad("ddpm.num_res_blocks", f"must be >= 1, got {d.num_res_blocks}")
    if not 0 <= d.dropout < 1:
        bad("ddpm.dropout", f"must be in [0, 1), got {d.dropout}")
    if d.in_channels < 1:
        bad("ddpm.in_channels", f"must be >= 1, got {d.in_channels}")
    if d.grid_per_class < 1:
        bad("ddpm.grid_per_class", f"must be >= 1, got {d.grid_per_class}")
    if d.checkpoint and not d.checkpoint.startswith("random:") and Path(d.checkpoint).is_file():
        from .checkpoints import ReferenceCheckpointError, check_fits
        from .model import arch_of
        try:  # names the first missing / unexpected key and shape, before any run folder is made
            check_fits(d.checkpoint, arch_of(d, n), d.init_from_ema)
        except ReferenceCheckpointError as e:
            bad("ddpm.checkpoint", f"= {d.checkpoint!r}: {e}")
    if d.classifier and not Path(d.classifier).is_file():
        bad("ddpm.classifier", f"= {d.classifier!r} does not exist; give the reference train_classifier.py "
            "output (e.g. cifar10_resnet34.pth) or leave it empty to skip the UA evaluation")
    _validate_fid(d, bad)


def _validate_fid(d, bad, section: str = "ddpm") -> None:
    """End-of-run FID / IS: both settings or neither; given, torchmetrics must be installed (an explicit
    request never degrades), the real folder must hold images and the weight file must fit the network."""
    if not (d.fid_real_dir or d.inception_weights):
        return
    from ..evaluation.fid import INSTALL_HINT, image_files, torchmetrics_available
    from ..evaluation.inception import WEIGHTS_FILE, read_inception_weights
    if not d.inception_weights:
        bad(f"{section}.inception_weights", f"is empty but {section}.fid_real_dir is set: FID / IS need "
            f"torch-fidelity's {WEIGHTS_FILE}; give its path, or clear {section}.fid_real_dir to skip FID / IS")
    if not d.fid_real_dir:
        bad(f"{section}.fid_real_dir", f"is empty but {section}.inception_weights is set: give a folder of real "
            f"images (e.g. the reference's save_base_dataset.py output), or clear {section}.inception_weights to "
            "skip FID / IS")
    if not torchmetrics_available():
        bad(f"{section}.fid_real_dir", f"asks for FID / IS, which need torchmetrics (not installed): {INSTALL_HINT}")
    for key, check in ((f"{section}.fid_real_dir", image_files),
                       (f"{section}.inception_weights", read_inception_weights)):
        try:
            check(getattr(d, key.split(".")[1]), key)
        except ValueError as e:
            bad(key, str(e).removeprefix(f"{key}: "))
