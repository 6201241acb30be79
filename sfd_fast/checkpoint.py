"""Checkpoints: safetensors weights + optimizer state, a JSON trainer state, written atomically.

Layout (one folder per checkpoint, all files written into a temporary folder first, fsynced, then
the folder is renamed into place and the `latest` pointer replaced; an interrupted save leaves the
previous checkpoint and pointer untouched):

    run_dir/checkpoints/step-00001000/
        generator.safetensors  fake_score.safetensors  generator_ema.safetensors
        optim_generator.safetensors  optim_fake_score.safetensors   (tensors of the Adam state)
        trainer_state.json     (step, images seen, counters, optimizer param_groups, data position)
        rng.safetensors        (the trainer's torch.Generator state)
    run_dir/checkpoints/latest  ("step-00001000")

Pickles are never read here; see sd/build.py for the explicit `trust_pickle` path.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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
    for role, sd in weights.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / f"{role}.safetensors"))
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

    Every file is fsynced, the folder is renamed into place (an existing one of the same name is
    moved aside first, never deleted before the new one is in place), then `latest` is replaced.
    """
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
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    atomic_write_text(ckpt_root / "latest", name)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    pointer = ckpt_root / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(f"no checkpoint in {run_dir} (missing {pointer}); nothing to resume")
    path = ckpt_root / pointer.read_text().strip()
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"checkpoint {path} named by {pointer} is incomplete or missing")
    return path


def load_checkpoint(path: Path) -> dict:
    """Returns {"weights": {role: sd}, "optim": {role: tensors}, "state": dict, "rng": tensor}."""
    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text())
    weights = {f.stem: load_file(str(f)) for f in path.glob("*.safetensors")
               if not f.stem.startswith("optim_") and f.stem != "rng"}
    optim = {f.stem[len("optim_"):]: load_file(str(f)) for f in path.glob("optim_*.safetensors")}
    rngs = load_file(str(path / "rng.safetensors"))
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
