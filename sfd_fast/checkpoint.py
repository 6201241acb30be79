"""Checkpoints: safetensors weights + optimizer state, a JSON trainer state, written atomically.

Layout (one folder per checkpoint, all files written into a temporary folder first, fsynced, then
the folder is renamed into place and the `latest` pointer replaced; an interrupted save leaves the
previous checkpoint and pointer untouched):

    run_dir/checkpoints/step-00001000/
        generator.safetensors  fake_score.safetensors  generator_ema.safetensors
        optim_generator.safetensors  optim_fake_score.safetensors   (tensors of the Adam state)
        trainer_state.json     (step, images seen, counters, optimizer param_groups, data position)
        rng.safetensors        (the trainer's torch.Generator state)
        manifest.json          (written last: every file's name, size and SHA-256)
    run_dir/checkpoints/latest  ("step-00001000"; a hint: resume scans the step-* folders itself)

The manifest is verified before a checkpoint is used (checkpoint_status). SHA-256 (hashlib, with
the SHA extensions of current x86 and ARM CPUs about 1-2 GB/s) costs a few seconds on a multi-GB
Stable Diffusion checkpoint, small beside writing it, and catches any bit flip, truncation or
foreign file; sizes alone would miss a same-size corruption. Pickles are never read here; see
sd/build.py for the explicit `trust_pickle` path.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import DISK_FULL, UserError

log = logging.getLogger("sfd_fast")
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"step-(\d{8})")


class NoCheckpointError(UserError, FileNotFoundError):
    """No complete, verified checkpoint where one was asked for."""


class CheckpointFileError(RuntimeError):
    """A checkpoint file that does not read or does not fit its network; the message names the file
    and, for a shape or key mismatch, the tensor (resume logs it as the reason a checkpoint is skipped)."""


class DiskFullError(UserError):
    """The device filled up while a checkpoint was written; the previous checkpoint is intact."""


def one_line(e: BaseException) -> str:
    """An exception's whole message on one line (load_state_dict puts the tensor names on later lines)."""
    return " ".join(str(e).split())


def read_tensors(path: Path) -> dict:
    """safetensors load_file, with the file named in any error (a truncated file's SafetensorError
    does not say which file)."""
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointFileError(f"{path}: {type(e).__name__}: {one_line(e)}") from e


