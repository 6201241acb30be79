"""Seconds of SFD training, excluding evaluation, grids, checkpoints and everything before step 1.

The trainer runs the clock around its steps and ticks and pauses it around the work that is not SFD
(evaluation during training, sample grids, checkpoints). The total is saved in each checkpoint's
trainer state and restored on resume, like step and nimg.

Honest time on an accelerator: kernels run asynchronously, so the host clock at an arbitrary point
is ahead of the device. The clock therefore synchronizes the device only when it pauses, i.e. right
before evaluation, grids or checkpoints, which read results from the device anyway (they would wait
for the same queue a moment later): no per-step synchronization is added. `over_limit()` reads the
host clock without a sync, so on an accelerator the stop may come a few queued steps after the limit;
the recorded seconds, taken at the next pause, include those steps.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class SFDClock:
    def __init__(self, device: torch.device, limit_s: float = 0.0):
        self.device = torch.device(device)
        self.limit_s = limit_s          # 0: no limit
        self.total = 0.0                # seconds accumulated in finished running segments
        self._since = None              # perf_counter() when the current segment started (None: paused)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        if self._since is None:
            self._since = time.perf_counter()

    def stop(self) -> None:
        """Pause: waits for the device's queued SFD work (see the module docstring), then adds the segment."""
        if self._since is not None:
            self._sync()
            self.total += time.perf_counter() - self._since
            self._since = None

    @contextmanager
    def paused(self, pause: bool = True):
        """Work that is not SFD training; `pause=False` runs it on the clock (and adds no sync)."""
        running = self._since is not None
        if pause:
            self.stop()
        try:
            yield
        finally:
            if pause and running:
                self.start()

    def seconds(self) -> float:
        """SFD seconds so far (host clock, no sync: exact on CPU and whenever paused)."""
        return self.total + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def over_limit(self) -> bool:
        return self.limit_s > 0 and self.seconds() >= self.limit_s
