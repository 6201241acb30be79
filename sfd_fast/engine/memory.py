"""Memory estimate: the preflight that refuses a micro-batch that cannot fit, before anything is
written (the auto micro-batch choice, engine/autobatch.py, uses the finer engine/memory_model.py).

    need = weights (teacher, fake score, generator, EMA copy)
         + gradients (fp32; / world under ZeRO-2/3) and Adam state (m, v: 8 bytes per parameter,
           2 with engine.optimizer adam8bit; / world under ZeRO-1/2/3) of the two trained networks
         + activations: per-row bytes x rows x 3 networks held for one backward (left out with
           engine.activation_checkpointing: the estimate is then a lower bound)
    rows  = remain + forget rows of one micro-batch on this rank, x2 when a guidance scale != 1
            (conditional and unconditional halves)

Per-row activation bytes are measured, not guessed: one no-grad forward of the generator on one
drawn row, under the run's precision (bf16 autocast halves it), with hooks summing every module
output (what autograd keeps is of that order; the generator phase holds the generator's, the fake
score's and the teacher's at once, hence x3). `micro_batch_estimator` measures it once and returns
the estimate as a function of the micro-batch (rows -> bytes): the pluggable shape a better memory
model can replace.
The limit is the memory this process can still get plus what its weights already use: CPU
MemAvailable from /proc/meminfo (os.sysconf as a fallback); CUDA torch.cuda.mem_get_info at run
time; engine.memory_limit_gib caps it (a shared device, or a stated limit in tests). The estimate
is rough (within a small factor): it is meant to refuse a batch that is clearly too large with a
message instead of the OOM killer or an allocator traceback, never a tiny run.
"""
from __future__ import annotations

import os
import resource

import torch

from ..errors import UserError


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) + int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _activation_bytes_per_row(parts, cfg, device) -> int:
    """Bytes of all module outputs of one generator forward on one row (no grad)."""
    from ..step import draw_phase
    s, net = cfg.sfd, parts.generator
    task_state = parts.task.rng_state() if hasattr(parts.task, "rng_state") else None
    total = [0]

    def hook(_m, _inp, out):
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(o):
                total[0] += o.numel() * o.element_size()
    handles = [m.register_forward_hook(hook) for m in net.modules()]
    try:
        rng = torch.Generator(device=device).manual_seed(0)
        d = draw_phase(parts.task, rng, 1, 0, parts.sample_shape, s.t_min, s.t_max, 1.0, 0.0, device, "generator")
        from .device import autocast_context
        with torch.no_grad(), autocast_context(cfg.engine.precision, device):
            net.to(device)(d.z, d.cond.generator_cond)
    finally:
        for h in handles:
            h.remove()
        if task_state is not None:   # the probe must not move the run's prompt stream
            parts.task.set_rng_state(task_state)
    return total[0]


def static_terms(cfg, parts, world: int = 1) -> dict:
    """The terms that do not depend on the micro-batch (bytes): weights, gradients, Adam state."""
    def size(net):
        return sum(p.numel() * p.element_size() for p in net.parameters())
    trained = sum(p.numel() for net in (parts.fake_score, parts.generator) for p in net.parameters()
                  if p.requires_grad)
    e = cfg.engine
    zero = e.zero_stage if e.backend == "deepspeed" else 0
    grads = 4 * trained / (world if zero >= 2 else 1)
    adam = (2 if e.optimizer == "adam8bit" else 8) * trained / (world if zero >= 1 else 1)
    ema = cfg.train.ema.decay is not None or cfg.train.ema.halflife_kimg > 0
    weights = size(parts.teacher) + size(parts.fake_score) + size(parts.generator) * (2 if ema else 1)
    return {"weights": weights, "gradients_and_adam": int(grads + adam), "adam": int(adam)}


def micro_batch_estimator(cfg, parts, device, world: int = 1):
    """A function micro -> estimate dict (bytes) for `micro` remain rows (and as many forget rows)
    per micro-batch on this rank. The per-row activation bytes are measured once, here; the
    function itself is arithmetic, so the auto choice can ask it for every candidate."""
    fixed = static_terms(cfg, parts, world)
    s, e = cfg.sfd, cfg.engine
    guided = any(g != 1 for g in (s.cfg_train_fake, s.cfg_eval_fake, s.cfg_eval_real))
    per_row = 0 if e.activation_checkpointing else _activation_bytes_per_row(parts, cfg, device)

    def estimate(micro: int) -> dict:
        rows = 2 * max(1, micro) * (2 if guided else 1)
        activations = 3 * rows * per_row
        need = fixed["weights"] + fixed["gradients_and_adam"] + activations
        return {**fixed, "activations": activations, "rows": rows, "need": need}
    return estimate


def estimate_bytes(cfg, parts, device, world: int = 1, micro: int | None = None) -> dict:
    """The terms of the estimate (bytes) for `micro` rows per branch on one rank (default: the
    configured micro-batch, train.batch_size / train.grad_accum / world)."""
    if micro is None:
        micro = cfg.train.batch_size // cfg.train.grad_accum // world
    return micro_batch_estimator(cfg, parts, device, world)(micro)


def memory_limit(cfg, device, resident_bytes: int) -> int:
    """Bytes this process may plan for: what it can still get plus `resident_bytes` already held
    (CPU: the weights are resident in RAM, so they sit on both sides of need <= limit; CUDA:
    available_bytes counts this process's allocation already), capped by engine.memory_limit_gib."""
    limit = available_bytes(device) + (resident_bytes if device.type != "cuda" else 0)
    cap = cfg.engine.memory_limit_gib
    return limit if cap is None else min(limit, int(cap * 2 ** 30))


def check_memory(cfg, parts, device, world: int = 1) -> dict:
    """Raise a UserError naming the estimate and the limit when the micro-batch cannot fit."""
    est = estimate_bytes(cfg, parts, device, world)
    need = est["need"]
    limit = memory_limit(cfg, device, est["weights"])
    if need > limit:
        gib = 2 ** 30
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} with train.grad_accum={cfg.train.grad_accum} needs about "
            f"{need / gib:.1f} GiB on {device} (weights {est['weights'] / gib:.1f}, gradients+Adam "
            f"{est['gradients_and_adam'] / gib:.1f}, activations {est['activations'] / gib:.1f} for "
            f"{est['rows']} rows per micro-batch), but only {limit / gib:.1f} GiB is available"
            f"{cap_note(cfg)}; raise train.grad_accum (smaller micro-batches, same math) or lower "
            "train.batch_size")
    return {**est, "limit": limit}


def cap_note(cfg) -> str:
    cap = cfg.engine.memory_limit_gib
    return "" if cap is None else f" (engine.memory_limit_gib={cap:g} caps it)"


def peak_memory(device) -> dict:
    """Peak memory since the last reset_peak_memory, shared by the trainer's tick and the benches: on
    CUDA the allocator's allocated and reserved peaks (as NVlabs/edm reports them per tick); on CPU
    the process's peak resident set size (ru_maxrss: not resettable, an upper bound for later work)."""
    if torch.device(device).type == "cuda":
        return {"peak_mem_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_mem_reserved_bytes": int(torch.cuda.max_memory_reserved(device))}
    return {"peak_mem_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}  # Linux: KiB


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
