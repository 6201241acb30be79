"""Config checks of the digits family (called by config.validate through families.py)."""
from __future__ import annotations

from pathlib import Path


def forget_targets(s) -> tuple[list[int], list[int]]:
    """(forget classes, override classes) of an SFDConfig: `sfd.forget_classes` / `override_classes`,
    or the single `forget_class` / `override_class` as a list of one."""
    forget = list(s.forget_classes) or [s.forget_class]
    overrides = list(s.override_classes) or ([s.override_class] if not s.forget_classes else [])
    return forget, overrides


def validate_class_targets(s, bad) -> None:
    """Forget / override classes of any class-conditional family (digits, ddpm): in range, distinct,
    one override per target that is not itself forgotten."""
    def is_class(c):
        return isinstance(c, int) and not isinstance(c, bool) and 0 <= c < s.num_classes
    if s.num_classes < 2:
        bad("sfd.num_classes", "must be >= 2")
    forget, overrides = forget_targets(s)
    key = "sfd.forget_classes" if s.forget_classes else "sfd.forget_class"
    for c in forget:
        if not is_class(c):
            bad(key, f"must hold classes in [0, {s.num_classes}), got {c!r}")
    repeated = sorted({c for c in forget if forget.count(c) > 1})
    if repeated:
        bad(key, f"repeats class(es) {repeated}; list each forgotten class once")
    if len(forget) >= s.num_classes:
        bad(key, f"forgets all {s.num_classes} classes; at least one class must remain")
    if s.override not in ("fixed", "random"):
        bad("sfd.override", f"must be 'fixed' or 'random', got {s.override!r}")
    if s.override != "fixed":
        return
    okey = "sfd.override_classes" if s.forget_classes else "sfd.override_class"
    if len(overrides) != len(forget):
        bad(okey, f"needs one override class per forgotten class ({len(forget)}: {forget}), got "
            f"{overrides}; or set sfd.override to 'random'")
    for f, o in zip(forget, overrides):
        if not is_class(o):
            bad(okey, f"must hold classes in [0, {s.num_classes}), got {o!r}")
        if o == f:
            which = "sfd.forget_classes entry" if s.forget_classes else "sfd.forget_class"
            bad(okey, f"equals {which} ({f}); the override must be a different, safe class "
                "(or set sfd.override to 'random')")
        if o in forget:
            bad(okey, f"overrides class {f} with {o}, which is forgotten too; choose a class that remains")


def validate(cfg, bad) -> None:
    """Class indices and the teacher checkpoint; `bad(key, message)` raises a ConfigError."""
    validate_class_targets(cfg.sfd, bad)
    if cfg.model.teacher != "auto" and not Path(cfg.model.teacher).exists():
        bad("model.teacher", f"points to {cfg.model.teacher}, which does not exist; give an existing "
            "teacher checkpoint or 'auto' to pretrain one")
