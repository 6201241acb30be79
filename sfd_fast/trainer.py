"""The SFD training loop: alternating fake-score and generator updates.

Phases (each readable on one screen):
  setup     optimizers, EMA, RNG, resume
  step      fake-score update (all micro-batches, then one optimizer step), generator update, EMA
  tick      every `log_every` steps: the ONLY host sync — status line, stats.jsonl
  snapshot  sample grids and checkpoints

Robustness without host syncs: non-finite loss rows are masked in the step (step.py); after the
backward, a device-side flag says whether any gradient is non-finite; fused Adam skips the whole
update when it is set (weights and optimizer state unchanged), and a device counter of skipped
updates is reported at the next tick.
"""
from __future__ import annotations

import copy
import json
import logging
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, optimizer_from_flat, save_checkpoint
from .config import Config
from .denoisers import Denoiser, FrozenView
from .engine import autocast_context, prepare_for_training, select_generator_loss
from .generator import OneStepGenerator
from .optim import make_optimizer, nonfinite_flag
from .telemetry import gpu_telemetry
from .step import (NUM_STATS, STAT_FORGET_N, STAT_FORGET_SUM, STAT_NONFINITE, STAT_REMAIN_N,
                   STAT_REMAIN_SUM, draw_phase, fake_score_phase, generator_phase)

log = logging.getLogger("sfd_fast")


@dataclass
class RunParts:
    """What a model family hands the trainer."""
    task: object                      # draws per-row conditions (tasks.py)
    teacher: Denoiser                 # frozen
    fake_score: Denoiser              # trained
    generator: OneStepGenerator       # trained
    sample_shape: tuple
    save_grid: Optional[Callable] = None     # save_grid(generator_module, path)
    extra_state: dict = field(default_factory=dict)


def grads_nonfinite_flag(params: list[torch.Tensor]) -> torch.Tensor:
    """Device flag: does any gradient of `params` hold a NaN/inf? (see optim.nonfinite_flag)

    The plain trainer needs no per-tensor clean-up: when the flag is set the optimizer skips the
    update on the device and the gradients are then discarded (zero_grad(set_to_none=True)), so a
    per-parameter nan_to_num loop (hundreds of launches per UNet) would be pure overhead."""
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    return nonfinite_flag(grads, device)


