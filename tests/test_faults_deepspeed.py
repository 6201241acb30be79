"""Fault injection, DeepSpeed backend (2 CPU ranks over gloo): a rank killed mid-checkpoint, rank 0
killed between the folder rename and the `latest` update, and a corrupted newest checkpoint; each
resume ends bit-identical to the uninterrupted DeepSpeed run. Three torchrun launches: the two crashes,
then one launch running the reference and the three resumes (as tests/test_deepspeed.py does)."""
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .fault_tools import STEPS, assert_bit_identical, fault_base, stats, subprocess_env  # noqa: F401

HAS_DS = importlib.util.find_spec("deepspeed") is not None
pytestmark = [pytest.mark.skipif(not HAS_DS, reason="deepspeed is not installed (pip install -e '.[dist]')"),
              pytest.mark.slow]   # three torchrun launches, about a minute on 2 cores

WORKER = textwrap.dedent('''
    import json, sys, torch
    from sfd_fast import train
    for argv in json.loads(open(sys.argv[1]).read()):
        try:
            train.main(argv)
        except SystemExit as e:
            print("EXIT", e.code, e, flush=True)
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()   # as train.cli does: no gloo teardown at exit
''')


def _launch(tmp, name, jobs, **env) -> subprocess.Popen:
    """One torchrun launch (2 ranks) running `jobs` (train argv lists) in order."""
    (tmp / f"{name}.json").write_text(json.dumps(jobs))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun) if torchrun.exists() else sys.executable,
           *([] if torchrun.exists() else ["-m", "torch.distributed.run"]),
           "--standalone", "--nproc_per_node", "2", str(tmp / "worker.py"), str(tmp / f"{name}.json")]
    return subprocess.Popen(cmd, cwd=tmp, env=subprocess_env(DS_ACCELERATOR="cpu", **env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def ds_runs(fault_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds_faults")
    (tmp / "worker.py").write_text(WORKER)
    ds = ["--set", "engine.backend=deepspeed", "engine.zero_stage=2"]
    new = lambda name: ["--config", str(fault_base["cfg"]), "--run-dir", str(tmp / name), *ds]  # noqa: E731
    # the two crash launches run side by side (independent run directories and rendezvous ports)
    crash_rank1 = _launch(tmp, "crash1", [new("rank1_mid")], SFD_FAST_CRASH_AT="ds_after_engine_save@6",
                          SFD_FAST_CRASH_RANK="1")
    crash_rank0 = _launch(tmp, "crash0", [new("rank0_latest")], SFD_FAST_CRASH_AT="before_latest@6",
                          SFD_FAST_CRASH_RANK="0")
    crash_rank1, crash_rank0 = _wait(crash_rank1), _wait(crash_rank0)
    # a corrupted newest checkpoint: rank 0's optimizer partition of step 6, truncated
    shutil.copytree(tmp / "rank0_latest", tmp / "corrupt")
    (tmp / "corrupt" / ".lock").unlink(missing_ok=True)
    part = next((tmp / "corrupt" / "checkpoints" / "step-00000006" / "ds_generator" / "state").glob("*optim_states.pt"))
    part.write_bytes(part.read_bytes()[:100])
    resumes = [["--resume", str(tmp / n)] for n in ("rank1_mid", "rank0_latest", "corrupt")]
    final = _wait(_launch(tmp, "final", [new("reference"), *resumes]))
    return {"tmp": tmp, "crash": (crash_rank1, crash_rank0), "final": final}


def test_ds_crashes_happened(ds_runs):
    for proc in ds_runs["crash"]:
        assert proc.returncode != 0, proc.stdout[-2000:]
        assert "SIGKILL" in proc.stderr or "Signal 9" in proc.stderr or "-9" in proc.stderr, proc.stderr[-3000:]
    final = ds_runs["final"]
    clues = [ln for ln in final.stderr.splitlines() if any(k in ln for k in ("terminate", "what()", "Error", "abort"))]
    assert final.returncode == 0, (final.stdout[-2000:], clues[-40:], final.stderr[-3000:])
    assert "EXIT" not in ds_runs["final"].stdout


@pytest.mark.parametrize("name,resumed_from", [("rank1_mid", 3), ("rank0_latest", 6), ("corrupt", 3)])
def test_ds_resume_after_fault_is_bit_exact(ds_runs, name, resumed_from):
    tmp, out = ds_runs["tmp"], ds_runs["final"].stdout
    assert f"resume: using step-{resumed_from:08d}" in (tmp / name / "log.txt").read_text()
    if name == "corrupt":
        assert "skipped newer checkpoint step-00000006" in (tmp / name / "log.txt").read_text()
    assert [r["step"] for r in stats(tmp / name)] == list(range(1, STEPS + 1)), out[-2000:]
    assert_bit_identical(tmp / name, tmp / "reference")
