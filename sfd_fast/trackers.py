"""Experiment trackers: TensorBoard and Weights & Biases, optional, written by rank 0 only.

`log.trackers: ["tensorboard", "wandb"]` (default: none). What each receives, from values the
trainer already holds on the host (no extra sync):

  every log tick     the stats.jsonl record's numbers: losses per network and target, throughput,
                     skipped updates, peak memory, learning rates (tag = the stats.jsonl key)
  every eval tick    the "eval/<metric>" numbers of that stats.jsonl record
  every grid tick    the sample grid PNG as an image ("samples")
  once at start      the resolved config and the trainer's acceleration plan (engine/plan.py; the same
                     as RUN_DIR/acceleration_plan.json)
  at the end         eval.json's numbers as "final/<metric>"

Where they write: TensorBoard into RUN_DIR/tensorboard (a resume reopens the same folder with
`purge_step` = the checkpoint's step + 1, so the steps logged after that checkpoint by the interrupted
run are hidden, as trim_stats drops them from stats.jsonl); W&B into RUN_DIR/wandb with a run id
stored in RUN_DIR/wandb_run_id on the first start and reused on every resume (`resume="allow"`).
W&B reads its own environment: WANDB_MODE=offline needs no network (how the tests run it),
WANDB_API_KEY / WANDB_PROJECT / WANDB_ENTITY as usual; `log.wandb_project` / `log.wandb_entity`
are used when those variables are unset.

A tracker that is asked for but not installed stops the run before anything is written
(`check_installed`, called by train.py before the run directory is opened), with the pip extra to install.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

KNOWN = ("tensorboard", "wandb")
INSTALL = {"tensorboard": "pip install -e '.[tensorboard]' (pins tensorboard==2.21.0)",
           "wandb": "pip install -e '.[wandb]' (pins wandb==0.31.0)"}
WANDB_ID_FILE = "wandb_run_id"
TB_DIR = "tensorboard"


@dataclass
class LogConfig:
    trackers: list = field(default_factory=list)   # any of "tensorboard", "wandb"
    wandb_project: str = "sfd-fast"                # used when WANDB_PROJECT is unset
    wandb_entity: str = ""                         # "" = W&B's default entity (or WANDB_ENTITY)


def validate_trackers(log_cfg: LogConfig, bad) -> None:
    """Config check (config.validate): known tracker names, no duplicates."""
    unknown = [t for t in log_cfg.trackers if t not in KNOWN]
    if unknown:
        bad("log.trackers", f"has unknown tracker(s) {unknown}; choose from {list(KNOWN)}")
    if len(set(log_cfg.trackers)) != len(log_cfg.trackers):
        bad("log.trackers", f"lists a tracker twice: {log_cfg.trackers}")
    if "wandb" in log_cfg.trackers and not log_cfg.wandb_project.strip():
        bad("log.wandb_project", "must be a non-empty W&B project name")


def check_installed(names) -> None:
    """Every tracker asked for imports, else a UserError naming the extra to install (before any write)."""
    for name in names:
        try:
            importlib.import_module(name)
            if name == "tensorboard":
                importlib.import_module("torch.utils.tensorboard")   # torch's writer needs tensorboard
        except ImportError as e:
            raise UserError(f"log.trackers asks for {name!r}, but it cannot be imported ({e}); install it with "
                            f"`{INSTALL[name]}`, or remove {name!r} from log.trackers") from None


def numbers(rec: dict) -> dict:
    """The finite numbers of a stats.jsonl record, without its step and wall time."""
    return {k: float(v) for k, v in rec.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class TensorBoardTracker:
    def __init__(self, run_dir: Path, start_step: int, config: dict, plan: dict):
        from torch.utils.tensorboard import SummaryWriter
        # on resume, events the interrupted run wrote after its checkpoint (steps > start_step) are
        # hidden: purge_step is the first step of the resumed run
        self.writer = SummaryWriter(log_dir=str(run_dir / TB_DIR), purge_step=start_step + 1 if start_step else None)
        if start_step == 0:
            self.writer.add_text("config", _as_markdown_json(config), 0)
            self.writer.add_text("acceleration_plan", _as_markdown_json(plan), 0)

    def scalars(self, rec: dict) -> None:
        for k, v in numbers(rec).items():
            self.writer.add_scalar(k, v, global_step=int(rec["step"]), walltime=rec.get("time"))
        self.writer.flush()

    def image(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        self.writer.add_image(tag, pixels, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, start_step: int, config: dict, plan: dict, log_cfg: LogConfig):
        import wandb
        from .checkpoint import atomic_write_text
        self.wandb = wandb
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        if not id_file.is_file():
            atomic_write_text(id_file, run_id + "\n")     # a resume finds the same W&B run
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or log_cfg.wandb_project,
                entity=os.environ.get("WANDB_ENTITY") or log_cfg.wandb_entity or None,
                name=config.get("run", {}).get("name"), id=run_id, resume="allow", dir=str(run_dir),
                config={**config, "acceleration_plan": plan})
        except Exception as e:   # no API key online, a refused project, ...: say what to do
            raise UserError(f"log.trackers 'wandb': wandb.init failed ({type(e).__name__}: {e}); log in with "
                            "`wandb login`, set WANDB_MODE=offline to write the run locally (sync it later "
                            "with `wandb sync`), or remove 'wandb' from log.trackers") from None

    def scalars(self, rec: dict) -> None:
        self.run.log(numbers(rec), step=int(rec["step"]))

    def image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)   # W&B marks a run that ended in an error as failed


class Trackers:
    """The trackers asked for in log.trackers, fanned out. `Trackers()` (no sinks) is what the trainer
    holds when none is asked for and on ranks other than 0: every call is then a no-op."""

    def __init__(self, sinks=()):
        self.sinks = list(sinks)

    def scalars(self, rec: dict) -> None:
        for s in self.sinks:
            s.scalars(rec)

    def image(self, tag: str, path: Path, step: int) -> None:
        if Path(path).is_file():
            for s in self.sinks:
                s.image(tag, Path(path), step)

    def final_eval(self, eval_json: Path, step: int) -> None:
        """eval.json's numbers as final/<key> (nested keys joined by '/')."""
        if not Path(eval_json).is_file():
            return
        flat = flatten(json.loads(Path(eval_json).read_text()))
        self.scalars({"step": step, **{f"final/{k}": v for k, v in flat.items()}})

    def close(self, failed: bool = False) -> None:
        sinks, self.sinks = self.sinks, []
        for s in sinks:
            s.close(failed)