class SFDTrainer:
    def __init__(self, cfg: Config, parts: RunParts, run_dir: Path, device: torch.device,
                 generator_loss_fn: Callable | None = None):
        self.cfg, self.parts, self.run_dir, self.device = cfg, parts, Path(run_dir), device
        # the generator-loss implementation (reference torch, or a fused kernel): engine.py decides
        self.loss_fn = generator_loss_fn or select_generator_loss(cfg.engine, device)
        t = cfg.train
        # 0. attention backend + activation checkpointing (an explicit request that cannot run raises)
        from .distributed import apply_attention_and_checkpointing
        apply_attention_and_checkpointing(parts, cfg.engine, device)
        # 1. networks: the teacher is frozen once, here, and never toggled
        self.teacher = parts.teacher.to(device).eval().requires_grad_(False)
        self.fake_score = parts.fake_score.to(device).eval()
        self.generator = parts.generator.to(device).eval()
        self.fake_score_view = FrozenView(self.fake_score)
        self.schedule = self.teacher.schedule.to(device)
        for d in (self.fake_score, self.generator.denoiser):
            d.schedule.to(device)
        # 2. optimizers (fp32 master weights; fused Adam)
        o = cfg.optim
        self.fake_params = [p for p in self.fake_score.parameters() if p.requires_grad]
        self.gen_params = [p for p in self.generator.parameters() if p.requires_grad]
        self.fake_opt = make_optimizer(o.fake_score, cfg.engine, self.fake_params, device)  # adam | adam8bit
        self.gen_opt = make_optimizer(o.generator, cfg.engine, self.gen_params, device)
        # 3. EMA of the generator (a separate copy only when enabled)
        self.ema_enabled = t.ema.decay is not None or t.ema.halflife_kimg > 0
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False) if self.ema_enabled else self.generator
        # 4. RNG and counters
        self.rng = torch.Generator(device=device).manual_seed(cfg.run.seed)
        self.step = 0
        self.nimg = 0
        self.skipped = torch.zeros(2, device=device)      # (fake_score, generator) skipped updates
        self.stats = torch.zeros(2, NUM_STATS, device=device)
        self.micro = t.batch_size // t.grad_accum
        self.autocast = lambda: autocast_context(cfg.engine.precision, device)
        # 5. acceleration (torch.compile of the networks), after the EMA copy: engine.py decides
        prepare_for_training(self)

    # ------------------------------------------------------------------ one step
    def _draw(self, phase: str, remain_coef: float, forget_coef: float):
        s = self.cfg.sfd
        n_forget = self.micro if forget_coef > 0 else 0
        return draw_phase(self.parts.task, self.rng, self.micro, n_forget, self.parts.sample_shape,
                          s.t_min, s.t_max, remain_coef, forget_coef, self.device, phase)

    def _optimizer_step(self, opt, params, clip_value, role_idx: int):
        flag = grads_nonfinite_flag(params)
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, clip_value, foreach=True)
        opt.found_inf = flag.to(self.device)
        opt.grad_scale = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.skipped[role_idx] += flag

    def fake_score_update(self):
        s, t = self.cfg.sfd, self.cfg.train
        for _ in range(t.grad_accum):
            draws = self._draw("fake_score", s.sg_remain_coef, s.sg_forget_coef)
            with self.autocast():
                loss, stats = fake_score_phase(self.generator, self.fake_score, self.schedule, draws,
                                               s.cfg_train_fake, t.batch_size)
            loss.backward()
            self.stats[0] += stats
        self._optimizer_step(self.fake_opt, self.fake_params, self.cfg.optim.fake_score.grad_clip_value, 0)

    def generator_update(self):
        s, t = self.cfg.sfd, self.cfg.train
        for _ in range(t.grad_accum):
            draws = self._draw("generator", s.g_remain_coef, s.g_forget_coef)
            with self.autocast():
                loss, stats = generator_phase(self.generator, self.fake_score_view, self.teacher,
                                              self.schedule, draws, s.alpha, s.cfg_eval_fake,
                                              s.cfg_eval_real, t.batch_size, self.loss_fn)
            loss.backward()
            self.stats[1] += stats
        self._optimizer_step(self.gen_opt, self.gen_params, self.cfg.optim.generator.grad_clip_value, 1)

    def ema_beta(self) -> float:
        e, b = self.cfg.train.ema, self.cfg.train.batch_size
        if e.decay is not None:
            return e.decay
        h = e.halflife_kimg * 1000
        if e.rampup_ratio is not None:
            h = min(h, self.nimg * e.rampup_ratio)
        return 0.5 ** (b / max(h, 1e-8))

    def ema_update(self):
        if not self.ema_enabled:
            return
        beta = self.ema_beta()  # a host float from the step count: no sync
        ema = [p for p in self.generator_ema.parameters()]
        src = [p.detach() for p in self.generator.parameters()]
        torch._foreach_lerp_(ema, src, 1.0 - beta)

    def train_step(self):
        self.fake_score_update()
        self.generator_update()
        self.step += 1
        self.nimg += self.cfg.train.batch_size
        self.ema_update()

    # ------------------------------------------------------------------ checkpoints
    def state_dict_weights(self) -> dict:
        w = {"generator": self.generator.net.state_dict(), "fake_score": self.fake_score.net.state_dict()}
        if self.ema_enabled:
            w["generator_ema"] = self.generator_ema.net.state_dict()
        return w

    def save(self) -> Path:
        state = {"step": self.step, "nimg": self.nimg, "skipped": self.skipped.tolist(),
                 "data_position": {"rng_draws": "in rng.safetensors"}}
        task_rng = self.parts.task.rng_state() if hasattr(self.parts.task, "rng_state") else None
        return save_checkpoint(self.run_dir, self.step, self.state_dict_weights(),
                               {"generator": self.gen_opt, "fake_score": self.fake_opt}, state,
                               self.rng.get_state(), task_rng)

    def resume(self, run_dir: Path):
        ck = load_checkpoint(latest_checkpoint(run_dir))
        self.generator.net.load_state_dict(ck["weights"]["generator"])
        self.fake_score.net.load_state_dict(ck["weights"]["fake_score"])
        if self.ema_enabled:
            self.generator_ema.net.load_state_dict(ck["weights"]["generator_ema"])
        meta = ck["state"]["optimizers"]
        optimizer_from_flat(self.gen_opt, ck["optim"]["generator"], meta["generator"])
        optimizer_from_flat(self.fake_opt, ck["optim"]["fake_score"], meta["fake_score"])
        self.rng.set_state(ck["rng"])
        if ck.get("task_rng") is not None and hasattr(self.parts.task, "set_rng_state"):
            self.parts.task.set_rng_state(ck["task_rng"])
        self.step, self.nimg = ck["state"]["step"], ck["state"]["nimg"]
        self.skipped = torch.tensor(ck["state"]["skipped"], device=self.device)
        log.info("resumed from %s at step %d", run_dir, self.step)

    # ------------------------------------------------------------------ the loop
    def _tick(self, t0: float, steps_in_tick: int, bar) -> dict:
        """Host sync happens here, once per tick."""
        st = self.stats.tolist()
        skipped = self.skipped.tolist()
        dt = max(time.time() - t0, 1e-9)
        sfd_samples = steps_in_tick * 2 * self.cfg.train.batch_size  # remain + forget per step
        def mean(row, s_idx, n_idx):
            return st[row][s_idx] / st[row][n_idx] if st[row][n_idx] else float("nan")
        rec = {
            "step": self.step, "kimg": self.nimg / 1000, "time": time.time(),
            "samples_per_s": sfd_samples / dt, "sec_per_kimg": dt / max(steps_in_tick * self.cfg.train.batch_size / 1000, 1e-9),
            "fake_score_loss/remain": mean(0, STAT_REMAIN_SUM, STAT_REMAIN_N),
            "fake_score_loss/forget": mean(0, STAT_FORGET_SUM, STAT_FORGET_N),
            "generator_loss/remain": mean(1, STAT_REMAIN_SUM, STAT_REMAIN_N),
            "generator_loss/forget": mean(1, STAT_FORGET_SUM, STAT_FORGET_N),
            "nonfinite_rows": st[0][STAT_NONFINITE] + st[1][STAT_NONFINITE],
            "skipped_updates/fake_score": skipped[0], "skipped_updates/generator": skipped[1],
            "peak_mem_bytes": peak_memory_bytes(self.device),
            **gpu_telemetry(self.device),   # {} without a GPU
        }
        self.stats.zero_()
        with open(self.run_dir / "stats.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        line = (f"step {rec['step']:>7d}  kimg {rec['kimg']:8.3f}  {rec['samples_per_s']:8.1f} samples/s  "
                f"{rec['sec_per_kimg']:7.2f} s/kimg  fake {rec['fake_score_loss/remain']:.4g}/"
                f"{rec['fake_score_loss/forget']:.4g}  G {rec['generator_loss/remain']:.4g}/"
                f"{rec['generator_loss/forget']:.4g}  skipped {int(skipped[0])}/{int(skipped[1])}  "
                f"mem {rec['peak_mem_bytes'] / 2**20:.0f} MiB")
        if bar is not None:
            bar.write(line)
        else:
            log.info(line)
        return rec

    def train(self, total_steps: int | None = None) -> list[dict]:
        cfg = self.cfg.train
        total = total_steps or cfg.total_steps
        records = []
        if self.step == 0 and self.parts.save_grid is not None:
            self.parts.save_grid(self.generator_ema, self.run_dir / "samples" / "step-00000000.png")
        show_bar = cfg.progress and sys.stderr.isatty()
        bar = tqdm(total=total, initial=self.step, desc="SFD", unit="step", dynamic_ncols=True) if show_bar else None
        t0, tick_start = time.time(), self.step
        while self.step < total:
            self.train_step()
            if bar is not None:
                bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == total:
                records.append(self._tick(t0, self.step - tick_start, bar))
                t0, tick_start = time.time(), self.step
            if self.parts.save_grid is not None and (self.step % cfg.sample_every == 0 or self.step == total):
                self.parts.save_grid(self.generator_ema, self.run_dir / "samples" / f"step-{self.step:08d}.png")
            if self.step % cfg.checkpoint_every == 0 or self.step == total:
                self.save()
        if bar is not None:
            bar.close()
        return records


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # CPU: peak resident set size of this process (Linux reports KiB)
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
