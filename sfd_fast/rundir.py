"""The run directory: its lock, the resume rules, the config history, stats trimming, path checks.

    .lock                 pid + host of the process that holds the run (an flock held for the run's
                          life: released by the kernel when that process dies, so a lock file naming a
                          dead process is stale and is taken over with a warning)
    config.json           the run's config, paths resolved to absolute (resume works from any cwd)
    config_history.jsonl  one line per resume: the step and the keys it changed (old, new)

Only the keys in RESUMABLE may change on `--resume`; any other change is refused, naming the key.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from .checkpoint import atomic_write_json, atomic_write_text, checkpoint_folders
from .config import Config, ConfigError, load_config, read_run_config
from .errors import UserError
from .trackers import flatten

log = logging.getLogger("sfd_fast")

# keys that change the length, cadences, evaluation or logging of a run, never its math or its draws
RESUMABLE = ("train.total_steps", "train.log_every", "train.checkpoint_every", "train.sample_every",
             "log.trackers", "train.progress", "train.keep_checkpoints", "train.max_consecutive_skips",
             "eval.enabled", "eval.samples_per_class", "eval.teacher_steps", "train.time_limit_s",
             "eval.targets.fd_ratio", "eval.targets.ua", "eval.targets.retained")
HISTORY = "config_history.jsonl"


class RunLock:
    """An exclusive lock on a run directory for this process's lifetime (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(
                f"run directory {self.path.parent} is in use by pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} (since {holder.get('started', '?')}; lock {self.path}); wait for "
                "that run to end or use another --run-dir") from None
        previous = _read_holder(fd)
        if previous.get("pid") not in (None, os.getpid()):
            log.warning("stale lock %s: pid %s on host %s (started %s) is gone; taking the run directory over",
                        self.path, previous.get("pid"), previous.get("host"), previous.get("started"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)      # an empty lock file: released cleanly, not stale
            os.close(self.fd)             # closing drops the flock
            self.fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


def check_run_dir_usable(run_dir: Path) -> None:
    """Refuse a run directory that is a file or cannot be written, before anything is written."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} is a file; pass --run-dir (or run.root / run.name) naming a folder")
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"run directory {run_dir}: {probe} is a file, not a folder; choose another --run-dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"run directory {run_dir}: {probe} is not writable by this user; choose another "
                        "--run-dir (or run.root) or fix its permissions")


def resume_config(run_dir: Path, overrides: list[str]) -> tuple[Config, dict]:
    """The stored config with `--set` overrides applied, and {key: [old, new]} of what changed.
    A change to a key outside RESUMABLE, or a run with no checkpoint yet, is refused before anything is written."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.json there; is it a run directory?")
    stored = read_run_config(run_dir)
    cfg = load_config(cfg_path, overrides)
    old, new = flatten(stored.to_dict(), sep="."), flatten(cfg.to_dict(), sep=".")
    changes = {k: [old.get(k), v] for k, v in new.items() if old.get(k) != v}
    refused = [k for k in changes if k not in RESUMABLE]
    if refused:
        detail = ", ".join(f"'{k}' ({changes[k][0]!r} -> {changes[k][1]!r})" for k in refused)
        raise ConfigError(f"--resume {run_dir}: {detail} cannot change on resume; only {', '.join(RESUMABLE)} "
                          f"may. To change it, start a new run: --config {cfg_path} --run-dir NEW_DIR --set ...")
    if not checkpoint_folders(run_dir):
        raise UserError(f"--resume {run_dir}: the run has no checkpoint yet (it stopped before its first one, "
                        f"at step {cfg.train.checkpoint_every}); start it again with --config {cfg_path} "
                        f"--run-dir {run_dir}")
    return cfg, changes


def record_resume(run_dir: Path, cfg: Config, changes: dict, step: int) -> None:
    """Append the resume's changes to config_history.jsonl and update config.json atomically."""
    run_dir = Path(run_dir)
    with open(run_dir / HISTORY, "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_at_step": step,
                            "changes": changes}) + "\n")
    if changes:
        atomic_write_json(run_dir / "config.json", cfg.to_dict())


def resolve_paths(cfg: Config) -> None:
    """Make the config's paths absolute (in place) so a stored config means the same from any cwd.
    Paths that do not exist (hub ids, 'auto', 'teacher', empty) are left as they are, except run.root."""
    cfg.run.root = str(Path(cfg.run.root).resolve())
    m, p = cfg.model, cfg.prompts

    def fix(value: str) -> str:
        return str(Path(value).resolve()) if value and Path(value).exists() else value
    m.teacher = m.teacher if m.teacher == "auto" else fix(m.teacher)
    m.generator_init = m.generator_init if m.generator_init == "teacher" else fix(m.generator_init)
    m.pretrained = fix(m.pretrained)
    cfg.engine.deepspeed_config = fix(cfg.engine.deepspeed_config)
    d = cfg.ddpm
    if d.checkpoint.startswith("random:"):      # random weights written once to DIR
        d.checkpoint = "random:" + str(Path(d.checkpoint[len("random:"):]).resolve())
    else:
        d.checkpoint = fix(d.checkpoint)
    d.classifier, d.fid_real_dir, d.inception_weights = fix(d.classifier), fix(d.fid_real_dir), fix(d.inception_weights)
    for k in ("remain_file", "forget_file", "val_file", "override_file", "pos_file", "neg_file"):
        setattr(p, k, fix(getattr(p, k)))


def trim_stats(run_dir: Path, step: int) -> int:
    """Drop stats.jsonl records past `step` (written after the checkpoint a resume starts from)."""
    path = Path(run_dir) / "stats.jsonl"
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            ok = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            ok = False            # a line cut by a kill
        kept.append(line) if ok else None
        dropped += not ok
    if dropped:
        atomic_write_text(path, "".join(f"{ln}\n" for ln in kept))
        log.info("stats.jsonl: dropped %d records past step %d", dropped, step)
    return dropped


def load_newest_usable(backend, run_dir: Path) -> tuple[dict, Path]:
    """Load the newest checkpoint that verifies (manifest) and loads (backend.load); newer ones that do
    not are logged with the reason. Under DeepSpeed every rank must agree that a load worked, so the
    outcome is all-reduced before the next candidate is tried. None usable: a UserError listing why."""
    from .checkpoint import NoCheckpointError, checkpoint_status, one_line
    skipped = []
    for path in checkpoint_folders(run_dir):
        reason = checkpoint_status(path)
        state = None
        if reason is None:
            try:
                state = backend.load(path)
            except Exception as e:   # any failure to read a checkpoint: try the previous one
                reason = f"does not load ({type(e).__name__}: {one_line(e)})"   # names file + tensor
        if _all_ranks_ok(reason is None, backend):
            for name, why in skipped:
                log.warning("resume: skipped newer checkpoint %s: %s", name, why)
            if backend.is_rank0:
                log.info("resume: using %s%s", path.name, f" (skipped {len(skipped)} newer)" if skipped else "")
            return state, path
        skipped.append((path.name, reason or "failed on another rank"))
    detail = "; ".join(f"{n}: {w}" for n, w in skipped) or "no step-* folder"
    raise NoCheckpointError(f"--resume {run_dir}: no usable checkpoint ({detail}); start a new run with "
                            f"--config {Path(run_dir) / 'config.json'} --run-dir NEW_DIR")


def _all_ranks_ok(ok: bool, backend) -> bool:
    if backend.world == 1:
        return ok
    import torch
    flag = torch.tensor([1.0 if ok else 0.0], device=backend.trainer.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() == 1.0)