def open_trackers(log_cfg: LogConfig, run_dir: Path, start_step: int, config: dict, rank0: bool,
                  plan: dict) -> Trackers:
    """The trackers of log.trackers on rank 0 (TensorBoard, W&B in that order), no sinks elsewhere.
    `plan`: the trainer's acceleration plan (engine/plan.py, `plan.as_dict()`)."""
    trackers = Trackers()
    if not rank0:
        return trackers
    run_dir = Path(run_dir)
    plan = {"source": "acceleration plan", **plan}
    try:
        for name in log_cfg.trackers:
            if name == "tensorboard":
                trackers.sinks.append(TensorBoardTracker(run_dir, start_step, config, plan))
            elif name == "wandb":
                trackers.sinks.append(WandbTracker(run_dir, start_step, config, plan, log_cfg))
    except BaseException:
        trackers.close()
        raise
    return trackers


def flatten(d: dict, prefix: str = "", sep: str = "/") -> dict:
    """Nested dicts -> one level, keys joined by `sep` (eval.json, configs)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}{sep}", sep))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _as_markdown_json(obj) -> str:
    """TensorBoard's text plugin renders markdown: a JSON block indented as code keeps its layout."""
    return "\n".join("    " + line for line in json.dumps(obj, indent=1).splitlines())
