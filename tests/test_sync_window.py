"""Host syncs over a whole window of training steps (issue #20 item 1).

A window is `log_every` steps of `SFDTrainer.train()` in the middle of a run (no grid, evaluation or
checkpoint falls in it): both updates with their optimizer steps and non-finite skips, the EMA, the
guard's per-step bookkeeping and its check, and the log tick. tests/sync_detector.py records every
op that would make the host wait for a CUDA device. The count is exactly ONE: the tick's read of
statistics, skip counters and the guard's run lengths in one transfer (trainer._tick). The README
quotes this count. The DeepSpeed stop agreement is a gloo all-reduce of a CPU tensor (host to host,
guard.py); the DeepSpeed window itself is not counted here (it needs 2 ranks).

The detector also catches a pageable upload on a CPU machine (planted below), where host and device
are one and `.to(device)` dispatches nothing.
"""
import pytest
import torch

from sfd_fast import step as step_module
from sfd_fast.config import load_config
from sfd_fast.engine.device import host_to_device
from sfd_fast.trainer import SFDTrainer
from sfd_fast.train import build_parts
from tests.helpers import tiny_digits_config
from tests.sync_detector import SyncRecorder, why_sync

pytestmark = pytest.mark.usefixtures("one_thread")
LOG_EVERY = 4


class WindowDone(Exception):
    pass


def _syncs_in_window(tmp_path, **engine):
    """Steps 5..8 of a 100-step run with log_every 4 (tick and guard check at step 8)."""
    cfg = load_config(tiny_digits_config(
        tmp_path, engine=engine,
        train={"total_steps": 100, "log_every": LOG_EVERY, "sample_every": 1000, "checkpoint_every": 1000,
               "ema": {"halflife_kimg": 0.5}, "max_consecutive_skips": 2}))
    trainer = SFDTrainer(cfg, build_parts(cfg), tmp_path / "run", torch.device("cpu"))
    (tmp_path / "run").mkdir()
    recorder = SyncRecorder()
    real_step = trainer.train_step

    def step_with_window():
        if trainer.step == LOG_EVERY:
            recorder.__enter__()
        if trainer.step == 2 * LOG_EVERY:
            recorder.__exit__(None, None, None)
            raise WindowDone
        real_step()
    trainer.train_step = step_with_window
    trainer.parts.save_grid = None                 # the step-0 grid is outside the window anyway
    with pytest.raises(WindowDone):
        trainer.train()
    return recorder.found


@pytest.mark.parametrize("optimizer", ["adam", "adam8bit"])
def test_one_host_read_per_tick_window(tmp_path, optimizer):
    if optimizer == "adam8bit":
        pytest.importorskip("bitsandbytes")
    found = _syncs_in_window(tmp_path, optimizer=optimizer)
    assert len(found) == 1, found
    op, reason, where = found[0]
    assert op == "tolist" and where.endswith(tuple(f"trainer.py:{n}" for n in range(1, 400))), found


def test_window_count_sees_a_planted_per_step_read(tmp_path, monkeypatch):
    """The count can fail: the old guard's read, planted back per step, adds 4 reads to the window."""
    from sfd_fast import guard
    real = guard.RunGuard.after_step

    def reads_every_step(self):
        real(self)
        self.consecutive.tolist()
    monkeypatch.setattr(guard.RunGuard, "after_step", reads_every_step)
    assert len(_syncs_in_window(tmp_path)) == 1 + LOG_EVERY


@pytest.mark.parametrize("plant", ["to", "to_non_blocking_unpinned", "copy_", "cuda_style_tensor"])
def test_detector_catches_a_pageable_upload_on_cpu(tmp_path, monkeypatch, plant):
    real = step_module.phase_stats

    def planted(per_row, cond, *args):
        if plant == "to":
            scale = torch.ones(per_row.shape[0]).to(per_row.device)
        elif plant == "to_non_blocking_unpinned":
            scale = torch.ones(per_row.shape[0]).to(per_row.device, non_blocking=True)
        elif plant == "copy_":
            scale = torch.empty_like(per_row).copy_(torch.ones(per_row.shape[0]))
        else:
            scale = torch.as_tensor([1.0] * per_row.shape[0]).to(device=per_row.device, dtype=per_row.dtype)
        return real(per_row * scale, cond, *args)

    monkeypatch.setattr(step_module, "phase_stats", planted)
    found = _syncs_in_window(tmp_path)
    uploads = [f for f in found if "host" in f[1] and "test_sync_window.py" in f[2]]
    assert len(uploads) >= LOG_EVERY * 2, found     # every phase of every step in the window


def test_dispatch_rules_alone_cannot_see_a_cpu_upload():
    """Why the watcher exists: on CPU the upload dispatches no copy op for the old rules to see."""
    seen = []

    class OnlyDispatch(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(why_sync(func, args, kwargs or {}))
            return func(*args, **(kwargs or {}))
    host = torch.ones(3)
    with OnlyDispatch():
        host.to("cpu")
    assert not [s for s in seen if s]
    with SyncRecorder() as rec:
        torch.ones(3).to("cpu")
    assert rec.found and "pageable" in rec.found[0][1]


def test_host_to_device_is_not_reported():
    with SyncRecorder() as rec:
        x = host_to_device([1, 2, 3], torch.long, "cpu")
        (x * 2).sum()
    assert rec.found == []
