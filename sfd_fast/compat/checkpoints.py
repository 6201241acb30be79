"""Reference checkpoints -> sfd-fast files (spec §4.2).

Reads, only with `trust_pickle=True` (unpickling runs code named by the file: a malicious pickle
can execute anything, so it must come from a source you trust, e.g. your own runs or the SiD-LSG
release):
  * snapshot pickles `network-snapshot-*.pkl` = {"ema": module} (SD: a diffusers
    UNet2DConditionModel; SiD-EDM: an EDMPrecond, which needs the SiD repository on sys.path);
  * `training-state-*.pt` = torch.save(dict(fake_score=module, G=module, G_ema=module,
    fake_score_optimizer_state=..., g_optimizer_state=...)).
Writes (atomically: a temporary file/folder beside the target, fsynced, then renamed):
  * a snapshot -> one safetensors state dict (what `model.generator_init` accepts), or with
    to="diffusers" a diffusers UNet folder (config.json + safetensors weights);
  * a training state -> a folder with generator.safetensors, generator_ema.safetensors (only if
    G_ema is a separate module), fake_score.safetensors, optim_generator.safetensors /
    optim_fake_score.safetensors (optimizer tensors) and reference_state.json (optimizer
    param_groups and scalars, the source). Its generator weights start an sfd-fast run; it is not
    a resumable trainer checkpoint (the reference stores no step, RNG or data position).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from ..checkpoint import _fsync_dir, atomic_write_json, save_safetensors_atomic

__all__ = ["load_reference_snapshot", "load_reference_training_state", "convert_reference_checkpoint"]

_WHY = ("unpickling executes code named inside the file, so a pickle from an untrusted source can run "
        "anything on this machine. Pass trust_pickle=True only for files you trust (your own runs, the "
        "SiD-LSG/SFD releases)")


def _require_trust(path: Path, trust_pickle: bool, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if not trust_pickle:
        raise ValueError(f"refusing to read {str(path)!r} without trust_pickle=True: it is a {what}, and "
                         f"{_WHY}. Converting it once to safetensors (convert_reference_checkpoint) avoids "
                         f"pickles afterwards.")


def _unpickle(path: Path, loader):
    try:
        return loader()
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"{path}: the pickle refers to module {err.name!r}, which is not importable. SiD-EDM pickles need "
            f"the SiD repository (torch_utils, training) on sys.path; SD pickles need diffusers.") from err


def load_reference_snapshot(path, trust_pickle: bool = False) -> torch.nn.Module:
    """The network of a reference snapshot pickle {"ema": module} (on the CPU)."""
    path = Path(path)
    _require_trust(path, trust_pickle, "reference snapshot pickle")

    def load():
        with open(path, "rb") as f:
            return pickle.load(f)  # noqa: S301  (trust_pickle checked above)
    obj = _unpickle(path, load)
    net = obj.get("ema") if isinstance(obj, dict) else None
    if not isinstance(net, torch.nn.Module):
        keys = list(obj)[:5] if isinstance(obj, dict) else "-"
        raise ValueError(f"{path}: expected a pickle of {{'ema': module}} (a reference snapshot); got "
                         f"{type(obj).__name__} with keys {keys}")
    return net.cpu()


def load_reference_training_state(path, trust_pickle: bool = False) -> dict:
    """The dict of a reference `training-state-*.pt` (modules and optimizer states, on the CPU)."""
    path = Path(path)
    _require_trust(path, trust_pickle, "reference training-state file (a torch pickle)")
    state = _unpickle(path, lambda: torch.load(path, map_location="cpu", weights_only=False))
    missing = [k for k in ("fake_score", "G") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path}: not a reference training state; missing {missing} (expected keys fake_score, "
                         f"G, G_ema, fake_score_optimizer_state, g_optimizer_state)")
    return state


def _state_dict(module: torch.nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def _flat_optimizer(opt_state: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for idx, st in opt_state.get("state", {}).items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": opt_state.get("param_groups", []), "scalars": scalars}


def _publish_dir(tmp: Path, final: Path) -> Path:
    for dirpath, _, files in os.walk(tmp):
        for name in files:
            with open(Path(dirpath) / name, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def _fresh_tmp(out: Path) -> Path:
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    return tmp


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the folder of {out} does not exist")


def convert_reference_checkpoint(path, out, trust_pickle: bool = False, to: str = "safetensors",
                                 force: bool = False) -> Path:
    """Convert a reference snapshot pickle or training-state file to sfd-fast files; returns `out`.

    path: `*.pkl` snapshot {"ema": module} or `training-state-*.pt`.
    to: "safetensors" (a .safetensors file for a snapshot, a folder for a training state) or
        "diffusers" (snapshot of a diffusers model only: a diffusers model folder).
    Nothing is written before the input has been read and checked.
    """
    path, out = Path(path), Path(out)
    if to not in ("safetensors", "diffusers"):
        raise ValueError(f"to={to!r}; expected 'safetensors' or 'diffusers'")
    _check_target(out, force)
    if path.suffix.lower() == ".pt":
        if to != "safetensors":
            raise ValueError(f"{path} is a training state; only to='safetensors' (a folder of state dicts) applies")
        return _convert_training_state(load_reference_training_state(path, trust_pickle), path, out)
    net = load_reference_snapshot(path, trust_pickle)
    meta = {"source": str(path), "class": f"{type(net).__module__}.{type(net).__qualname__}"}
    if to == "diffusers":
        if not hasattr(net, "save_pretrained"):
            raise ValueError(f"{path}: the snapshot holds a {meta['class']}, not a diffusers model; use "
                             f"to='safetensors'")
        tmp = _fresh_tmp(out)
        net.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(tmp / "sfd_compat_source.json", meta)
        return _publish_dir(tmp, out)
    if hasattr(net, "config") and hasattr(net.config, "items"):
        meta["config"] = json.dumps(dict(net.config), default=str)
    save_safetensors_atomic(_state_dict(net), out, metadata=meta)
    return out


def _convert_training_state(state: dict, path: Path, out: Path) -> Path:
    from safetensors.torch import save_file

    tmp = _fresh_tmp(out)
    tmp.mkdir()
    nets = {"generator": state["G"], "fake_score": state["fake_score"]}
    ema = state.get("G_ema")
    if ema is not None and ema is not state["G"]:
        nets["generator_ema"] = ema
    for role, net in nets.items():
        save_file(_state_dict(net), str(tmp / f"{role}.safetensors"))
    optim_meta = {}
    for role, key in (("generator", "g_optimizer_state"), ("fake_score", "fake_score_optimizer_state")):
        if state.get(key) is not None:
            tensors, meta = _flat_optimizer(state[key])
            save_file(tensors, str(tmp / f"optim_{role}.safetensors"))
            optim_meta[role] = meta
    info = {"source": str(path), "ema_is_generator": "generator_ema" not in nets, "optimizers": optim_meta}
    (tmp / "reference_state.json").write_text(json.dumps(info, indent=1, default=str))
    return _publish_dir(tmp, out)
