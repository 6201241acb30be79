"""Reading EDM / SiD snapshots into sfd_fast.edm networks, without executing anything in them.

    load_snapshot(path, entry="ema") -> the preconditioned network (eval mode, fp32, CPU)

Formats:
  *.pkl          EDM `network-snapshot-*.pkl` / `edm-cifar10-32x32-cond-vp.pkl` ({"ema": VPPrecond, ...})
                 and SiD's `network-snapshot-*.pkl` ({"ema": G_ema}); a pickle (unpickle.py reads it)
  *.pt (zip)     SiD's `training-state-*.pt` (torch.save of {"fake_score", "G", "G_ema", optimiser
                 states}); entries "fake_score", "G", "G_ema"
  *.safetensors  our export (sfd-fast export --format edm-safetensors): the weights plus the class
                 name and constructor kwargs in the metadata

The entry must be a persistent record of a supported class (sfd_fast.edm.precond.CLASSES); its
recorded constructor arguments build our network, whose state dict must match the record's
parameters and buffers exactly (names and shapes). Anything else is a SnapshotError naming it.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from ..errors import UserError
from .precond import CLASSES, MODULE, UnsupportedNetworkError, build_network
from .unpickle import Inert, PersistentRecord, safe_load

SAFETENSORS_CLASS_KEY = "edm.class_name"
SAFETENSORS_KWARGS_KEY = "edm.init_kwargs"


class SnapshotError(UserError, ValueError):
    """A snapshot that cannot be read safely into a supported network; the message names the file."""


def read_snapshot_object(path: Path):
    """The unpickled top-level object of a .pkl or torch.save zip file (records, never executed)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            pkls = [n for n in zf.namelist() if n.endswith("/data.pkl")]
            if len(pkls) != 1:
                raise SnapshotError(f"{path}: a zip file but not a torch.save archive (no single */data.pkl)")
            prefix = pkls[0][: -len("/data.pkl")]
            with zf.open(pkls[0]) as f:
                return safe_load(f, (zf, prefix))[0]
    with open(path, "rb") as f:
        return safe_load(f)[0]


def _describe(obj) -> str:
    if isinstance(obj, PersistentRecord):
        return f"a persistent record of class {obj.class_name!r}"
    if isinstance(obj, Inert):
        return f"a {type(obj).global_name()} object"
    return f"a {type(obj).__name__}"


def _plain(value, where: str):
    """Constructor arguments must be plain data (numbers, strings, lists, dicts): nothing else is
    passed to our constructors."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, where) for v in value)
    if isinstance(value, dict) and not isinstance(value, Inert):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise SnapshotError(f"constructor argument {where} is {_describe(value)}, not plain data")


def record_tensors(state, prefix: str = "", out: dict | None = None) -> dict:
    """{dotted name: tensor} of a module record's parameters, persistent buffers and submodules
    (the names torch's state_dict() would give)."""
    out = {} if out is None else out
    if not isinstance(state, dict):
        raise SnapshotError(f"module state at {prefix or '<root>'} is {_describe(state)}, not a dict")
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if t is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(t, torch.Tensor):
                raise SnapshotError(f"{prefix}{name} is {_describe(t)}, not a tensor")
            out[prefix + name] = t
    for name, sub in (state.get("_modules") or {}).items():
        if sub is None:
            continue
        sub_state = sub.state if isinstance(sub, (PersistentRecord, Inert)) else None
        if sub_state is None:
            raise SnapshotError(f"submodule {prefix}{name} is {_describe(sub)}, not a module record")
        record_tensors(sub_state, f"{prefix}{name}.", out)
    return out


def network_from_record(record, where: str) -> torch.nn.Module:
    """Our network for a persistent record: class and kwargs checked, weights loaded strictly."""
    if not isinstance(record, PersistentRecord):
        raise SnapshotError(f"{where} is {_describe(record)}, not an EDM network record "
                            "(a torch_utils.persistence object)")
    if record.type != "class":
        raise SnapshotError(f"{where}: persistent record of type {record.type!r}; only 'class' records are read")
    if record.class_name not in CLASSES:
        raise SnapshotError(f"{where}: network class {record.class_name!r} is not supported (its embedded "
                            f"source is never run); supported: {', '.join(CLASSES)}")
    state = record.state
    if not isinstance(state, dict) or state.get("_init_kwargs") is None:
        raise SnapshotError(f"{where}: the {record.class_name} record has no constructor arguments "
                            "(_init_kwargs); it was not written by torch_utils.persistence")
    args = _plain(tuple(state.get("_init_args") or ()), f"{where}.init_args")
    kwargs = _plain(dict(state["_init_kwargs"]), f"{where}.init_kwargs")
    try:
        net = build_network(f"{MODULE}.{record.class_name}", *args, **kwargs)
    except UnsupportedNetworkError as e:
        raise SnapshotError(f"{where}: {e}") from None
    load_strict(net, record_tensors(state), where)
    return net.eval().requires_grad_(False)


def load_strict(net: torch.nn.Module, tensors: dict, where: str) -> None:
    """Copy `tensors` into `net`; the first missing / unexpected key or wrong shape is an error."""
    ours = net.state_dict()
    missing = [k for k in ours if k not in tensors]
    extra = [k for k in tensors if k not in ours]
    if missing or extra:
        raise SnapshotError(f"{where}: weights do not match the {type(net).__name__} its arguments build: "
                            + (f"missing {missing[0]!r} ({len(missing)} in all)" if missing else "")
                            + ("; " if missing and extra else "")
                            + (f"unexpected {extra[0]!r} ({len(extra)} in all)" if extra else ""))
    for k, v in ours.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise SnapshotError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, the network expects "
                                f"{tuple(v.shape)}")
    net.load_state_dict({k: tensors[k].to(v.dtype).contiguous() for k, v in ours.items()})


