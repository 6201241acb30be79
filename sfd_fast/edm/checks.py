"""Value checks of a `model.kind: edm` config (called from sfd_fast.config.validate), before anything
is built or written: classes, sigmas, the snapshot (read safely, its entry and class checked)."""
from __future__ import annotations

import math
from pathlib import Path

from ..conditions import validate_class_targets
from ..ddpm.checks import _validate_fid as validate_fid


def _validate_classes(s, bad) -> None:
    n = s.num_classes
    if n < 2:
        bad("sfd.num_classes", f"must be >= 2 (the network's classes), got {n}")
    if s.forget_classes:
        validate_class_targets(s, bad)
        return
    if not 0 <= s.forget_class < n:
        bad("sfd.forget_class", f"must be one of the model's classes [0, {n}), got {s.forget_class}")
    if s.override not in ("fixed", "random"):
        bad("sfd.override", f"must be 'fixed' or 'random', got {s.override!r}")
    if s.override == "fixed":
        if not 0 <= s.override_class < n:
            bad("sfd.override_class", f"must be one of the model's classes [0, {n}), got {s.override_class}")
        if s.override_class == s.forget_class:
            bad("sfd.override_class", f"equals sfd.forget_class ({s.forget_class}); choose another class or "
                "set sfd.override to 'random'")


def _validate_snapshot(cfg, bad) -> None:
    e = cfg.edm
    if not e.snapshot:
        bad("edm.snapshot", "is empty; give the EDM snapshot (e.g. edm-cifar10-32x32-cond-vp.pkl), a SiD "
            "network-snapshot .pkl / training-state .pt, or 'random:DIR' for random weights (smoke runs)")
    if e.snapshot.startswith("random:"):
        if not e.snapshot[7:]:
            bad("edm.snapshot", "is 'random:' without a folder; use e.g. 'random:runs/cache'")
        if not isinstance(e.network, dict) or not e.network:
            bad("edm.network", "must name the random network: {\"class_name\": \"training.networks.VPPrecond\", "
                "\"img_resolution\": 16, \"img_channels\": 3, \"label_dim\": 10, ...}")
        from .build import network_spec
        from .precond import UnsupportedNetworkError, build_network
        class_name, kwargs = network_spec(e.network)
        try:   # the class and every argument are known (building is cheap at smoke sizes, and checks all)
            net = build_network(class_name, **kwargs)
        except UnsupportedNetworkError as err:
            bad("edm.network", str(err))
        _check_labels(getattr(net, "label_dim", None), cfg, bad)
        return
    if not Path(e.snapshot).is_file():
        bad("edm.snapshot", f"= {e.snapshot!r} does not exist; give the EDM / SiD snapshot file")
    from .snapshot import SnapshotError, load_snapshot
    for key, entry in (("edm.entry", e.entry), ("edm.generator_entry", e.generator_entry)):
        if not entry:
            continue
        try:   # reads the records (never their code), checks the class, its kwargs and every weight's shape
            net = load_snapshot(e.snapshot, entry)
        except SnapshotError as err:
            bad(key, f"= {entry!r}: {err}")
        _check_labels(getattr(net, "label_dim", None), cfg, bad)


def _check_labels(label_dim, cfg, bad) -> None:
    if label_dim is None:
        bad("edm.snapshot", "is not a preconditioned network (VPPrecond / VEPrecond / EDMPrecond)")
    if label_dim != cfg.sfd.num_classes:
        bad("sfd.num_classes", f"is {cfg.sfd.num_classes} but the network is conditioned on {label_dim} classes "
            "(label_dim); class forgetting needs a class-conditional network with that many classes")


def validate(cfg, bad) -> None:
    s, e = cfg.sfd, cfg.edm
    _validate_classes(s, bad)
    if cfg.model.generator_init != "teacher":
        bad("model.generator_init", "is not used by model.kind 'edm': a two-stage start names the generator's "
            "entry of the snapshot in edm.generator_entry (e.g. 'G_ema' of a SiD training state)")
    for key in ("sigma_init", "sigma_min", "sigma_max", "rho"):
        v = getattr(e, key)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            bad(f"edm.{key}", f"must be a positive number, got {v!r}")
    if e.sigma_min >= e.sigma_max:
        bad("edm.sigma_min", f"({e.sigma_min}) must be below edm.sigma_max ({e.sigma_max})")
    if e.dropout is not None and not 0 <= e.dropout < 1:
        bad("edm.dropout", f"must be in [0, 1) or null (the snapshot's), got {e.dropout}")
    if e.precond not in ("", "VPPrecond", "VEPrecond", "EDMPrecond"):
        bad("edm.precond", f"must be '' (the snapshot's), 'VPPrecond', 'VEPrecond' or 'EDMPrecond', got {e.precond!r}")
    if e.grid_per_class < 1:
        bad("edm.grid_per_class", f"must be >= 1, got {e.grid_per_class}")
    if e.classifier and not Path(e.classifier).is_file():
        bad("edm.classifier", f"= {e.classifier!r} does not exist; give the reference train_classifier.py "
            "output (e.g. cifar10_resnet34.pth) or leave it empty to skip the UA evaluation")
    validate_fid(e, bad, "edm")           # the ddpm family's FID / IS checks, on the edm.* keys
    _validate_snapshot(cfg, bad)

