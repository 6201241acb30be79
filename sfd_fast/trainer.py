"""THE SFD training loop: alternating fake-score and generator updates, for every backend.

Phases (each readable on one screen):
  setup     networks, EMA copy, RNG, then the acceleration plan (engine/plan.py: precision, attention,
            checkpointing, loss kernel, compile, micro-batch, backend, in that order)
  step      fake-score update (all micro-batches, then one optimizer step), generator update, EMA
  tick      every `log_every` steps: the ONLY host sync: status line, stats.jsonl, peak memory
  snapshot  sample grids and checkpoints

What differs between one process and DeepSpeed ZeRO (optimizer steps, the non-finite skip, EMA
source, save/load, ranks) is the backend object's (engine/plain.py documents the interface); the
step order, logging, grids and checkpoint cadence exist here only.

Robustness without host syncs: non-finite loss rows are masked in the step (step.py); after the
backward, a device-side flag says whether any gradient is non-finite and the optimizer skips the
whole update on the device (weights and optimizer state unchanged); a device counter of skipped
updates is reported at the next tick.
"""
from __future__ import annotations

import copy
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from .checkpoint import prune_checkpoints
from .config import Config
from .denoisers import Denoiser
from .engine.memory import peak_memory, reset_peak_memory
from .engine.plan import plan_acceleration
from .engine.telemetry import gpu_telemetry
from .generator import OneStepGenerator
from .guard import RunGuard
from .sfd_clock import SFDClock
from .step import NUM_STATS, PhaseContext, tick_losses
from .trackers import Trackers

log = logging.getLogger("sfd_fast")


@dataclass
class RunParts:
    """What a model family hands the trainer."""
    task: object                      # draws per-row conditions (conditions.py, sd/text.py)
    teacher: Denoiser                 # frozen
    fake_score: Denoiser              # trained
    generator: OneStepGenerator       # trained
    sample_shape: tuple
    save_grid: Optional[Callable] = None     # save_grid(generator_module, path)
    extra_state: dict = field(default_factory=dict)
    evaluate_during: Optional[Callable] = None   # evaluate_during(generator_module) -> {name: float}


