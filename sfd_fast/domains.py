"""Numeric domains of the run config: every number finite, every key inside the range its math needs.

Called by config.validate before anything is built or written; `bad(key, message)` raises the
ConfigError naming the key. A NaN passes every `<`/`>` comparison as False, so each range check is
written as `not (inside)`, and finiteness is checked first for every float in the tree.
"""
from __future__ import annotations

import dataclasses
import math
import re

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _numbers(node, prefix=""):
    """(dotted key, value) for every float/int leaf and every number inside a list."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, key + ".")
        elif isinstance(value, (list, tuple)):
            for v in value:
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    yield key, v
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value


def validate_numbers(cfg, bad) -> None:
    """Finiteness of every number, then the domains the math needs (docs/reliability.md lists them)."""
    for key, value in _numbers(cfg):
        if not math.isfinite(value):
            bad(key, f"must be a finite number, got {value!r}")
    sch, s, t = cfg.schedule, cfg.sfd, cfg.train
    if not 0 < sch.beta_start < sch.beta_end < 1:
        bad("schedule.beta_start/beta_end", f"need 0 < beta_start < beta_end < 1 (noise variances per step), "
            f"got {sch.beta_start}, {sch.beta_end}")
    for role in ("fake_score", "generator"):
        o = getattr(cfg.optim, role)
        if not o.eps > 0:
            bad(f"optim.{role}.eps", f"must be > 0 (Adam divides by sqrt(v) + eps), got {o.eps}")
        if not o.weight_decay >= 0:
            bad(f"optim.{role}.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if not s.alpha >= 0:
        bad("sfd.alpha", f"must be >= 0 (the SiD weight of the fake-score term), got {s.alpha}")
    e = t.ema
    if e.rampup_ratio is not None and not e.rampup_ratio > 0:
        bad("train.ema.rampup_ratio", f"must be > 0 or null, got {e.rampup_ratio}")
    if t.keep_checkpoints < 0:
        bad("train.keep_checkpoints", f"must be >= 0 (0 keeps every checkpoint), got {t.keep_checkpoints}")
    if t.max_consecutive_skips < 1:
        bad("train.max_consecutive_skips", f"must be >= 1, got {t.max_consecutive_skips}")
    if not DEVICE_PATTERN.fullmatch(cfg.run.device):
        bad("run.device", f"must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {cfg.run.device!r}")
    p = cfg.pretrain
    for k in ("steps", "batch_size", "classifier_epochs"):
        if getattr(p, k) < 1:
            bad(f"pretrain.{k}", f"must be >= 1, got {getattr(p, k)}")
    if not p.lr > 0:
        bad("pretrain.lr", f"must be > 0, got {p.lr}")
    if not 0 <= p.cond_drop_prob < 1:
        bad("pretrain.cond_drop_prob", f"must be in [0, 1), got {p.cond_drop_prob}")
    if cfg.eval.teacher_steps < 1:
        bad("eval.teacher_steps", f"must be >= 1, got {cfg.eval.teacher_steps}")


def validate_engine(cfg, bad) -> None:
    """The engine section's choices (one of the listed values each)."""
    e = cfg.engine
    if e.backend not in ("plain", "deepspeed"):
        bad("engine.backend", f"must be 'plain' or 'deepspeed', got {e.backend!r}")
    if e.precision not in ("fp32", "bf16"):
        bad("engine.precision", f"must be 'fp32' or 'bf16', got {e.precision!r}")
    if e.kernels not in ("auto", "torch", "triton"):
        bad("engine.kernels", f"must be 'auto', 'torch' or 'triton', got {e.kernels!r}")
    if e.attention not in ("sdpa", "xformers", "auto"):
        bad("engine.attention", f"must be 'sdpa', 'xformers' or 'auto', got {e.attention!r}")
    if e.optimizer not in ("adam", "adam8bit"):
        bad("engine.optimizer", f"must be 'adam' or 'adam8bit', got {e.optimizer!r}")
    if e.rng_mode not in ("global_slice", "per_rank"):
        bad("engine.rng_mode", f"must be 'global_slice' or 'per_rank', got {e.rng_mode!r}")
    if not 0 <= e.zero_stage <= 3:
        bad("engine.zero_stage", f"must be 0, 1, 2 or 3, got {e.zero_stage}")
    if e.compile_mode not in ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"):
        bad("engine.compile_mode", "must be 'default', 'max-autotune', 'max-autotune-no-cudagraphs' or "
            f"'reduce-overhead', got {e.compile_mode!r}")
    if e.compile and e.compile_phase:
        bad("engine.compile_phase", "compiles the networks inside each phase already; set engine.compile=false")
    if e.compile_regions and not e.compile:
        bad("engine.compile_regions", "chooses what engine.compile compiles; set engine.compile=true too")
    if e.memory_limit_gib is not None and not (isinstance(e.memory_limit_gib, (int, float))
                                               and not isinstance(e.memory_limit_gib, bool) and e.memory_limit_gib > 0):
        bad("engine.memory_limit_gib", f"must be null (the device's free memory) or a positive number of GiB, "
            f"got {e.memory_limit_gib!r}")


def validate_micro_batch(t, bad) -> None:
    """train.micro_batch: null (batch_size / grad_accum), an int dividing batch_size, which then
    sets train.grad_accum, or "auto" (engine/autobatch.py resolves it to an int when the trainer is
    built; train.grad_accum then follows from the choice)."""
    m = t.micro_batch
    if m == "auto":
        if t.grad_accum != 1:
            bad("train.micro_batch", f"'auto' chooses train.grad_accum itself; remove train.grad_accum "
                f"({t.grad_accum}) or give train.micro_batch as an integer")
    elif m is not None and not (isinstance(m, int) and not isinstance(m, bool) and m > 0 and t.batch_size % m == 0):
        bad("train.micro_batch", f"must be null or a positive integer dividing train.batch_size "
            f"({t.batch_size}), got {m!r}")
    elif m is not None:
        if t.grad_accum not in (1, t.batch_size // m):
            bad("train.micro_batch", f"({m}) and train.grad_accum ({t.grad_accum}) disagree: give one of them")
        t.grad_accum = t.batch_size // m   # the accumulation follows from the micro-batch
