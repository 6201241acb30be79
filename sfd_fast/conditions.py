"""What is forgotten: per-row conditions for one phase of the SFD step.

A task draws, from the trainer's generator, the conditions of a batch of `n_remain` remain rows
followed by `n_forget` forget rows, as tensors that go straight to the networks (ONE batch per
network: remain and forget rows are never run as separate passes):

    generator_cond   what G is conditioned on       (remain: c,  forget: forget)
    fake_cond        what the fake score sees        (remain: c,  forget: forget)
    teacher_cond     what the teacher sees           (remain: c,  forget: override)
    uncond           the CFG "unconditional" rows    (null class / "" or a negative prompt)
    is_forget        bool (B,)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PhaseConditions:
    generator_cond: torch.Tensor
    fake_cond: torch.Tensor
    teacher_cond: torch.Tensor
    fake_uncond: torch.Tensor | None
    teacher_uncond: torch.Tensor | None
    is_forget: torch.Tensor


class ClassForgetTask:
    """Class-conditional forgetting: forget one class, override with a fixed or random other class."""

    def __init__(self, num_classes: int, forget_class: int, override: str = "fixed", override_class: int = 1):
        self.num_classes = num_classes
        self.forget_class = forget_class
        self.override = override
        self.override_class = override_class

    def remain_classes(self, n: int, rng: torch.Generator, device) -> torch.Tensor:
        """Uniform over the classes other than forget_class (one draw, no rejection loop)."""
        r = torch.randint(0, self.num_classes - 1, (n,), generator=rng, device=device)
        return r + (r >= self.forget_class).long()

    def draw(self, n_remain: int, n_forget: int, rng: torch.Generator, device, phase: str) -> PhaseConditions:
        remain = self.remain_classes(n_remain, rng, device)
        forget = torch.full((n_forget,), self.forget_class, dtype=torch.long, device=device)
        if self.override == "random":
            override = self.remain_classes(n_forget, rng, device)
        else:
            override = torch.full((n_forget,), self.override_class, dtype=torch.long, device=device)
        gen = torch.cat([remain, forget])
        teacher = torch.cat([remain, override])
        null = torch.full_like(gen, self.num_classes)
        is_forget = torch.arange(n_remain + n_forget, device=device) >= n_remain
        return PhaseConditions(gen, gen, teacher, null, null, is_forget)
