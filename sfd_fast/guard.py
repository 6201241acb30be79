"""Stopping a run cleanly: on SIGTERM/SIGINT, and when it cannot train (every update skipped).

SIGTERM (what schedulers send before preemption) or SIGINT (Ctrl-C): the current step finishes, a
checkpoint is written and the run exits with 128 + the signal number and one line saying so; a
second signal exits at once (the checkpoint protocol keeps the previous checkpoint intact). Under
DeepSpeed the ranks agree on the stop every min(10, log_every) steps, so a stop can take up to
that many steps: a one-element all-reduce of a CPU tensor over a gloo group, host to host, which
never waits for a device.

Consecutive skipped updates are counted on the device (no host sync per step) and read with the
log tick's statistics, in the tick's one host read (trainer._tick -> `note_tick`). When a network's
updates were skipped at least `train.max_consecutive_skips` times in a row at a tick, nothing has
changed its weights since the last good update, so a checkpoint of the current state is the last
good state: it is written and the run exits with status 3, naming the network and the non-finite
rows. The stop comes at the first tick at or after the limit (at most log_every - 1 steps late).
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import torch

from .errors import RunCannotTrain, UserError
from .step import STAT_NONFINITE

log = logging.getLogger("sfd_fast")
ROLES = ("fake_score", "generator")


class RunInterrupted(UserError):
    """A signal stopped the run after a checkpoint; the message is one line, not an error."""
    prefix = ""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class RunGuard:
    def __init__(self, trainer):
        self.trainer = trainer
        self.limit = trainer.cfg.train.max_consecutive_skips
        self.every = max(1, trainer.cfg.train.log_every)     # the log tick: the only host read
        self.runs_at_tick = None        # the consecutive counts read by this step's tick (note_tick)
        self._stop_group = None         # DeepSpeed: a gloo group for the signal agreement
        self.prev = trainer.skipped.clone()
        self.consecutive = torch.zeros_like(trainer.skipped)
        # non-finite loss rows per phase during the current run of skipped updates; the trainer's stats
        # are sums since the last tick (zeroed there), so the per-step rows are a difference to `last`
        self.last_rows = torch.zeros_like(trainer.skipped)
        self.rows_in_run = torch.zeros_like(trainer.skipped)
        self.signum = 0
        self.start_step = None          # the step this process started training from
        self._saved_handlers = {}

    # ---------------------------------------------------------------- signals
    def install_signals(self) -> None:
        import threading
        if threading.current_thread() is not threading.main_thread():   # only the main thread may
            log.warning("training outside the main thread: SIGTERM/SIGINT will not write a checkpoint")
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._saved_handlers[sig] = signal.signal(sig, self._on_signal)

    def restore_signals(self) -> None:
        for sig, handler in self._saved_handlers.items():
            signal.signal(sig, handler)
        self._saved_handlers = {}

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum:
            print(f"{name} again: exiting now without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"{name}: finishing step {self.trainer.step + 1}, then writing a checkpoint "
              f"(send {name} again to exit at once)", file=sys.stderr, flush=True)

    def _stop_requested(self) -> int:
        b = self.trainer.backend
        if b.world == 1:
            return self.signum
        if self.trainer.step % min(10, self.every):   # ranks agree every <= 10 steps: one small all-reduce
            return 0
        from .engine.device import host_side
        with host_side():   # a CPU tensor over gloo: host to host, the device queue is never waited for
            if self._stop_group is None:   # collective: every rank reaches the first check at the same step
                self._stop_group = torch.distributed.new_group(backend="gloo")
            flag = torch.tensor([float(self.signum)])   # every rank stops together
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._stop_group)
            return int(flag.item())

    # ---------------------------------------------------------------- per step
    def after_step(self) -> None:
        """Device-side run lengths of skipped updates (a skip increments trainer.skipped)."""
        t = self.trainer
        if self.start_step is None:
            self.start_step = t.step - 1
        did_skip = t.skipped > self.prev
        self.consecutive = torch.where(did_skip, self.consecutive + 1, torch.zeros_like(self.consecutive))
        self.prev.copy_(t.skipped)
        if (t.step - 1) % t.cfg.train.log_every == 0:   # the previous step ended with a tick: stats were zeroed
            self.last_rows.zero_()
        rows = t.stats[..., STAT_NONFINITE].reshape(2, -1).sum(1)   # per network, over row groups
        self.rows_in_run = torch.where(did_skip, self.rows_in_run + rows - self.last_rows,
                                       torch.zeros_like(self.rows_in_run))
        self.last_rows.copy_(rows)

    def note_tick(self, runs: list) -> None:
        """The consecutive-skip counts as read by the log tick (its one host read, trainer._tick)."""
        self.runs_at_tick = runs

    def check(self, saved_now: bool, final: bool = False) -> None:
        """Raise RunInterrupted / RunCannotTrain after writing a checkpoint (unless one was just written).
        At the final step a run shorter than the limit whose every update was skipped stops too: it
        must not exit 0 without having trained."""
        t = self.trainer
        signum = self._stop_requested()
        if signum:
            ck = t.run_dir / "checkpoints" / f"step-{t.step:08d}" if saved_now else t.save()
            raise RunInterrupted(f"stopped by {signal.Signals(signum).name} at step {t.step}; checkpoint "
                                 f"{ck} written; continue with --resume {t.run_dir}", signum)
        if t.step % self.every and not final:
            return
        runs, self.runs_at_tick = self.runs_at_tick, None
        if runs is None:                       # no tick this step (a trainer driven without train())
            runs = self.consecutive.tolist()
        limit = min(self.limit, t.step - self.start_step) if final else self.limit
        stuck = [r for r, n in zip(ROLES, runs) if n >= limit]
        if not stuck:
            return
        ck = t.run_dir / "checkpoints" / f"step-{t.step:08d}" if saved_now else t.save()
        nonfinite = self.rows_in_run.tolist()
        raise RunCannotTrain(
            f"training stopped at step {t.step}: the last {int(max(runs))} updates of the "
            f"{' and '.join(stuck)} were all skipped (non-finite gradients); non-finite loss rows during those "
            f"updates: {_rows(nonfinite)}; {first_nonfinite_weight(t)}. Checkpoint {ck} holds the last good "
            "weights. Check the teacher, the learning rates, guidance and schedule values "
            "(or raise train.max_consecutive_skips)")


def _rows(nonfinite: list) -> str:
    if len(nonfinite) != 2:
        return "unknown"
    return f"fake-score phase {int(nonfinite[0])}, generator phase {int(nonfinite[1])}"


def first_nonfinite_weight(trainer) -> str:
    """The first non-finite weight of the teacher, fake score or generator, for the stop message."""
    for role in ("teacher", "fake_score", "generator"):
        for name, p in getattr(trainer, role).named_parameters():
            if not bool(torch.isfinite(p).all()):
                return f"{role} weight {name!r} is non-finite"
    return "every weight is finite"
