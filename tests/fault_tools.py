"""Shared pieces of the fault-injection suite (tests/test_faults_*.py)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sfd_fast import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 9   # checkpoints at 3, 6, 9: a crash while writing step 6 resumes from 3 (or 6) and must end
            # bit-identical to the uninterrupted 9-step run
FAULT_TRAIN = {"total_steps": STEPS, "log_every": 1, "checkpoint_every": 3, "sample_every": 100,
               "ema": {"halflife_kimg": 0.01}}
LOSS_KEYS = ("fake_score_loss/remain", "fake_score_loss/forget", "generator_loss/remain", "generator_loss/forget",
             "skipped_updates/fake_score", "skipped_updates/generator", "kimg")


def run_main(argv) -> tuple[int, str]:
    """train.main in this process: (exit status, message) — 0 and '' when it returns."""
    try:
        train.main(argv)
    except SystemExit as e:
        return (e.code if isinstance(e.code, int) else 1), str(e)
    return 0, ""


def stats(run_dir) -> list[dict]:
    return [json.loads(l) for l in (Path(run_dir) / "stats.jsonl").read_text().splitlines()]


def losses(run_dir) -> list[tuple]:
    """Per-step losses and counters (not timings): equal lists = the same training."""
    return [(r["step"], *(r[k] for k in LOSS_KEYS)) for r in stats(run_dir)]


def final_tensors(run_dir, step=STEPS) -> dict:
    ck = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    return {f.name: load_file(str(f)) for f in sorted(ck.glob("*.safetensors"))
}


def assert_bit_identical(run_dir, reference, step=STEPS):
    a, b = final_tensors(run_dir, step), final_tensors(reference, step)
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    assert losses(run_dir) == losses(reference)


def tree(path) -> dict:
    """{relative path: (size, mtime_ns)} of everything under `path` (to prove nothing was written)."""
    path = Path(path)
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


def subprocess_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def train_subprocess(argv, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sfd_fast.train", *argv], env=subprocess_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))


def copy_run(src, dst) -> Path:
    shutil.copytree(src, dst)
    (Path(dst) / ".lock").unlink(missing_ok=True)
    return Path(dst)


@pytest.fixture(scope="session")
def fault_base(tmp_path_factory):
    """One tiny teacher, its config and the uninterrupted 9-step reference run, shared by the suite."""
    from .helpers import tiny_digits_config
    base = tmp_path_factory.mktemp("faults")
    cfg = tiny_digits_config(base, train=FAULT_TRAIN)
    reference = base / "reference"
    assert run_main(["--config", str(cfg), "--run-dir", str(reference)]) == (0, "")
    six = base / "six"   # the same run stopped at step 6: checkpoints 3 and 6 (the corruption template)
    assert run_main(["--config", str(cfg), "--run-dir", str(six), "--set", "train.total_steps=6"]) == (0, "")
    return {"dir": base, "cfg": cfg, "reference": reference, "six": six}


CRASH_DRIVER = r'''
import json, os, sys
from sfd_fast import train            # imported once; every case runs in a fork of this process
cases, warmup = json.loads(sys.argv[1]), json.loads(sys.argv[2])
train.main(warmup)                     # pays every lazy import once, before the forks
status = {}
for name, (crash_at, argv) in cases.items():
    pid = os.fork()
    if pid == 0:
        os.environ["SFD_FAST_CRASH_AT"] = crash_at
        try:
            train.main(argv)
        finally:
            os._exit(0)
    status[name] = os.waitpid(pid, 0)[1]
print(json.dumps(status))
'''


def crash_runs(cases: dict, warmup_argv: list) -> dict:
    """{name: (SFD_FAST_CRASH_AT value, train argv)} -> {name: raw wait status}: each case runs in a fork
    of one subprocess (torch imported once) and is expected to die by SIGKILL at its crash point."""
    out = subprocess.run([sys.executable, "-c", CRASH_DRIVER, json.dumps(cases), json.dumps(warmup_argv)],
                         env=subprocess_env(),
                         capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
