"""train.micro_batch "auto": the largest micro-batch that fits the device, chosen once per run.

    candidates  the divisors of this rank's rows per step (train.batch_size, / world under DeepSpeed),
                largest first; a micro-batch of m means m remain + m forget rows per network call
    estimate    need(m) from a pluggable estimator (rows -> bytes; by default the memory model,
                engine/memory_model.py: the real phases traced once, the modelled peak per candidate)
    budget      HEADROOM x limit, limit = memory_limit(): the device's free memory plus what this
                process already holds, capped by engine.memory_limit_gib
    probe       the largest m with need(m) <= budget runs ONE probe step (probe_step: forward and
                backward of both phases at m rows, on the trainer's own networks, as the trainer
                runs them). On CUDA an out-of-memory error, or a measured peak that with the optimizer
                state still to come exceeds the budget, backs off to the next candidate. On CPU there
                is no allocator peak: the estimate decides, the probe shows the step runs at that shape.
    agreement   under DeepSpeed every rank takes the minimum over ranks (one all_reduce) before the
                engines are built; a rank where nothing fits reports 0 and every rank stops together.

The choice is written into cfg (train.micro_batch as an int, train.grad_accum), so the run's
config.json records it and --resume reuses it without probing. The probe changes nothing the run
keeps: no optimizer step (weights, optimizer state, EMA, step counter untouched), its draws come
from a generator of its own, the global torch / CUDA RNG and the task's prompt stream are restored,
and the gradients it made are dropped (set to None, as a fresh trainer has them).
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import UserError
from ..step import PhaseContext, draw_phase
from .memory import cap_note, memory_limit
from .memory_model import micro_batch_estimator

log = logging.getLogger("sfd_fast")

# Plan for 85% of the limit. The estimate counts tensors, not what the CUDA caching allocator
# reserves around them (block rounding and fragmentation: typically 5-15% above the allocated
# peak), nor cuBLAS/cuDNN workspaces, NCCL buffers and torch.compile's autotuning scratch, none of
# which max_memory_allocated sees. Lower engine.memory_limit_gib for more room.
HEADROOM = 0.85
GIB = 2 ** 30


@dataclass
class Choice:
    """The outcome of the search; `micro` is per rank (0 when nothing fits)."""
    micro: int = 0
    need: int = 0
    peak: int | None = None
    tried: list = field(default_factory=list)     # (micro, verdict) for every candidate looked at


def fmt(n: int) -> str:
    """Bytes for a log line: GiB for device-sized numbers, MiB / KiB for tiny test runs."""
    for unit, size in (("GiB", GIB), ("MiB", 2 ** 20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.1f} KiB"


def divisors_desc(n: int) -> list[int]:
    return [m for m in range(n, 0, -1) if n % m == 0]


def pick_micro_batch(candidates: list[int], need: Callable[[int], int], budget: int,
                     probe: Callable[[int], int | None], unmeasured: int = 0,
                     on_oom: Callable[[], None] = lambda: None) -> Choice:
    """The largest candidate whose estimate fits `budget` and whose probe succeeds.

    probe(m) returns the measured allocator peak (None where there is none: CPU) or raises
    torch.OutOfMemoryError; `unmeasured` is what the probe cannot have allocated yet (the optimizer
    state, created at the first real step) and is added to the measured peak."""
    choice = Choice()
    for m in candidates:
        est = need(m)
        if est > budget:
            choice.tried.append((m, f"estimate {fmt(est)} > budget"))
            continue
        oom = False
        try:
            peak = probe(m)
        except torch.OutOfMemoryError:
            oom = True   # leave the except block first: its traceback holds the probe's activations
        if oom:
            on_oom()
            choice.tried.append((m, "probe ran out of memory"))
            continue
        if peak is not None and peak + unmeasured > budget:
            choice.tried.append((m, f"probe peak {fmt(peak)} + optimizer state "
                                    f"{fmt(unmeasured)} > budget"))
            continue
        choice.micro, choice.need, choice.peak = m, est, peak
        choice.tried.append((m, "fits"))
        return choice
    return choice


def probe_step(trainer, micro: int) -> int | None:
    """Forward + backward of the fake-score phase, then of the generator phase, at `micro` remain
    (+ `micro` forget) rows, on the trainer's networks and phase functions (compiled ones included);
    no optimizer step. Returns the CUDA allocator peak of the two phases (None on CPU).

    The gradients of the trained network are allocated (zeros) before each phase's backward: with
    gradient accumulation, every micro-batch after the first runs its forward and backward while
    the accumulated gradients are resident, so that is the peak the probe must show."""
    cfg, s, dev = trainer.cfg, trainer.cfg.sfd, trainer.device
    rng = torch.Generator(device=dev).manual_seed(cfg.run.seed)   # the probe's own stream
    task, shape = trainer.parts.task, trainer.parts.sample_shape
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    _allocate_grads(trainer.fake_score)
    d = draw_phase(task, rng, micro, micro if s.sg_forget_coef > 0 else 0, shape, s.t_min, s.t_max,
                   s.sg_remain_coef, s.sg_forget_coef, dev, "fake_score")
    frozen = trainer.frozen_fake_score            # decided by the plan (denoisers.FrozenFakeScore)
    ctx = PhaseContext.for_trainer(trainer, trainer.generator, trainer.fake_score, frozen.view, micro)
    with trainer.autocast():
        loss, _ = trainer.fake_score_phase_fn(ctx, d)
    loss.backward()
    del loss, d
    drop_grads(trainer)                     # the trainer's update sets them to None, too
    _allocate_grads(trainer.generator)
    with frozen.during():
        d = draw_phase(task, rng, micro, micro if s.g_forget_coef > 0 else 0, shape, s.t_min, s.t_max,
                       s.g_remain_coef, s.g_forget_coef, dev, "generator")
        with trainer.autocast():
            loss, _ = trainer.generator_phase_fn(ctx, d)
        loss.backward()
    del loss, d
    return int(torch.cuda.max_memory_allocated(dev)) if cuda else None


def _allocate_grads(net) -> None:
    for p in net.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)


def drop_grads(trainer) -> None:
    for net in (trainer.fake_score, trainer.generator):
        for p in net.parameters():
            p.grad = None


class _RunStatePreserved:
    """Save the global torch / CUDA RNG and the task's host RNG; restore them and drop the probe's
    gradients on exit, whatever the probe did (an out-of-memory error included)."""

    def __init__(self, trainer):
        self.trainer, task = trainer, trainer.parts.task
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if trainer.device.type == "cuda" else None
        self.task = task.rng_state() if hasattr(task, "rng_state") else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        drop_grads(self.trainer)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        if self.task is not None:
            self.trainer.parts.task.set_rng_state(self.task)
        return False


def _free_after_oom(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rows_per_rank(cfg, world: int) -> int:
    if cfg.train.batch_size % world:
        raise UserError(f"train.micro_batch='auto': train.batch_size ({cfg.train.batch_size}) is the global "
                        f"batch and must be divisible by the world size ({world})")
    return cfg.train.batch_size // world


def agree_across_ranks(micro: int, device) -> int:
    """The minimum over ranks (one all_reduce) when a process group of more than one rank runs."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return micro
    t = torch.tensor([micro], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def resolve_auto_micro_batch(trainer, world: int, estimator=None) -> dict:
    """Choose, agree, write the choice into trainer.cfg.train and log it in one line; returns the
    record. `estimator(cfg, parts, device, world)` -> (micro -> dict
    with "need" and "adam" bytes); engine/memory_model.py's micro_batch_estimator by default."""
    cfg, dev, t = trainer.cfg, trainer.device, trainer.cfg.train
    rows = rows_per_rank(cfg, world)
    with _RunStatePreserved(trainer):   # the estimator's one-row forward draws too
        estimate = (estimator or micro_batch_estimator)(cfg, trainer.parts, dev, world)
        first = estimate(1)
        limit = memory_limit(cfg, dev, first["weights"])
        budget = int(HEADROOM * limit)
        choice = pick_micro_batch(divisors_desc(rows), lambda m: estimate(m)["need"], budget,
                                  lambda m: probe_step(trainer, m), unmeasured=first["adam"],
                                  on_oom=lambda: _free_after_oom(dev))
    agreed = agree_across_ranks(choice.micro, dev)
    tried = "; ".join(f"{m}: {v}" for m, v in choice.tried)
    if agreed == 0:
        raise UserError(
            f"train.micro_batch='auto': not even a micro-batch of 1 remain + 1 forget row fits on {dev}"
            f"{' on some rank' if agreed != choice.micro else ''}: the estimate for 1 is {fmt(first['need'])} "
            f"(weights {fmt(first['weights'])}, gradients+Adam {fmt(first['gradients_and_adam'])}, activations "
            f"{fmt(first['activations'])}) against {HEADROOM:.0%} of {fmt(limit)} available{cap_note(cfg)} "
            f"(tried {tried or 'nothing'}). "
            + ("Raise engine.memory_limit_gib, or: " if cfg.engine.memory_limit_gib is not None else "")
            + "free or add device memory, turn on engine.activation_checkpointing, engine.optimizer='adam8bit' "
            "or engine.precision='bf16', or use engine.backend='deepspeed' with ZeRO over more devices")
    why = ("largest that fits" if agreed == rows else
           "the smallest over ranks" if agreed < choice.micro else "larger ones did not fit")
    t.grad_accum = rows // agreed
    t.micro_batch = agreed * world        # train.micro_batch counts the global micro-batch
    peak = "" if choice.peak is None else f", probe peak {fmt(choice.peak)}"
    message = (f"train.micro_batch=auto -> {agreed} remain + {agreed} forget rows per micro-batch on each of "
               f"{world} rank(s), grad_accum {t.grad_accum}: estimate {fmt(estimate(agreed)['need'])}{peak}, "
               f"budget {fmt(budget)} = {HEADROOM:.0%} of limit {fmt(limit)}{cap_note(cfg)} ({why}; tried {tried})")
    log.info(message)
    return {"micro_batch": t.micro_batch, "per_rank": agreed, "grad_accum": t.grad_accum,
            "estimate_bytes": estimate(agreed)["need"], "probe_peak_bytes": choice.peak,
            "limit_bytes": limit, "budget_bytes": budget, "tried": choice.tried, "message": message}
