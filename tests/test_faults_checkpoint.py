"""Fault injection, plain backend: kill -9 at each phase of a checkpoint write, every corrupted-checkpoint
case, checkpoint pruning and leftover cleanup. Each resume must end bit-identical to the uninterrupted
run (weights, EMA, optimizer state, per-step losses) and say which checkpoint it used."""
import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sfd_fast.checkpoint import checkpoint_status, write_manifest

from .fault_tools import STEPS, assert_bit_identical, copy_run, crash_runs, fault_base, run_main, stats, tree  # noqa: F401

CK6 = Path("checkpoints") / "step-00000006"


# ------------------------------------------------------------------------------- kill -9 while saving
# phases of save_checkpoint / publish_checkpoint_dir (checkpoint.py crash_point); where the resume starts
PHASES = [("after_weights", 3), ("before_manifest", 3), ("before_rename", 3), ("before_latest", 6),
          ("after_latest", 6)]


@pytest.fixture(scope="module")
def crashed(fault_base):
    """Every crash case, killed by SIGKILL at its crash point (one subprocess, a fork per case)."""
    runs = {phase: fault_base["dir"] / f"crash_{phase}" for phase, _ in PHASES}
    runs["first"] = fault_base["dir"] / "crash_first"
    cases = {phase: (f"{phase}@6", ["--config", str(fault_base["cfg"]), "--run-dir", str(run)])
             for phase, run in runs.items() if phase != "first"}
    cases["first"] = ("after_weights@3", ["--config", str(fault_base["cfg"]), "--run-dir", str(runs["first"])])
    status = crash_runs(cases, ["--config", str(fault_base["cfg"]), "--run-dir", str(fault_base["dir"] / "warm"),
                                "--set", "train.total_steps=1"])
    return {name: (runs[name], status[name]) for name in runs}


def _killed(wait_status) -> bool:
    return os.WIFSIGNALED(wait_status) and os.WTERMSIG(wait_status) == signal.SIGKILL


@pytest.mark.parametrize("phase,resumed_from", PHASES)
def test_kill9_during_checkpoint_then_resume_is_bit_exact(fault_base, crashed, phase, resumed_from, caplog):
    run, status = crashed[phase]
    assert _killed(status), status
    assert not (run / "checkpoints" / "step-00000009").exists()
    assert [r["step"] for r in stats(run)] == list(range(1, 7))      # killed while saving step 6
    with caplog.at_level(logging.INFO, logger="sfd_fast"):
        assert run_main(["--resume", str(run)]) == (0, "")
    assert f"resume: using step-{resumed_from:08d}" in caplog.text
    assert not list((run / "checkpoints").glob(".tmp-*"))            # the interrupted write was cleaned up
    assert_bit_identical(run, fault_base["reference"])               # includes stats: steps 1..9 once each


# ------------------------------------------------------------------------------- corrupted checkpoints

def _truncate(f: Path):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _nan_weight(ck: Path):
    f = ck / "generator.safetensors"
    sd = load_file(str(f))
    name = sorted(sd)[0]
    sd[name][0] = float("nan")
    save_file(sd, str(f))
    write_manifest(ck)   # a manifest that matches: the NaN check itself must refuse it
    return name


def _wrong_shape(ck: Path):
    f = ck / "fake_score.safetensors"
    sd = load_file(str(f))
    name = sorted(sd)[0]
    sd[name] = torch.zeros(3, 5)
    save_file(sd, str(f))
    write_manifest(ck)


