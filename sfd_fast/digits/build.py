"""The embedded digits family: teacher, fake score, generator, sample grid and evaluation hooks."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpoint import check_finite, generator_weights_file
from ..conditions import ClassForgetTask
from ..config import Config
from ..denoisers import ClassCondDenoiser
from ..evaluation.grid import save_image_grid
from ..generator import OneStepGenerator
from ..schedules import VPSchedule
from ..trainer import RunParts
from ..conditions import forget_targets
from .model import DigitsEpsMLP
from .pretrain import get_digits_teacher

SAMPLE_SHAPE = (1, 8, 8)
GRID_SEED = 2024


def make_schedule(cfg: Config) -> VPSchedule:
    s = cfg.schedule
    return VPSchedule.from_betas(s.beta_schedule, s.beta_start, s.beta_end, s.num_timesteps, s.prediction)


def load_generator_init(cfg: Config, teacher_net: DigitsEpsMLP) -> DigitsEpsMLP:
    """The generator's starting weights: the teacher (SFD) or a generator checkpoint (two-stage)."""
    net = copy.deepcopy(teacher_net)
    if cfg.model.generator_init != "teacher":
        path = Path(cfg.model.generator_init)
        if path.is_dir():  # a run directory or checkpoint folder: its EMA (else raw) generator
            path = generator_weights_file(path)
        try:
            state = load_file(str(path))
            net.load_state_dict(state)
        except Exception as e:   # not safetensors / another architecture: name the key and the file
            raise ValueError(f"model.generator_init {path}: cannot load as a digits generator with hidden="
                             f"{cfg.model.hidden}, blocks={cfg.model.blocks} ({str(e).splitlines()[0][:300]})") from None
        check_finite(state, f"model.generator_init {path}")
    return net


def one_step_samples(generator: OneStepGenerator, labels: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator(device=labels.device).manual_seed(seed)
    z = torch.randn((labels.shape[0], *SAMPLE_SHAPE), generator=g, device=labels.device)
    with torch.no_grad():
        return generator(z, labels)


def build_parts(cfg: Config) -> RunParts:
    teacher_net, teacher_path = get_digits_teacher(cfg)
    s = cfg.sfd
    teacher = ClassCondDenoiser(teacher_net, make_schedule(cfg), s.num_classes)
    fake_score = ClassCondDenoiser(copy.deepcopy(teacher_net), make_schedule(cfg), s.num_classes)
    gen_net = load_generator_init(cfg, teacher_net)
    generator = OneStepGenerator(ClassCondDenoiser(gen_net, make_schedule(cfg), s.num_classes), s.t_init)
    forget, overrides = forget_targets(s)
    task = ClassForgetTask(s.num_classes, forget, s.override, overrides or s.override_class)

    def save_grid(gen: OneStepGenerator, path: Path, per_row: int = 12):
        device = next(gen.parameters()).device
        labels = torch.arange(s.num_classes, device=device).repeat_interleave(per_row)
        x = one_step_samples(gen, labels, GRID_SEED)
        save_image_grid(x, s.num_classes, path, upscale=4)

    return RunParts(task, teacher, fake_score, generator, SAMPLE_SHAPE, save_grid,
                    {"teacher_path": str(teacher_path)})
