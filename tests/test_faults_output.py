"""The last faults of the independent probe (issue #20 item 5): skip reasons that name the file and the
tensor, `--out` below an existing file, and a full disk during a checkpoint write (a real small tmpfs,
mounted as root; elsewhere the disk-full tests skip and say why: a skip is not a pass)."""
import contextlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sfd_fast import cli
from sfd_fast.checkpoint import checkpoint_status, latest_checkpoint, load_checkpoint, write_manifest

from .fault_tools import ROOT, copy_run, fault_base, run_main, subprocess_env  # noqa: F401

CK6 = Path("checkpoints") / "step-00000006"


# ------------------------------------------------------------------------------- skip reasons

def _skip_line(caplog) -> str:
    return next(l for l in caplog.text.splitlines() if "skipped newer checkpoint step-00000006" in l)


def test_wrong_shape_skip_reason_names_file_and_tensor(fault_base, tmp_path, caplog):
    run = copy_run(fault_base["six"], tmp_path / "run")
    f = run / CK6 / "fake_score.safetensors"
    sd = load_file(str(f))
    name = sorted(sd)[-1]
    sd[name] = torch.zeros(3, 5)
    save_file(sd, str(f))
    write_manifest(run / CK6)
    with caplog.at_level(logging.INFO, logger="sfd_fast"):
        assert run_main(["--resume", str(run), "--set", "train.total_steps=7"]) == (0, "")
    line = _skip_line(caplog)
    assert str(f) in line and name in line and "torch.Size([3, 5])" in line, line


def test_truncated_file_skip_reason_names_the_file(fault_base, tmp_path, caplog):
    run = copy_run(fault_base["six"], tmp_path / "run")
    (run / CK6 / "manifest.json").unlink()          # no manifest: the load itself must find it
    f = run / CK6 / "generator.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with caplog.at_level(logging.INFO, logger="sfd_fast"):
        assert run_main(["--resume", str(run), "--set", "train.total_steps=7"]) == (0, "")
    assert str(f) in _skip_line(caplog)


# ------------------------------------------------------------------------------- --out below a file

@pytest.mark.parametrize("command,flag", [("sample", "--out"), ("sample", "--out-dir"), ("export", "--out")])
def test_out_below_an_existing_file_exits_2_naming_it(tmp_path, capsys, command, flag):
    blocker = tmp_path / "taken.png"
    blocker.write_bytes(b"not a folder")
    target = blocker / "sub" / "grid.png"
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--run", str(tmp_path / "run"), flag, str(target)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} {target}" in err and f"{blocker} is a file" in err, err
    assert blocker.read_bytes() == b"not a folder"


def test_out_below_a_file_from_the_console_has_no_traceback(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = subprocess.run([sys.executable, "-m", "sfd_fast.cli", "export", "--run", str(tmp_path),
                          f"--out={blocker / 'exported'}"], env=subprocess_env(), capture_output=True,
                         text=True, cwd=str(ROOT), timeout=300)
    assert out.returncode == 2 and str(blocker) in out.stderr and "Traceback" not in out.stderr, out.stderr


# ------------------------------------------------------------------------------- full disk

@contextlib.contextmanager
def small_tmpfs(where: Path, size: str):
    """A real tmpfs of `size` at `where` (root only), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full-disk test needs root to mount a small tmpfs (not run here)")
    where.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here ({done.stderr.strip()}); not run")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill_leaving(disk: Path, free_bytes: int) -> None:
    """Fill the file system of `disk` until about `free_bytes` remain."""
    st = os.statvfs(disk)
    n = st.f_bavail * st.f_frsize - free_bytes
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(n, 0))


def test_full_disk_during_checkpoint_exits_2_previous_intact(fault_base, tmp_path):
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        run = disk / "run"
        argv = ["--config", str(fault_base["cfg"]), "--run-dir", str(run), "--set", "train.total_steps=3"]
        assert run_main(argv) == (0, "")                   # checkpoint step 3 on the small disk
        before = {p.name: p.read_bytes() for p in (run / "checkpoints" / "step-00000003").iterdir()}
        # room for the stats lines of steps 4-6 and the step-6 grid (12 KiB), not for a checkpoint (460 KiB)
        fill_leaving(disk, 64 * 1024)
        code, msg = run_main(["--resume", str(run), "--set", "train.total_steps=6"])
        assert code == 2, msg
        assert "no space left" in msg and str(run / "checkpoints") in msg and "step-00000006" in msg, msg
        assert str(run / "checkpoints" / "step-00000003") in msg and "intact" in msg, msg
        ckpts = run / "checkpoints"
        assert not list(ckpts.glob(".tmp-*")) and not (ckpts / "step-00000006").exists()
        assert checkpoint_status(ckpts / "step-00000003") is None and latest_checkpoint(run).name == "step-00000003"
        assert {p.name: p.read_bytes() for p in (ckpts / "step-00000003").iterdir()} == before
        assert load_checkpoint(ckpts / "step-00000003")["state"]["step"] == 3
        (disk / "filler").unlink()                         # space freed: the run resumes and finishes
        assert run_main(["--resume", str(run), "--set", "train.total_steps=6"]) == (0, "")
        assert latest_checkpoint(run).name == "step-00000006"


def test_full_disk_elsewhere_is_exit_2_too(fault_base, tmp_path):
    """A write outside the checkpoint (here the first sample grid) on a full device: one paragraph, exit 2."""
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        fill_leaving(disk, 8 * 1024)
        code, msg = run_main(["--config", str(fault_base["cfg"]), "--run-dir", str(disk / "run")])
        assert code == 2 and "no space left on the device" in msg and "--resume" in msg, msg
