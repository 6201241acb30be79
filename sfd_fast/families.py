"""The model families, by `model.kind`: where each one's parts builder, config checks and end-of-run
evaluation live.

Entries are "module:function" strings imported on first use, so that reading a config never imports
a family's heavy dependencies (diffusers for Stable Diffusion), and so that the core (config.py)
depends on no family: dependencies run families -> core, never back.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Family:
    build: str                      # build(cfg) -> trainer.RunParts
    checks: str                     # validate(cfg, bad): value checks before anything is built
    evaluate: Optional[str] = None  # evaluate_run(cfg, parts, trainer, run_dir) -> dict (rank 0)
    # make_evaluate_during(cfg, parts, device) -> callable(generator) -> {metric: float}, called by the
    # trainer every eval.every steps on a fixed small sample set (written to stats.jsonl)
    evaluate_during: Optional[str] = None


FAMILIES: dict[str, Family] = {
    "digits": Family(build="sfd_fast.digits.build:build_parts", checks="sfd_fast.digits.checks:validate",
                     evaluate="sfd_fast.digits.evaluate:evaluate_run",
                     evaluate_during="sfd_fast.digits.evaluate:make_evaluate_during"),
    "stable_diffusion": Family(build="sfd_fast.sd.build:build_parts", checks="sfd_fast.sd.checks:validate",
                               evaluate="sfd_fast.sd.evaluate:evaluate_run"),
}


def resolve(ref: str) -> Callable:
    """'package.module:function' -> the function."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def family(kind: str) -> Family:
    if kind not in FAMILIES:
        raise KeyError(f"unknown model.kind {kind!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[kind]


def family_checks(kind: str) -> Callable:
    return resolve(family(kind).checks)
