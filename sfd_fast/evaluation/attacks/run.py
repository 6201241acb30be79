"""`sfd-fast attack RUN_DIR` and the end-of-run hook (eval.attacks.enabled): run the family's
attacks on a finished run, write RUN_DIR/attacks.json (everything, with per-subject details and
relearning curves) and the summary into eval.json under "attacks" (atomic rewrites)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from ...checkpoint import atomic_write_text
from ...config import Config, ConfigError, _build, apply_overrides, read_json_file
from .config import validate_attacks

log = logging.getLogger("sfd_fast")


def summary(result: dict) -> dict:
    """attacks.json without the per-subject details (what eval.json carries)."""
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "details"}
        return node
    return strip(result)


def attack_finished_run(cfg, run_dir: Path, device) -> dict:
    """The family's attacks on the run in `run_dir` (its newest checkpoint), written to attacks.json
    and eval.json; returns the summary."""
    from ...families import family, resolve
    fam = family(cfg.model.kind)
    if fam.attack is None:
        raise ConfigError(f"eval.attacks: no attacks are built for {cfg.model.kind!r} runs yet")
    run_dir = Path(run_dir)
    t0 = time.time()
    from ...errors import UserError
    try:
        result = resolve(fam.attack)(cfg, run_dir, device)
    except (FileNotFoundError, UnicodeDecodeError) as e:   # a prompt / weights file named by the config
        raise UserError(str(e)) from None
    result["wall_seconds"] = round(time.time() - t0, 1)
    atomic_write_text(run_dir / "attacks.json", json.dumps(result, indent=1))
    eval_path = run_dir / "eval.json"
    metrics = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
    metrics["attacks"] = summary(result)
    atomic_write_text(eval_path, json.dumps(metrics, indent=1))
    from .table import text_table
    log.info("attacks (%.0f s): %s\n%s", result["wall_seconds"], run_dir / "attacks.json", text_table(result))
    return metrics["attacks"]


def read_attack_config(run_dir: Path, overrides: list[str]):
    """The run's config.json with `--set eval.attacks.*` overrides, keys and types checked, the
    attack values validated (the run's other values were checked when it started)."""
    for item in overrides:
        if not item.split("=", 1)[0].strip().startswith("eval.attacks."):
            raise ConfigError(f"sfd-fast attack --set {item!r}: only eval.attacks.* keys can be changed here "
                              "(the run's model and recipe are what is attacked)")
    f = Path(run_dir) / "config.json"
    if not f.is_file():
        raise ConfigError(f"{run_dir} has no config.json; is it a sfd-fast run directory?")
    data = apply_overrides(read_json_file(f, "run config", "it is written by sfd_fast/train.py"), overrides)
    source = f"{f}" + (" (with --set overrides)" if overrides else "")
    cfg = _build(Config, data, "", source)

    def bad(key, msg):
        raise ConfigError(f"{source}: '{key}' {msg}")
    from ...domains import _numbers
    for key, value in _numbers(cfg.eval.attacks, "eval.attacks."):
        if value != value or value in (float("inf"), float("-inf")):
            bad(key, f"must be a finite number, got {value!r}")
    validate_attacks(cfg.eval.attacks, bad, cfg.model.kind)   # `during` is about training: not checked here
    return cfg


def main(argv=None) -> None:
    """`sfd-fast attack RUN_DIR [--set eval.attacks.KEY=VALUE ...] [--device DEV]`."""
    p = argparse.ArgumentParser(prog="sfd-fast attack", description=(
        "worst-case forgetting: attack a finished run and references that never knew the forgotten "
        "class with the same budget (docs/robustness.md); writes RUN_DIR/attacks.json and eval.json['attacks']"))
    p.add_argument("run_dir")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="eval.attacks.KEY=VALUE")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the run's run.device)")
    args = p.parse_args(argv)
    root = logging.getLogger("sfd_fast")   # progress and the table on stdout (as a training run logs)
    root.setLevel(logging.INFO)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    cfg = read_attack_config(Path(args.run_dir), args.overrides)
    from ...engine import resolve_device
    device = resolve_device(args.device or cfg.run.device)
    attack_finished_run(cfg, Path(args.run_dir), device)
