"""Reading and writing the reference DDPM checkpoints (spec §4.1), with torch.load(weights_only=True).

Layouts (a torch.save'd Python list):
    base DDPM   [model_state, optimizer_state, step, ema_shadow]                          (4 entries)
    SFD / SiD   [fake_score_state, fake_opt_state, generator_state, gen_opt_state, step, ema_shadow]
                (6 entries; 5 without EMA; early-stage snapshots hold None at 0, 1 and 3)

Entries, as the reference readers pick them:
    "ema"         [-1]                     the EMA shadow of the generator (or of the base model)
    "generator"   [0] base, [2] SFD/SiD     the raw generator (sample.py / ua_ddpm.py without EMA)
    "model"       the same as "generator"  (for a base DDPM checkpoint: the raw model)
    "fake_score"  [0]                      the fake score (for a base checkpoint: the raw model, as
                                           train_sfd starts its fake score without init_from_ema)
A "module." prefix (DistributedDataParallel) is stripped. Files that need full unpickling (whole
modules, numpy objects, ...) are refused: these checkpoints hold only tensors, dicts and ints.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from .model import DDPMArch, DDPMUNet

ENTRIES = ("ema", "model", "fake_score", "generator")


class ReferenceCheckpointError(ValueError):
    """A reference checkpoint that cannot be read or does not fit the network; the message says why."""


def read_reference_list(path: str | Path, mmap: bool = False) -> list:
    """The checkpoint's list, loaded with weights_only=True (refusing anything that needs pickle code).
    mmap: map the tensors instead of reading them (for checks that only look at names and shapes)."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceCheckpointError(f"reference checkpoint {path} does not exist")
    try:
        try:
            states = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            states = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise ReferenceCheckpointError(
            f"{path}: refused, it needs full unpickling (it holds more than tensors, dicts and numbers: "
            f"{str(e).splitlines()[0][:200]}). Reference DDPM checkpoints do not; re-save the state dicts "
            "only, e.g. torch.save([m.state_dict() for ...], path)") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ReferenceCheckpointError(f"{path}: not a torch checkpoint ({e})") from None
    if not isinstance(states, (list, tuple)) or len(states) not in (4, 5, 6):
        kind = type(states).__name__ + (f" of {len(states)}" if isinstance(states, (list, tuple)) else "")
        raise ReferenceCheckpointError(
            f"{path}: expected the reference DDPM list ([model, opt, step, ema] or [fake_score, fake_opt, "
            f"generator, gen_opt, step, ema]), got a {kind}")
    return list(states)


def entry_index(n: int, entry: str) -> int:
    """Index of `entry` in a reference list of length n (see the module docstring)."""
    if entry not in ENTRIES:
        raise ReferenceCheckpointError(f"entry {entry!r}: use one of {', '.join(ENTRIES)}")
    base = n <= 4
    if entry == "ema":
        return -1 if n != 5 else -99  # a 5-entry SFD list was saved without EMA
    if entry == "fake_score":
        return 0
    return 0 if base else 2


def strip_module_prefix(state: dict) -> dict:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def select_state(states: list, entry: str, path: str | Path = "checkpoint") -> dict:
    """The state dict of `entry` ("module." stripped), or an error naming the entry and the file."""
    idx = entry_index(len(states), entry)
    if idx == -99:
        raise ReferenceCheckpointError(f"{path}: this SFD checkpoint was saved without EMA (5 entries); "
                                       "use entry 'generator'")
    state = states[idx]
    if state is None:
        raise ReferenceCheckpointError(f"{path}: entry {entry!r} is empty (an early-stage snapshot keeps only "
                                       "the generator, step and EMA); use 'generator' or 'ema'")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ReferenceCheckpointError(f"{path}: entry {entry!r} (index {idx}) is not a state dict of tensors")
    return strip_module_prefix(state)


