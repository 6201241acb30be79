"""Fault injection on a running run: concurrent runs on one directory, SIGTERM / SIGINT, a run whose
every update is skipped."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sfd_fast.checkpoint import checkpoint_status

from .fault_tools import ROOT, fault_base, run_main, stats, subprocess_env, train_subprocess, tree  # noqa: F401

HOLD_LOCK = ("import sys, time\nfrom sfd_fast.rundir import RunLock\nRunLock(sys.argv[1]).acquire()\n"
             "print('locked', flush=True)\ntime.sleep(120)\n")


def test_concurrent_run_on_one_directory_is_refused_then_stale_lock_taken_over(fault_base, tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree(run)
        code, msg = run_main(["--config", str(fault_base["cfg"]), "--run-dir", str(run)])
        assert code == 2 and f"in use by pid {holder.pid}" in msg and str(run / ".lock") in msg, msg
        assert tree(run) == before                     # no config.json, no stats, no checkpoint
    finally:
        holder.kill()                                  # kill -9: the lock file stays, naming a dead pid
        holder.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == holder.pid
    assert run_main(["--config", str(fault_base["cfg"]), "--run-dir", str(run)]) == (0, "")
    assert f"stale lock {run / '.lock'}: pid {holder.pid}" in caplog.text
    assert [r["step"] for r in stats(run)] == list(range(1, 10))
    assert (run / ".lock").read_text() == ""           # released at the end of the run


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_writes_a_checkpoint_and_exits(fault_base, tmp_path, sig):
    run = tmp_path / "run"
    proc = train_subprocess(["--config", str(fault_base["cfg"]), "--run-dir", str(run), "--set",
                             "train.total_steps=1000000", "train.checkpoint_every=100000"])
    deadline = time.time() + 120
    while not ((run / "stats.jsonl").is_file() and (run / "stats.jsonl").read_text()):   # the first tick
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in out + err
    last = [l for l in err.strip().splitlines()][-1]
    assert last.startswith(f"stopped by {sig.name} at step ") and "--resume" in last, err[-2000:]
    step = int(last.split(" at step ")[1].split(";")[0])
    ck = run / "checkpoints" / f"step-{step:08d}"
    assert checkpoint_status(ck) is None and (run / "checkpoints" / "latest").read_text() == ck.name
    assert stats(run)[-1]["step"] == step                 # the step in flight was finished, not lost
    assert run_main(["--resume", str(run), "--set", f"train.total_steps={step + 1}"]) == (0, "")
    assert stats(run)[-1]["step"] == step + 1


def test_second_signal_exits_at_once(tmp_path):
    """The handler itself (a real run finishes its step too fast to catch between two signals)."""
    code = ("import os, signal, types, torch\nfrom sfd_fast.guard import RunGuard\n"
            "t = types.SimpleNamespace(cfg=types.SimpleNamespace(train=types.SimpleNamespace("
            "max_consecutive_skips=5, log_every=1)), skipped=torch.zeros(2), step=7)\n"
            "g = RunGuard(t); g.install_signals()\nos.kill(os.getpid(), signal.SIGTERM)\n"
            "print('first handled', flush=True)\nos.kill(os.getpid(), signal.SIGTERM)\nprint('not reached')\n")
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                         cwd=str(ROOT), timeout=120)
    assert out.returncode == 128 + signal.SIGTERM
    assert out.stdout.strip() == "first handled" and "exiting now" in out.stderr


def test_run_that_cannot_train_stops_with_a_checkpoint(fault_base, tmp_path, monkeypatch):
    """Every row non-finite: after max_consecutive_skips skipped updates the run writes the last good
    state (the initial weights: nothing was applied), names the networks and exits with status 3."""
    from sfd_fast.engine import plain
    real_draw = plain.draw_phase

    def nan_draw(*a, **k):
        d = real_draw(*a, **k)
        d.z.fill_(float("nan"))
        return d
    monkeypatch.setattr(plain, "draw_phase", nan_draw)
    run = tmp_path / "run"
    code, msg = run_main(["--config", str(fault_base["cfg"]), "--run-dir", str(run), "--set",
                          "train.total_steps=100", "train.max_consecutive_skips=4", "train.log_every=2",
                          "train.checkpoint_every=50"])
    assert code == 3, msg
    assert "stopped at step 4" in msg and "fake_score and generator" in msg and "non-finite" in msg, msg
    # 4 steps x 16 rows per phase, counted across the ticks at steps 2 and 4 (which zero the tick sums)
    assert "fake-score phase 64, generator phase 64" in msg
    ck = run / "checkpoints" / "step-00000004"
    assert checkpoint_status(ck) is None
    teacher = load_file(str(fault_base["dir"] / "teacher.safetensors"))
    gen = load_file(str(ck / "generator.safetensors"))
    assert all(torch.equal(gen[k], teacher[k]) for k in teacher)   # the last good state


def test_short_run_whose_every_update_is_skipped_does_not_exit_0(fault_base, tmp_path, monkeypatch):
    """Fewer steps than max_consecutive_skips, all skipped: the end of the run is checked too."""
    from sfd_fast.engine import plain
    real_draw = plain.draw_phase

    def nan_draw(*a, **k):
        d = real_draw(*a, **k)
        d.z.fill_(float("nan"))
        return d
    monkeypatch.setattr(plain, "draw_phase", nan_draw)
    code, msg = run_main(["--config", str(fault_base["cfg"]), "--run-dir", str(tmp_path / "run"),
                          "--set", "train.total_steps=5"])
    assert code == 3 and "the last 5 updates" in msg, msg