def load_weights_into(module: torch.nn.Module, state_dict: dict, path: Path) -> None:
    """module.load_state_dict(state_dict), naming the file and every mismatched tensor on failure."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        detail = one_line(e).split(":", 1)[-1].strip()    # drop "Error(s) in loading state_dict for X:"
        raise CheckpointFileError(f"{path} does not fit the {type(module).__name__}: {detail}") from e


def _is_disk_full(e: BaseException) -> bool:
    # OSError from Python's own writes; safetensors' Rust writer raises its own error type whose
    # message carries the OS error ("No space left on device", kind StorageFull)
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        return True
    return "No space left on device" in str(e) or "StorageFull" in str(e)


@contextlib.contextmanager
def disk_full_is_a_user_error(tmp: Path, ckpt_root: Path, name: str):
    """A full disk while writing checkpoint `name` (in `tmp`): the partial folder is removed (the
    space it held is given back) and the run stops with exit 2 and one paragraph naming the folder;
    the previous checkpoint is untouched (nothing is renamed before every file is written)."""
    try:
        yield
    except Exception as e:
        if not _is_disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(ckpt_root).free
        previous = [p.name for p in sorted(ckpt_root.glob("step-*"), reverse=True) if p.name != name]
        prev = f"the previous checkpoint {ckpt_root / previous[0]} is intact" if previous else "no earlier checkpoint exists"
        raise DiskFullError(
            f"no space left on the device of {ckpt_root} while writing checkpoint {name} "
            f"({free / 2**20:.1f} MiB free now); the unfinished folder was removed and {prev}. Free space "
            f"(or lower train.keep_checkpoints) and continue with --resume {ckpt_root.parent}") from None


def crash_point(phase: str, step: int | None = None) -> None:
    """Fault-injection hook for the tests: SFD_FAST_CRASH_AT='phase' or 'phase@step' (and optionally
    SFD_FAST_CRASH_RANK=r) kills this process with SIGKILL here, as `kill -9` would. Unset: a no-op."""
    want = os.environ.get("SFD_FAST_CRASH_AT")
    if not want:
        return
    name, _, at = want.partition("@")
    if name != phase or (at and step is not None and int(at) != step):
        return
    if os.environ.get("SFD_FAST_CRASH_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    os.kill(os.getpid(), signal.SIGKILL)


def check_finite(tensors: dict, what: str) -> None:
    """Refuse non-finite weights, naming the tensor (a NaN teacher or checkpoint would only skip updates)."""
    for name, v in tensors.items():
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UserError(f"{what}: tensor {name!r} holds non-finite values (NaN or Inf); "
                            "use a checkpoint written before the values went bad")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json: {relative path: {size, sha256}} of every file in `folder` (the last file written)."""
    folder = Path(folder)
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            files[f.relative_to(folder).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    (folder / MANIFEST).write_text(json.dumps({"hash": "sha256", "files": files}, indent=1))


def checkpoint_status(path: Path) -> str | None:
    """Why the checkpoint folder `path` is not usable (a short reason), or None when its manifest verifies.
    A folder without a manifest (written before manifests existed) is accepted unverified."""
    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        return "trainer_state.json is missing"
    m = path / MANIFEST
    if not m.is_file():
        log.warning("checkpoint %s has no %s (older sfd-fast): not verified", path, MANIFEST)
        return None
    try:
        files = json.loads(m.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{MANIFEST} is unreadable"
    for rel, entry in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != entry["size"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {entry['size']}"
        if _sha256(f) != entry["sha256"]:
            return f"{rel} does not match its SHA-256 in the manifest"
    return None


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data, indent: int | None = 1) -> Path:
    """The one atomic JSON writer: `data` as JSON (UTF-8, a final newline) through atomic_write_text."""
    path = Path(path)
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")
    return path


def save_safetensors_atomic(tensors: dict, path: Path, metadata: dict | None = None):
    """One file, atomically: write a temp file beside it, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimizer state_dict into safetensors-able tensors and JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict):
    state: dict = {}
    for key, v in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, dict], optimizers: dict, state: dict,
                    rng_state: torch.Tensor, task_rng_state: torch.Tensor | None = None) -> Path:
    """weights: {"generator": state_dict, ...}; optimizers: {"generator": opt, ...}."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with disk_full_is_a_user_error(tmp, ckpt_root, name):
        return _write_checkpoint(tmp, ckpt_root, name, step, weights, optimizers, state, rng_state, task_rng_state)


def _write_checkpoint(tmp, ckpt_root, name, step, weights, optimizers, state, rng_state, task_rng_state) -> Path:
    for role, sd in weights.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / f"{role}.safetensors"))
    crash_point("after_weights", step)
    opt_meta = {}
    for role, opt in optimizers.items():
        tensors, meta = optimizer_to_flat(opt)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / f"optim_{role}.safetensors"))
        opt_meta[role] = meta
    rngs = {"rng": rng_state.cpu()}
    if task_rng_state is not None:  # host generator of a task (prompt picks on an accelerator)
        rngs["task_rng"] = task_rng_state.cpu()
    save_file(rngs, str(tmp / "rng.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "optimizers": opt_meta}, indent=1))
    return publish_checkpoint_dir(tmp, ckpt_root, name)


def publish_checkpoint_dir(tmp: Path, ckpt_root: Path, name: str) -> Path:
    """Make a fully written temporary checkpoint folder the checkpoint `name`, atomically.

    The manifest is written last, every file is fsynced, the folder is renamed into place (an
    existing one of the same name is moved aside first, never deleted before the new one is in
    place), then `latest` is replaced.
    """
    step = int(name.split("-")[-1]) if STEP_DIR.fullmatch(name) else None
    crash_point("before_manifest", step)
    write_manifest(tmp)
    for dirpath, _, files in os.walk(tmp):
        for f in files:
            with open(Path(dirpath) / f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))
    final = ckpt_root / name
    old = None
    if final.exists():
        old = ckpt_root / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
    crash_point("before_rename", step)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    crash_point("before_latest", step)
    atomic_write_text(ckpt_root / "latest", name)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    crash_point("after_latest", step)
    return final


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The run's step-NNNNNNNN folders, newest first (whatever `latest` says)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)),
                  key=lambda p: p.name, reverse=True)


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint folder of `run_dir` whose manifest verifies (newer broken ones are logged)."""
    skipped = []
    for path in checkpoint_folders(run_dir):
        reason = checkpoint_status(path)
        if reason is None:
            for name, why in skipped:
                log.warning("skipped checkpoint %s: %s", name, why)
            return path
        skipped.append((path.name, reason))
    detail = "; ".join(f"{n}: {w}" for n, w in skipped) or "no step-* folder"
    raise NoCheckpointError(f"no usable checkpoint in {Path(run_dir) / 'checkpoints'} ({detail})")


def prune_checkpoints(run_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints (never the one `latest` names); returns the names.
    Each is renamed aside before it is deleted, so an interrupted prune never leaves a partial step-*."""
    if keep <= 0:
        return []
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    current = pointer.read_text().strip() if pointer.is_file() else None
    removed = []
    for path in checkpoint_folders(run_dir)[keep:]:
        if path.name == current:
            continue
        aside = root / f".old-{path.name}-{os.getpid()}"
        os.replace(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(path.name)
    return removed


def remove_stale_temporaries(run_dir: Path) -> list[str]:
    """Remove leftovers of interrupted writes (.tmp-* / .old-* folders and files); call under the run lock."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith((".tmp-", ".old-")) or (p.name.startswith(".") and ".tmp-" in p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(str(p))
    return removed


def load_checkpoint(path: Path) -> dict:
    """Returns {"weights": {role: sd}, "optim": {role: tensors}, "state": dict, "rng": tensor}.
    Non-finite weights or optimizer state are refused with the tensor's name."""
    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text())
    weights = {f.stem: read_tensors(f) for f in path.glob("*.safetensors")
               if not f.stem.startswith("optim_") and f.stem != "rng"}
    optim = {f.stem[len("optim_"):]: read_tensors(f) for f in path.glob("optim_*.safetensors")}
    for role, sd in {**weights, **{f"optim_{r}": t for r, t in optim.items()}}.items():
        check_finite(sd, f"checkpoint {path / (role + '.safetensors')}")
    rngs = read_tensors(path / "rng.safetensors")
    return {"weights": weights, "optim": optim, "state": state, "rng": rngs["rng"],
            "task_rng": rngs.get("task_rng")}


def checkpoint_dir(path: Path) -> Path:
    """A checkpoint folder from a run directory (its latest checkpoint) or a checkpoint folder."""
    path = Path(path)
    return latest_checkpoint(path) if (path / "checkpoints").is_dir() else path


def generator_weights_file(ckpt: Path, raw: bool = False) -> Path:
    """The generator weights to sample or start from: the EMA if the run kept one (unless `raw`),
    else the raw generator. `ckpt` is a checkpoint folder or a run directory (its latest)."""
    ckpt = checkpoint_dir(ckpt)
    ema = ckpt / "generator_ema.safetensors"
    f = ema if (ema.is_file() and not raw) else ckpt / "generator.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist; {ckpt} is not a complete sfd-fast checkpoint")
    return f