def describe_mismatch(own: dict, state: dict, arch: DDPMArch, where: str) -> str | None:
    """Why `state` does not fit a network with state dict `own` (first missing / unexpected key,
    first shape mismatch), or None when it fits exactly."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys, first '{missing[0]}' {tuple(own[missing[0]].shape)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, first '{unexpected[0]}' {tuple(state[unexpected[0]].shape)}")
    if shapes:
        k = shapes[0]
        parts.append(f"first shape mismatch '{k}': checkpoint {tuple(state[k].shape)} vs network {tuple(own[k].shape)}")
    a = arch
    return (f"{where} does not fit the ddpm network (image_size {a.image_size}, ch {a.ch}, ch_mult {a.ch_mult}, "
            f"num_res_blocks {a.num_res_blocks}, attn_resolutions {a.attn_resolutions}, num_classes "
            f"{a.num_classes}): {'; '.join(parts)}. Set the ddpm section (or image_size) to the "
            "checkpoint's architecture")


def load_into(net: DDPMUNet, state: dict, where: str) -> DDPMUNet:
    """Strict load; a mismatch raises ReferenceCheckpointError (see describe_mismatch)."""
    own = net.state_dict()
    problem = describe_mismatch(own, state, net.arch, where)
    if problem:
        raise ReferenceCheckpointError(problem)
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return net


def starting_states(states: list, init_from_ema: bool, path) -> tuple[dict, dict, str]:
    """(teacher = fake-score start, generator start, description), as the reference train_sfd picks them:
    base list: both = EMA (init_from_ema) or model; SiD/SFD list: fake = [0], generator = EMA or [2]."""
    if len(states) <= 4:
        entry = "ema" if init_from_ema else "model"
        state = select_state(states, entry, path)
        return state, state, f"base DDPM {entry}"
    gen_entry = "ema" if init_from_ema else "generator"
    return (select_state(states, "fake_score", path), select_state(states, gen_entry, path),
            f"two-stage: teacher/fake score = fake_score, generator = {gen_entry}")


def check_fits(path, arch: DDPMArch, init_from_ema: bool) -> None:
    """Raise ReferenceCheckpointError unless the starting states of `path` fit `arch`. Cheap: the file
    is memory-mapped and the network is built on the meta device."""
    fake, gen, _ = starting_states(read_reference_list(path, mmap=True), init_from_ema, path)
    with torch.device("meta"):
        own = DDPMUNet(arch).state_dict()
    for state, role in ((fake, "teacher / fake score"), (gen, "generator")):
        problem = describe_mismatch(own, state, arch, f"{path} ({role})")
        if problem:
            raise ReferenceCheckpointError(problem)


def load_reference_checkpoint(path, entry: str = "ema", image_size: int = 32, num_classes: int = 10,
                              *, arch: DDPMArch | None = None) -> DDPMUNet:
    """A reference DDPM checkpoint entry as an eval-mode network; net(x, t, y) -> epsilon prediction.

    entry: "ema", "model", "fake_score" or "generator" (spec §4.1). The architecture is the
    reference config for `image_size` (32: CIFAR-10, 64: STL-10) unless `arch` is given."""
    arch = arch or DDPMArch.for_image_size(image_size, num_classes)
    state = select_state(read_reference_list(path), entry, path)
    return load_into(DDPMUNet(arch), state, f"{path} entry {entry!r}").eval()


def atomic_torch_save(obj, path: Path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_reference_list(path, fake_score: dict, generator: dict, generator_ema: dict | None, step: int):
    """Write the 6-entry SFD list the reference's sample.py / ua_ddpm.py read (atomically).

    The optimizer entries hold empty Adam state dicts (the reference readers never use them); the
    EMA entry is {param_name: tensor} like FixedEMAHelper's shadow. A pickle by format: the
    reference reads nothing else. Everything in it loads with weights_only=True."""
    def cpu(sd):
        return {k: v.detach().cpu().clone() for k, v in sd.items()}
    empty_opt = {"state": {}, "param_groups": []}
    ema = cpu(generator_ema if generator_ema is not None else generator)
    atomic_torch_save([cpu(fake_score), empty_opt, cpu(generator), empty_opt, int(step), ema], path)
