"""The ddpm family for the SFD trainer: teacher, fake score and generator from a reference checkpoint.

Starts, as the reference train_sfd (spec §1a):
    base DDPM [model, opt, step, ema]          fake score = generator = EMA (init_from_ema) or model
    SiD/SFD   [fake, fake_opt, gen, gen_opt, step, ema]
                                               fake score = entry 0; generator = EMA (init_from_ema)
                                               or entry 2  ("two-stage")
    teacher = the fake score's starting weights, in both cases. In the two-stage setting the teacher
    is therefore the stage-1 fake score, not the original DDPM (the reference's behaviour).
Data-free: only class labels and the image shape are used; no dataset is read.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch

from ..denoisers import ClassCondDenoiser
from ..evaluation.grid import class_grid_saver
from ..generator import OneStepGenerator
from ..schedules import VPSchedule
from ..conditions import ClassForgetTask, forget_targets
from ..trainer import RunParts
from ..checkpoint import check_finite
from .checkpoints import atomic_torch_save, load_into, read_reference_list, starting_states
from .model import DDPMArch, DDPMUNet, arch_of

GRID_SEED = 2024


class AllClassesTask(ClassForgetTask):
    """Stage-1 SiD (reference --label_to_forget -1, forget coefficients 0): remain rows over every class."""

    def __init__(self, num_classes: int):
        super().__init__(num_classes, forget_class=0, override="fixed", override_class=0)

    def remain_classes(self, n: int, rng: torch.Generator, device) -> torch.Tensor:
        return torch.randint(0, self.num_classes, (n,), generator=rng, device=device)


def arch_from_config(cfg) -> DDPMArch:
    return arch_of(cfg.ddpm, cfg.sfd.num_classes)


def make_schedule(cfg) -> VPSchedule:
    s = cfg.schedule
    return VPSchedule.from_betas(s.beta_schedule, s.beta_start, s.beta_end, s.num_timesteps, s.prediction)


def random_checkpoint(folder: str | Path, arch: DDPMArch) -> Path:
    """A base-layout reference list of seeded random weights for `arch`, written once (atomically)."""
    key = hashlib.sha1(json.dumps(arch.__dict__, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(folder) / f"ddpm_random_{key}.pth"
    if not path.is_file():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            state = DDPMUNet(arch).state_dict()
        # the base layout [model, opt, step, ema], as the reference's DDPM training writes it
        atomic_torch_save([state, {"state": {}, "param_groups": []}, 0, state], path)  # EMA = model (saved once)
    return path


def resolve_checkpoint(cfg) -> Path:
    ck = cfg.ddpm.checkpoint
    if ck.startswith("random:"):
        return random_checkpoint(ck[len("random:"):], arch_from_config(cfg))
    return Path(ck)


def build_parts(cfg) -> RunParts:
    """RunParts for the SFD trainer (teacher frozen, fake score and generator trained)."""
    arch = arch_from_config(cfg)
    path = resolve_checkpoint(cfg)
    fake_state, gen_state, how = starting_states(read_reference_list(path), cfg.ddpm.init_from_ema, path)
    teacher_net = load_into(DDPMUNet(arch), fake_state, f"{path} (teacher / fake score)")
    check_finite(teacher_net.state_dict(), f"ddpm.checkpoint {path} (teacher)")   # NaN: every update skipped
    fake_net = copy.deepcopy(teacher_net)
    gen_net = load_into(DDPMUNet(arch), gen_state, f"{path} (generator)")
    for net in (fake_net, gen_net):
        net.update_dropout = cfg.ddpm.train_mode_dropout
    s = cfg.sfd
    n = s.num_classes
    teacher = ClassCondDenoiser(teacher_net, make_schedule(cfg), n)
    fake_score = ClassCondDenoiser(fake_net, make_schedule(cfg), n)
    generator = OneStepGenerator(ClassCondDenoiser(gen_net, make_schedule(cfg), n), s.t_init)
    forget, overrides = forget_targets(s)   # sfd.forget_classes, or forget_class as a list of one
    task = (AllClassesTask(n) if forget == [-1]
            else ClassForgetTask(n, forget, s.override, overrides or s.override_class))
    shape = (cfg.ddpm.in_channels, cfg.ddpm.image_size, cfg.ddpm.image_size)
    per_class = cfg.ddpm.grid_per_class

    save_grid = class_grid_saver(n, per_class, shape, GRID_SEED)

    return RunParts(task, teacher, fake_score, generator, shape, save_grid,
                    {"checkpoint": str(path), "start": how})
