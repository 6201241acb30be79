"""Config checks of the digits family (called by config.validate through families.py)."""
from __future__ import annotations

from pathlib import Path

from ..conditions import validate_class_targets


def validate(cfg, bad) -> None:
    """Class indices and the teacher checkpoint; `bad(key, message)` raises a ConfigError."""
    validate_class_targets(cfg.sfd, bad)
    if cfg.model.teacher != "auto" and not Path(cfg.model.teacher).exists():
        bad("model.teacher", f"points to {cfg.model.teacher}, which does not exist; give an existing "
            "teacher checkpoint or 'auto' to pretrain one")