def read_safetensors(path: Path) -> torch.nn.Module:
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if SAFETENSORS_CLASS_KEY not in meta or SAFETENSORS_KWARGS_KEY not in meta:
        raise SnapshotError(f"{path}: safetensors file without '{SAFETENSORS_CLASS_KEY}' / "
                            f"'{SAFETENSORS_KWARGS_KEY}' metadata; write it with "
                            "`sfd-fast export --format edm-safetensors`")
    try:
        kwargs = json.loads(meta[SAFETENSORS_KWARGS_KEY])
        net = build_network(meta[SAFETENSORS_CLASS_KEY], **kwargs)
    except (ValueError, UnsupportedNetworkError) as e:
        raise SnapshotError(f"{path}: {e}") from None
    load_strict(net, load_file(str(path)), str(path))
    return net.eval().requires_grad_(False)


def write_safetensors(net: torch.nn.Module, class_name: str, init_kwargs: dict, path: Path) -> Path:
    """The network's weights with its class and kwargs in the metadata, written atomically."""
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    meta = {SAFETENSORS_CLASS_KEY: class_name, SAFETENSORS_KWARGS_KEY: json.dumps(init_kwargs)}
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_snapshot(path, entry: str = "ema") -> torch.nn.Module:
    """The preconditioned network stored under `entry` of an EDM / SiD snapshot, or a safetensors
    export, built from our code with the stored weights (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"snapshot {path} does not exist; give an EDM / SiD network-snapshot .pkl, "
                            "a SiD training-state .pt or an sfd-fast .safetensors export")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        top = read_snapshot_object(path)
    except SnapshotError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, RuntimeError) as e:
        raise SnapshotError(f"{path}: not a readable snapshot pickle ({type(e).__name__}: {e})") from None
    if not isinstance(top, dict) or isinstance(top, Inert):
        raise SnapshotError(f"{path}: the snapshot is {_describe(top)}, not a dict of entries such as 'ema'")
    if entry not in top:
        raise SnapshotError(f"{path}: no entry {entry!r}; entries: {', '.join(map(str, top))}")
    return network_from_record(top[entry], f"{path}[{entry!r}]")


def snapshot_kwargs(path, entry: str = "ema") -> tuple[str, dict]:
    """(class name, constructor kwargs) of a snapshot entry, without building the network."""
    top = read_snapshot_object(Path(path))
    rec = top.get(entry) if isinstance(top, dict) else None
    if not isinstance(rec, PersistentRecord):
        raise SnapshotError(f"{path}[{entry!r}] is {_describe(rec)}, not an EDM network record")
    return rec.class_name, _plain(dict(rec.state.get("_init_kwargs") or {}), f"{path}[{entry!r}].init_kwargs")
