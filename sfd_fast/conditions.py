"""What is forgotten: per-row conditions for one phase of the SFD step.

A task draws, from the trainer's generator, the conditions of a batch of `n_remain` remain rows
followed by `n_forget` forget rows, as tensors that go straight to the networks (ONE batch per
network: remain and forget rows are never run as separate passes):

    generator_cond   what G is conditioned on       (remain: c,  forget: forget)
    fake_cond        what the fake score sees        (remain: c,  forget: forget)
    teacher_cond     what the teacher sees           (remain: c,  forget: override)
    uncond           the CFG "unconditional" rows    (null class / "" or a negative prompt)
    is_forget        bool (B,)
    target           long (B,): -1 on remain rows, else the index of the row's forget target in the
                     task's `target_names` (several classes / concepts forgotten in one run). None
                     means one target (is_forget rows are target 0).
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
    target: torch.Tensor | None = None


def row_targets(is_forget: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """The per-row target index (-1 remain), also for conditions built without one."""
    if target is not None:
        return target
    return is_forget.long() - 1   # forget rows -> 0, remain rows -> -1


def forget_row_targets(n_forget: int, weights: list[float] | None, rng: torch.Generator, device) -> torch.Tensor:
    """Which target each of `n_forget` forget rows belongs to.

    One target: all zeros, no RNG consumed (so a list of one replays a single-target run exactly).
    Equal weights (None): stratified, row i -> target i mod K, an exact 1/K share per batch without
    any draw (the batch loss is then an unbiased estimate of the uniform mixture with less variance
    than i.i.d. picks). Unequal weights: i.i.d. draws from the normalised weights (torch.multinomial
    on the generator's device: no host sync)."""
    k = 1 if weights is None else len(weights)
    if weights is None or k == 1:
        return torch.zeros(n_forget, dtype=torch.long, device=device)
    if len(set(weights)) == 1:
        return torch.arange(n_forget, device=device) % k
    w = torch.tensor(weights, dtype=torch.float, device=rng.device)
    return torch.multinomial(w, n_forget, replacement=True, generator=rng).to(device)


# config side of class-conditional forgetting (shared by every class-conditional family)

def forget_targets(s) -> tuple[list[int], list[int]]:
    """(forget classes, override classes) of an SFDConfig: `sfd.forget_classes` / `override_classes`,
    or the single `forget_class` / `override_class` as a list of one."""
    forget = list(s.forget_classes) or [s.forget_class]
    overrides = list(s.override_classes) or ([s.override_class] if not s.forget_classes else [])
    return forget, overrides


def validate_class_targets(s, bad) -> None:
    """Forget / override classes of any class-conditional family (digits, ddpm): in range, distinct,
    one override per target that is not itself forgotten."""
    def is_class(c):
        return isinstance(c, int) and not isinstance(c, bool) and 0 <= c < s.num_classes
    if s.num_classes < 2:
        bad("sfd.num_classes", "must be >= 2")
    forget, overrides = forget_targets(s)
    key = "sfd.forget_classes" if s.forget_classes else "sfd.forget_class"
    for c in forget:
        if not is_class(c):
            bad(key, f"must hold classes in [0, {s.num_classes}), got {c!r}")
    repeated = sorted({c for c in forget if forget.count(c) > 1})
    if repeated:
        bad(key, f"repeats class(es) {repeated}; list each forgotten class once")
    if len(forget) >= s.num_classes:
        bad(key, f"forgets all {s.num_classes} classes; at least one class must remain")
    if s.override not in ("fixed", "random"):
        bad("sfd.override", f"must be 'fixed' or 'random', got {s.override!r}")
    if s.override != "fixed":
        return
    okey = "sfd.override_classes" if s.forget_classes else "sfd.override_class"
    if len(overrides) != len(forget):
        bad(okey, f"needs one override class per forgotten class ({len(forget)}: {forget}), got "
            f"{overrides}; or set sfd.override to 'random'")
    for f, o in zip(forget, overrides):
        if not is_class(o):
            bad(okey, f"must hold classes in [0, {s.num_classes}), got {o!r}")
        if o == f:
            which = "sfd.forget_classes entry" if s.forget_classes else "sfd.forget_class"
            bad(okey, f"equals {which} ({f}); the override must be a different, safe class "
                "(or set sfd.override to 'random')")
        if o in forget:
            bad(okey, f"overrides class {f} with {o}, which is forgotten too; choose a class that remains")


class ClassForgetTask:
    """Class-conditional forgetting of one or several classes, for any class-conditional family.

    forget_class: an int or a list of distinct classes (the targets, in order).
    override: "fixed" (target k is overridden by override_class[k]) or "random" (a uniform class
        that is not forgotten, drawn per row).
    override_class: an int (one target) or a list with one class per target.
    Remain rows are uniform over the classes that are not forgotten (one draw, no rejection loop).
    """

    def __init__(self, num_classes: int, forget_class, override: str = "fixed", override_class=1):
        forget = [int(c) for c in (forget_class if isinstance(forget_class, (list, tuple)) else [forget_class])]
        overrides = override_class if isinstance(override_class, (list, tuple)) else [override_class] * len(forget)
        if len(set(forget)) != len(forget) or not forget:
            raise ValueError(f"forget classes must be distinct and non-empty, got {forget}")
        if override == "fixed" and len(overrides) != len(forget):
            raise ValueError(f"{len(forget)} forget classes but {len(overrides)} override classes")
        self.num_classes = num_classes
        self.forget_classes = forget
        self.forget_class = forget[0]
        self.override = override
        self.override_classes = [int(c) for c in overrides]
        self.override_class = self.override_classes[0]
        self.target_names = [str(c) for c in forget]
        # allowed[r]: the r-th class that is not forgotten (for one forgotten class f this is
        # r + (r >= f), the single-target mapping, so the draws are identical)
        self._allowed = [c for c in range(num_classes) if c not in forget]
        self._allowed_t: dict = {}
        self._override_t: dict = {}
        self._forget_t: dict = {}

    def _table(self, cache: dict, values: list[int], device) -> torch.Tensor:
        key = str(device)
        if key not in cache:  # built once per device (a host->device copy, then reused)
            cache[key] = torch.tensor(values, dtype=torch.long, device=device)
        return cache[key]

    def remain_classes(self, n: int, rng: torch.Generator, device) -> torch.Tensor:
        """Uniform over the classes that are not forgotten."""
        r = torch.randint(0, len(self._allowed), (n,), generator=rng, device=device)
        if len(self.forget_classes) == 1:
            return r + (r >= self.forget_class).long()
        return self._table(self._allowed_t, self._allowed, device)[r]

    def draw(self, n_remain: int, n_forget: int, rng: torch.Generator, device, phase: str) -> PhaseConditions:
        remain = self.remain_classes(n_remain, rng, device)
        k = len(self.forget_classes)
        target = forget_row_targets(n_forget, [1.0] * k, rng, device)
        if self.override == "random":
            override = self.remain_classes(n_forget, rng, device)
        else:
            override = self._table(self._override_t, self.override_classes, device)[target]
        forget = self._table(self._forget_t, self.forget_classes, device)[target]
        gen = torch.cat([remain, forget])
        teacher = torch.cat([remain, override])
        null = torch.full_like(gen, self.num_classes)
        is_forget = torch.arange(n_remain + n_forget, device=device) >= n_remain
        rows = torch.cat([torch.full((n_remain,), -1, dtype=torch.long, device=device), target])
        return PhaseConditions(gen, gen, teacher, null, null, is_forget, rows)
