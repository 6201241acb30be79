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
    sample: Optional[str] = None    # `sfd-fast sample --run D ...` for this family's runs: main(argv)
    export: Optional[str] = None    # `sfd-fast export --run D ...`: main(argv)
    # make_evaluate_during(cfg, parts, device) -> callable(generator) -> {metric: float}, called by the
    # trainer every eval.every steps on a fixed small sample set (written to stats.jsonl)
    evaluate_during: Optional[str] = None
    attack: Optional[str] = None    # run_attacks(cfg, run_dir, device) -> dict (evaluation/attacks/run.py)
    surrogate: Optional[str] = None  # get_surrogate(cfg) -> (classifier, meta): train.adversarial's guide


FAMILIES: dict[str, Family] = {
    "digits": Family(build="sfd_fast.digits.build:build_parts", checks="sfd_fast.digits.checks:validate",
                     evaluate="sfd_fast.digits.evaluate:evaluate_run",
                     evaluate_during="sfd_fast.digits.evaluate:make_evaluate_during",
                     attack="sfd_fast.digits.robustness:run_attacks",
                     surrogate="sfd_fast.digits.surrogate:get_surrogate"),
    "stable_diffusion": Family(build="sfd_fast.sd.build:build_parts", checks="sfd_fast.sd.checks:validate",
                               evaluate="sfd_fast.sd.evaluate:evaluate_run",
                               sample="sfd_fast.sd.cli:sample_main", export="sfd_fast.sd.cli:export_main",
                               attack="sfd_fast.sd.robustness:run_attacks"),
    "ddpm": Family(build="sfd_fast.ddpm.build:build_parts", checks="sfd_fast.ddpm.checks:validate",
                   evaluate="sfd_fast.ddpm.evaluate:evaluate_run",
                   sample="sfd_fast.ddpm.sample:main", export="sfd_fast.ddpm.sample:export_main"),
    "edm": Family(build="sfd_fast.edm.build:build_parts", checks="sfd_fast.edm.checks:validate",
                  evaluate="sfd_fast.edm.evaluate:evaluate_run",
                  sample="sfd_fast.edm.sample:main", export="sfd_fast.edm.export:main"),
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


def _run_kind(argv: list[str]) -> str | None:
    """model.kind of the run named by `--run D` / `--run=D` in argv (None when absent or unreadable:
    the family command's own parser then reports the problem)."""
    import json
    from pathlib import Path
    run = None
    for i, a in enumerate(argv):
        if a == "--run" and i + 1 < len(argv):
            run = argv[i + 1]
        elif a.startswith("--run="):
            run = a.split("=", 1)[1]
    if run is None:
        return None
    try:
        return json.loads((Path(run) / "config.json").read_text(encoding="utf-8"))["model"]["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _dispatch(command: str, argv: list[str]):
    from .errors import check_output_args
    check_output_args(argv)     # `--out` below an existing file: exit 2 naming it, before any work
    kind = _run_kind(argv) or "stable_diffusion"
    ref = getattr(family(kind), command) if kind in FAMILIES else None
    if ref is None:
        have = [k for k, f in FAMILIES.items() if getattr(f, command)]
        raise SystemExit(f"error: `sfd-fast {command}` works on {' and '.join(have)} runs; this run is a {kind!r} run")
    return resolve(ref)(argv)


def sample_main(argv):
    """`sfd-fast sample`: the run's family's sampler (read from its config.json)."""
    return _dispatch("sample", argv)


def export_main(argv):
    """`sfd-fast export`: the run's family's exporter (read from its config.json)."""
    return _dispatch("export", argv)