CORRUPTIONS = {   # name -> (corrupt(step-6 folder, run dir), checkpoint the resume uses, words of the reason)
    "truncated_weights": (lambda ck, run: _truncate(ck / "generator.safetensors"), 3, "bytes"),
    "deleted_weights": (lambda ck, run: (ck / "fake_score.safetensors").unlink(), 3, "missing"),
    "deleted_optimizer": (lambda ck, run: (ck / "optim_generator.safetensors").unlink(), 3, "missing"),
    "garbage_trainer_state": (lambda ck, run: (ck / "trainer_state.json").write_text("{not json"), 3, "trainer_state.json"),
    "bad_header": (lambda ck, run: (ck / "rng.safetensors").write_bytes(
        b"\xff" * 8 + (ck / "rng.safetensors").read_bytes()[8:]), 3, "SHA-256"),
    "wrong_shape": (lambda ck, run: _wrong_shape(ck), 3, "does not load"),
    "nan_weights": (lambda ck, run: _nan_weight(ck), 3, "non-finite"),
    "manifest_deleted_and_truncated": (lambda ck, run: ((ck / "manifest.json").unlink(),
                                                        _truncate(ck / "generator.safetensors")), 3, "does not load"),
    "garbage_manifest": (lambda ck, run: (ck / "manifest.json").write_text("]"), 3, "unreadable"),
    "latest_missing": (lambda ck, run: (run / "checkpoints" / "latest").unlink(), 6, None),
    "latest_empty": (lambda ck, run: (run / "checkpoints" / "latest").write_text(""), 6, None),
    "latest_points_nowhere": (lambda ck, run: (run / "checkpoints" / "latest").write_text("step-00000042"), 6, None),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_newest_checkpoint_falls_back(fault_base, tmp_path, case, caplog):
    corrupt, resumed_from, reason = CORRUPTIONS[case]
    run = copy_run(fault_base["six"], tmp_path / "run")
    corrupt(run / CK6, run)
    with caplog.at_level(logging.INFO, logger="sfd_fast"):
        assert run_main(["--resume", str(run), "--set", f"train.total_steps={STEPS}"]) == (0, "")
    assert f"resume: using step-{resumed_from:08d}" in caplog.text
    if reason:   # the skipped newer checkpoint is named with the reason
        line = next(l for l in caplog.text.splitlines() if "skipped newer checkpoint step-00000006" in l)
        assert reason in line, line
    assert_bit_identical(run, fault_base["reference"])


def test_nan_weights_message_names_the_tensor(fault_base, tmp_path, caplog):
    run = copy_run(fault_base["six"], tmp_path / "run")
    name = _nan_weight(run / CK6)
    with caplog.at_level(logging.INFO, logger="sfd_fast"):
        assert run_main(["--resume", str(run), "--set", "train.total_steps=7"]) == (0, "")
    assert f"tensor '{name}' holds non-finite values" in caplog.text


def test_no_usable_checkpoint_is_a_clear_error(fault_base, tmp_path):
    run = copy_run(fault_base["six"], tmp_path / "run")
    for ck in (run / "checkpoints").glob("step-*"):
        _truncate(ck / "generator.safetensors")
    before = {k: v for k, v in tree(run).items() if k != "log.txt"}
    code, msg = run_main(["--resume", str(run), "--set", f"train.total_steps={STEPS}"])
    assert code == 2 and "no usable checkpoint" in msg and "step-00000003" in msg and "step-00000006" in msg, msg
    after = {k: v for k, v in tree(run).items() if k != "log.txt" and k != ".lock"}
    assert after == {k: v for k, v in before.items() if k != ".lock"}   # nothing lost or changed


def test_resume_before_first_checkpoint_is_a_clear_error(fault_base, crashed):
    run, status = crashed["first"]
    assert _killed(status), status
    before = tree(run)
    code, msg = run_main(["--resume", str(run)])
    assert code == 2 and "no checkpoint yet" in msg and str(run / "config.json") in msg, msg
    assert tree(run) == before
    # starting it again in the same directory is allowed (no checkpoint) and drops the dead run's stats
    assert run_main(["--config", str(fault_base["cfg"]), "--run-dir", str(run)]) == (0, "")
    assert_bit_identical(run, fault_base["reference"])


# ------------------------------------------------------------------------------- pruning and leftovers

def test_keep_checkpoints_prunes_older_ones(fault_base, tmp_path):
    run = tmp_path / "run"
    assert run_main(["--config", str(fault_base["cfg"]), "--run-dir", str(run),
                     "--set", "train.keep_checkpoints=2"]) == (0, "")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000006", "step-00000009"]
    assert checkpoint_status(run / "checkpoints" / "step-00000009") is None
    assert_bit_identical(run, fault_base["reference"])


def test_stale_temporaries_removed_under_the_lock(fault_base, tmp_path):
    run = copy_run(fault_base["six"], tmp_path / "run")
    junk = [run / "checkpoints" / ".tmp-step-00000009-4242", run / "checkpoints" / ".old-step-00000003-4242"]
    for j in junk:
        j.mkdir()
        (j / "generator.safetensors").write_bytes(b"partial")
    (run / ".config.json.tmp-4242").write_text("{")
    assert run_main(["--resume", str(run), "--set", f"train.total_steps={STEPS}"]) == (0, "")
    assert not any(j.exists() for j in junk) and not (run / ".config.json.tmp-4242").exists()
    assert_bit_identical(run, fault_base["reference"])


def test_config_history_records_the_allowed_change(fault_base, tmp_path):
    run = copy_run(fault_base["six"], tmp_path / "run")
    assert run_main(["--resume", str(run), "--set", f"train.total_steps={STEPS}"]) == (0, "")
    history = [json.loads(l) for l in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["resumed_at_step"] == 6
    assert history[-1]["changes"] == {"train.total_steps": [6, STEPS]}
    assert json.loads((run / "config.json").read_text())["train"]["total_steps"] == STEPS
    # the run's log handler left with it: a later run in this process does not write into this log.txt
    assert not [h for h in logging.getLogger("sfd_fast").handlers if str(run) in getattr(h, "baseFilename", "")]