class SFDTrainer:
    def __init__(self, cfg: Config, parts: RunParts, run_dir: Path | None, device: torch.device,
                 generator_loss_fn: Callable | None = None):
        self.cfg, self.parts, self.device = cfg, parts, device
        self.run_dir = Path(run_dir) if run_dir is not None else None   # None: --dry-run, nothing written
        t = cfg.train
        # 1. networks: the teacher is frozen once, here, and never toggled
        self.teacher = parts.teacher.to(device).eval().requires_grad_(False)
        self.fake_score = parts.fake_score.to(device).eval()
        self.generator = parts.generator.to(device).eval()
        self.schedule = self.teacher.schedule.to(device)
        for d in (self.fake_score, self.generator.denoiser):
            d.schedule.to(device)
        # 2. EMA of the generator (a separate copy only when enabled)
        self.ema_enabled = t.ema.decay is not None or t.ema.halflife_kimg > 0
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False) if self.ema_enabled else self.generator
        # 3. RNG and counters (device tensors: read at ticks only)
        self.rng = torch.Generator(device=device).manual_seed(cfg.run.seed)
        self.step = 0
        self.nimg = 0
        self.clock = SFDClock(device, t.time_limit_s)     # SFD seconds, evaluation excluded (sfd_clock.py)
        self.skipped = torch.zeros(2, device=device)      # (fake_score, generator) skipped updates
        # forget targets (several classes / concepts in one run): per-target loss statistics
        self.target_names = list(getattr(parts.task, "target_names", None) or ["forget"])
        self.stats = torch.zeros(2, len(self.target_names) + 1, NUM_STATS, device=device)
        # 4. the acceleration plan, in its fixed order (engine/plan.py): precision, attention,
        #    checkpointing, loss kernel, compile, micro-batch ("auto" probes these networks), backend
        self.plan = plan_acceleration(self, generator_loss_fn)
        b = self.backend
        # 5. what both phases take besides their draws (step.PhaseContext)
        self.phase_ctx = PhaseContext.for_trainer(self, b.phase_generator, b.phase_fake_score, b.fake_score_view,
                                                  b.denom)
        if b.is_rank0:
            self.plan.log()
        # 6. stop cleanly on SIGTERM/SIGINT and when every update is skipped (guard.py)
        self.guard = RunGuard(self)
        # 7. experiment trackers (trackers.py): train.py opens them on rank 0 once the run dir exists
        self.trackers = Trackers()

    def attach_run_dir(self, run_dir: Path) -> None:
        """Where this trainer writes, set once the run directory is open and locked: train.py builds
        the trainer first, so that the auto micro-batch probe runs before anything is written."""
        self.run_dir = Path(run_dir)
        write_configs = getattr(self.backend, "write_configs", None)   # DeepSpeed: its engine configs
        if write_configs is not None:
            write_configs()

    # ------------------------------------------------------------------ one step
    def fake_score_update(self):
        s, t, b = self.cfg.sfd, self.cfg.train, self.backend
        for _ in range(t.grad_accum):
            draws = b.draw("fake_score", s.sg_remain_coef, s.sg_forget_coef)
            with self.autocast():
                loss, stats = self.fake_score_phase_fn(self.phase_ctx, draws)
            b.backward("fake_score", loss)
            self.stats[0] += stats
        b.update("fake_score")

    def generator_update(self):
        s, t, b = self.cfg.sfd, self.cfg.train, self.backend
        with b.generator_phase():
            for _ in range(t.grad_accum):
                draws = b.draw("generator", s.g_remain_coef, s.g_forget_coef)
                with self.autocast():
                    loss, stats = self.generator_phase_fn(self.phase_ctx, draws)
                b.backward("generator", loss)
                self.stats[1] += stats
        b.update("generator")

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
        with self.backend.ema_pairs() as (ema, src):
            torch._foreach_lerp_(ema, src, 1.0 - beta)

    def train_step(self):
        self.fake_score_update()
        self.generator_update()
        self.step += 1
        self.nimg += self.cfg.train.batch_size
        self.ema_update()

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        state = {"step": self.step, "nimg": self.nimg, "sfd_seconds": self.clock.seconds(),
                 "skipped": self.skipped.tolist(),
                 "data_position": {"rng_draws": "in rng.safetensors"}}
        path = self.backend.save(state)
        if self.backend.is_rank0:
            prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        return path

    def resume(self, run_dir: Path):
        from .rundir import load_newest_usable   # the newest checkpoint that verifies and loads
        state, ck = load_newest_usable(self.backend, run_dir)
        self.step, self.nimg = state["step"], state["nimg"]
        self.clock.total = float(state.get("sfd_seconds", 0.0))   # checkpoints before issue #22: 0
        self.skipped.copy_(torch.tensor(state["skipped"], device=self.device))
        self.guard.prev.copy_(self.skipped)
        if self.backend.is_rank0:
            log.info("resumed from %s at step %d (%s backend)", ck, self.step, self.backend.name)

    # ------------------------------------------------------------------ the loop
    def _tick(self, t0: float, steps_in_tick: int, bar) -> dict:
        """The one host read of a tick window: statistics, skip counters and the guard's run lengths in
        one transfer (every rank, so each rank's guard decides on the same numbers)."""
        self.backend.reduce_stats(self.stats)
        n_stats = self.stats.numel()
        host = torch.cat([self.stats.flatten(), self.skipped, self.guard.consecutive]).tolist()
        self.guard.note_tick(host[n_stats + 2:])
        if not self.backend.is_rank0:
            self.stats.zero_()
            return {}
        nets, groups, k = self.stats.shape
        st = [[host[(i * groups + j) * k:(i * groups + j + 1) * k] for j in range(groups)] for i in range(nets)]
        skipped = host[n_stats:n_stats + 2]
        dt = max(time.time() - t0, 1e-9)
        batch = self.cfg.train.batch_size
        rec = {
            "step": self.step, "kimg": self.nimg / 1000, "time": time.time(),
            "samples_per_s": steps_in_tick * 2 * batch / dt,   # remain + forget rows per step
            "sec_per_kimg": dt / max(steps_in_tick * batch / 1000, 1e-9),
            **tick_losses(st, self.target_names),    # {net}_loss/remain, /forget[, /forget/<target>]
            "skipped_updates/fake_score": skipped[0], "skipped_updates/generator": skipped[1],
            "lr/fake_score": self.cfg.optim.fake_score.lr, "lr/generator": self.cfg.optim.generator.lr,
            **peak_memory(self.device),     # peaks since the last tick (reset below on CUDA)
            **gpu_telemetry(self.device),   # {} without a GPU
        }
        self.stats.zero_()
        with open(self.run_dir / "stats.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.trackers.scalars(rec)   # the same numbers, already on the host
        mem = f"mem {rec['peak_mem_bytes'] / 2**20:.0f} MiB"
        if "peak_mem_reserved_bytes" in rec:
            mem += f" (reserved {rec['peak_mem_reserved_bytes'] / 2**20:.0f} MiB)"
        line = (f"step {rec['step']:>7d}  kimg {rec['kimg']:8.3f}  {rec['samples_per_s']:8.1f} samples/s  "
                f"{rec['sec_per_kimg']:7.2f} s/kimg  fake {rec['fake_score_loss/remain']:.4g}/"
                f"{rec['fake_score_loss/forget']:.4g}  G {rec['generator_loss/remain']:.4g}/"
                f"{rec['generator_loss/forget']:.4g}  skipped {int(skipped[0])}/{int(skipped[1])}  {mem}")
        if bar is not None:
            bar.write(line)
        else:
            log.info(line)
        return rec

    def save_grid(self, name: str):
        """A sample grid of the EMA (else raw) generator; collective under DeepSpeed, written by rank 0."""
        if self.parts.save_grid is None:
            return
        gen = self.backend.sampling_generator()
        if self.backend.is_rank0:
            # grids run the nets at other batch sizes: eagerly, so the compiled graphs see no new shape
            with torch.compiler.set_stance("force_eager"):
                self.parts.save_grid(gen, self.run_dir / "samples" / name)
            self.trackers.image("samples", self.run_dir / "samples" / name, self.step)

    def evaluate_during(self) -> dict:
        """The family's evaluation on its fixed sample set (parts.evaluate_during), as a stats.jsonl
        record {"step", "time", "eval/<metric>": value}; collective under DeepSpeed, rank 0 writes."""
        if self.parts.evaluate_during is None or self.run_dir is None:
            return {}
        gen = self.backend.sampling_generator()
        if not self.backend.is_rank0:
            return {}
        with torch.compiler.set_stance("force_eager"):   # other batch sizes: no new compiled graph
            metrics = self.parts.evaluate_during(gen)
        rec = {"step": self.step, "kimg": self.nimg / 1000, "time": time.time(),
               "sfd_seconds": self.clock.seconds(),     # the clock is paused during evaluation
               **{f"eval/{k}": v for k, v in metrics.items()}}
        with open(self.run_dir / "stats.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.trackers.scalars(rec)
        log.info("eval at step %d: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return rec

    def train(self, total_steps: int | None = None) -> list[dict]:
        cfg = self.cfg.train
        total = total_steps or cfg.total_steps
        records = []
        eval_every = self.cfg.eval.every if self.cfg.eval.enabled else 0
        if self.backend.is_rank0 and self.run_dir is not None:
            self.plan.write(self.run_dir)     # acceleration_plan.json: what this run executes (a resume rewrites it)
        if self.step == 0:
            self.save_grid("step-00000000.png")
            if eval_every:
                self.evaluate_during()
            self.backend.release_sampling()   # DeepSpeed without EMA: free the temporary fp32 copy
        show_bar = cfg.progress and sys.stderr.isatty() and self.backend.is_rank0
        bar = tqdm(total=total, initial=self.step, desc="SFD", unit="step", dynamic_ncols=True) if show_bar else None
        reset_peak_memory(self.device)
        t0, tick_start = time.time(), self.step
        self.clock.start()
        while self.step < total:
            self.train_step()
            self.guard.after_step()
            last = self.step == total or self.clock.over_limit()   # train.time_limit_s: finish normally here
            if bar is not None:
                bar.update(1)
            if self.step % cfg.log_every == 0 or last:
                records.append(self._tick(t0, self.step - tick_start, bar))
                reset_peak_memory(self.device)
                t0, tick_start = time.time(), self.step
            grid = self.step % cfg.sample_every == 0 or last
            evaluate = eval_every and (self.step % eval_every == 0 or last)
            saved = self.step % cfg.checkpoint_every == 0 or last
            with self.clock.paused(grid or evaluate or saved):   # not SFD time; syncs only here (sfd_clock.py)
                if grid:
                    self.save_grid(f"step-{self.step:08d}.png")
                if evaluate:
                    self.evaluate_during()
                if not last:
                    self.backend.release_sampling()   # grid + eval share one copy; the last is kept (finish)
                if saved:
                    self.save()
            self.guard.check(saved, final=last)
            if last:
                break
        self.clock.stop()
        if self.step < total and self.backend.is_rank0:
            log.info("train.time_limit_s=%g reached at step %d (%.1f s of SFD)", cfg.time_limit_s, self.step,
                     self.clock.seconds())
        if bar is not None:
            bar.close()
        self.backend.finish()
        return records

