"""Config checks of the digits family (called by config.validate through families.py)."""
from __future__ import annotations

from pathlib import Path


def validate(cfg, bad) -> None:
    """Class indices and the teacher checkpoint; `bad(key, message)` raises a ConfigError."""
    s = cfg.sfd
    if s.num_classes < 2:
        bad("sfd.num_classes", "must be >= 2")
    if not 0 <= s.forget_class < s.num_classes:
        bad("sfd.forget_class", f"must be a class in [0, {s.num_classes}), got {s.forget_class}")
    if s.override not in ("fixed", "random"):
        bad("sfd.override", f"must be 'fixed' or 'random', got {s.override!r}")
    if s.override == "fixed":
        if not 0 <= s.override_class < s.num_classes:
            bad("sfd.override_class", f"must be a class in [0, {s.num_classes}), got {s.override_class}")
        if s.override_class == s.forget_class:
            bad("sfd.override_class", f"equals sfd.forget_class ({s.forget_class}); the override must be "
                "a different, safe class (or set sfd.override to 'random')")
    if cfg.model.teacher != "auto" and not Path(cfg.model.teacher).exists():
        bad("model.teacher", f"points to {cfg.model.teacher}, which does not exist; give an existing "
            "teacher checkpoint or 'auto' to pretrain one")
