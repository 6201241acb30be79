"""The edm family for the SFD trainer: teacher, fake score and generator from an EDM / SiD snapshot.

As SiD's EDM loop (spec §1c): the teacher is the snapshot's `ema` network, the fake score and the
generator start as copies of it (a two-stage start takes the generator from `edm.generator_entry`,
e.g. a SiD training state's "G_ema"). Data-free: only class labels and the image shape are used.
The SFD step itself is the engine's (step.py), unchanged: this module only adapts the networks
(denoiser.py) and draws the grid images.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch

from ..checkpoint import check_finite
from ..conditions import ClassForgetTask, forget_targets
from ..evaluation.grid import class_grid_saver
from ..trainer import RunParts
from .denoiser import EDMDenoiser, SigmaGridSchedule, SigmaOneStepGenerator
from .precond import build_network
from .snapshot import load_snapshot, write_safetensors

GRID_SEED = 2024


def make_schedule(cfg) -> SigmaGridSchedule:
    e = cfg.edm
    return SigmaGridSchedule(cfg.schedule.num_timesteps, e.sigma_min, e.sigma_max, e.rho)


def network_spec(network: dict) -> tuple[str, dict]:
    """(class name, constructor kwargs) of an `edm.network` dict."""
    spec = dict(network)
    return spec.pop("class_name", "training.networks.VPPrecond"), spec


def random_snapshot(folder: str | Path, network: dict) -> Path:
    """A safetensors export of seeded random weights for `edm.network`, written once (atomically).
    EDM zero-initialises its output layers, which would make every image equal; the smoke runs need
    a network whose output depends on its input and class, so every weight gets a small seeded draw."""
    class_name, kwargs = network_spec(network)
    key = hashlib.sha1(json.dumps([class_name, kwargs], sort_keys=True).encode()).hexdigest()[:10]
    path = Path(folder) / f"edm_random_{key}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = build_network(class_name, **kwargs)
            with torch.no_grad():
                for name, p in net.named_parameters():
                    if p.dim() >= 2:
                        p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
                    elif "norm" not in name:          # GroupNorm keeps its 1 / 0 start
                        p.copy_(0.1 * torch.randn_like(p))
        write_safetensors(net, class_name, kwargs, path)
    return path


def resolve_snapshot(cfg) -> Path:
    s = cfg.edm.snapshot
    return random_snapshot(s[len("random:"):], cfg.edm.network) if s.startswith("random:") else Path(s)


def set_dropout(net: torch.nn.Module, p: float) -> None:
    """The dropout probability of every UNetBlock (the only place EDM's networks drop out)."""
    from .layers import UNetBlock
    for m in net.modules():
        if isinstance(m, UNetBlock):
            m.dropout = float(p)


def build_parts(cfg) -> RunParts:
    """RunParts for the SFD trainer (teacher frozen, fake score and generator trained)."""
    e, s = cfg.edm, cfg.sfd
    path = resolve_snapshot(cfg)
    teacher_net = snapshot_network(cfg, path, e.entry)
    check_finite(teacher_net.state_dict(), f"edm.snapshot {path} (teacher)")   # NaN: every update skipped
    gen_net = snapshot_network(cfg, path, e.generator_entry) if e.generator_entry else copy.deepcopy(teacher_net)
    fake_net = copy.deepcopy(teacher_net)
    for net in (teacher_net, fake_net, gen_net):
        net.requires_grad_(True)          # load_snapshot hands out frozen networks; the trainer decides
        if e.dropout is not None:         # SiD builds its networks with its own --dropout
            set_dropout(net, e.dropout)
    n = s.num_classes
    teacher = EDMDenoiser(teacher_net, make_schedule(cfg), n)
    fake_score = EDMDenoiser(fake_net, make_schedule(cfg), n)
    gen_den = EDMDenoiser(gen_net, make_schedule(cfg), n)
    fake_score.update_dropout = gen_den.update_dropout = e.train_mode_dropout
    generator = SigmaOneStepGenerator(gen_den, e.sigma_init)
    forget, overrides = forget_targets(s)
    task = ClassForgetTask(n, forget, s.override, overrides or s.override_class)
    res, ch = teacher_net.img_resolution, teacher_net.img_channels
    shape = (ch, res, res)
    per_class = e.grid_per_class

    save_grid = class_grid_saver(n, per_class, shape, GRID_SEED)

    return RunParts(task, teacher, fake_score, generator, shape, save_grid,
                    {"snapshot": str(path), "entry": e.entry, "generator_entry": e.generator_entry or e.entry,
                     "network_class": type(teacher_net).__name__})


def with_precond(class_name: str, kwargs: dict, precond: str) -> tuple[str, dict]:
    """(class, kwargs) of the same backbone under preconditioner `precond` ("" = unchanged): the
    preconditioner-specific arguments (VP's beta_d..., EDM's sigma_data...) are dropped."""
    if not precond or class_name.rpartition(".")[2] == precond:
        return class_name, kwargs
    from .precond import PRECONDITIONERS, _accepted
    cls = PRECONDITIONERS[precond]
    accepted = _accepted(cls, kwargs)
    return f"training.networks.{precond}", {k: v for k, v in kwargs.items() if k in accepted}


def snapshot_network(cfg, path: Path, entry: str) -> torch.nn.Module:
    """The snapshot's network for `entry`, under `edm.precond` when set (the weights are the backbone's
    "model.*" in every preconditioner, so they carry over one to one, as SiD's copy by name does)."""
    net = load_snapshot(path, entry)
    if not cfg.edm.precond or type(net).__name__ == cfg.edm.precond:
        return net
    class_name, kwargs = with_precond(*run_network(cfg, raw=True), cfg.edm.precond)
    other = build_network(class_name, **kwargs)
    other.load_state_dict(net.state_dict())
    return other.eval().requires_grad_(False)


def run_network(cfg, raw: bool = False) -> tuple[str, dict]:
    """(class name, kwargs) of a run's networks: from the snapshot's record (or `edm.network`), under
    `edm.precond` unless `raw`."""
    if not raw:
        return with_precond(*run_network(cfg, raw=True), cfg.edm.precond)
    if cfg.edm.snapshot.startswith("random:"):
        return network_spec(cfg.edm.network)
    path = Path(cfg.edm.snapshot)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        from .snapshot import SAFETENSORS_CLASS_KEY, SAFETENSORS_KWARGS_KEY
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        return meta[SAFETENSORS_CLASS_KEY], json.loads(meta[SAFETENSORS_KWARGS_KEY])
    from .snapshot import snapshot_kwargs
    name, kwargs = snapshot_kwargs(path, cfg.edm.entry)
    return f"training.networks.{name}", kwargs


def build_network_for_run(cfg, weights: dict) -> SigmaOneStepGenerator:
    """The run's one-step generator with `weights` (a state dict from a checkpoint)."""
    class_name, kwargs = run_network(cfg)
    net = build_network(class_name, **kwargs)
    net.load_state_dict(weights)
    return SigmaOneStepGenerator(EDMDenoiser(net, make_schedule(cfg), cfg.sfd.num_classes), cfg.edm.sigma_init)
