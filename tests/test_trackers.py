"""log.trackers: TensorBoard and W&B receive what stats.jsonl holds, and a resume continues both.

One digits run with evaluation during training and both trackers, stopped at step 4 and resumed to
6 (W&B offline: WANDB_MODE=offline, no network). TensorBoard's events are read back with
tensorboard's own EventAccumulator; the W&B run with wandb's own reader of its transaction log
(`wandb leet inspect --json`). Both must hold every number of every stats.jsonl record, at its step.

Tolerance: TensorBoard stores scalars as float32 (relative rounding <= 2**-24 = 6e-8): rel 1e-7.
W&B stores the JSON float64 we pass: exact.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sfd_fast import train
from sfd_fast.config import ConfigError, load_config
from sfd_fast.trackers import WANDB_ID_FILE, numbers

from .helpers import tiny_digits_config

pytest.importorskip("tensorboard", reason="pip install -e '.[tensorboard]' (the test extra has it)")
pytest.importorskip("wandb", reason="pip install -e '.[wandb]' (the test extra has it)")

TB_REL = 1e-7


def _offline_wandb(monkeypatch, tmp: Path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp / "wandb_home" / sub))
    for var in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trackers")
    mp = pytest.MonkeyPatch()
    _offline_wandb(mp, tmp)
    try:
        cfg = tiny_digits_config(tmp, train={"total_steps": 6, "log_every": 2, "checkpoint_every": 2, "sample_every": 2},
                                 pretrain={"classifier_epochs": 3},
                                 eval={"enabled": True, "every": 2, "during_samples_per_class": 4,
                                       "samples_per_class": 4, "teacher_steps": 2},
                                 log={"trackers": ["tensorboard", "wandb"], "wandb_project": "sfd-test"})
        run = tmp / "run"
        train.main(["--config", str(cfg), "--run-dir", str(run), "--set", "train.total_steps=4"])
        first_id = (run / WANDB_ID_FILE).read_text().strip()
        train.main(["--resume", str(run), "--set", "train.total_steps=6"])
    finally:
        mp.undo()
    return run, first_id


def _stats(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


def _expected_by_tag(run: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every number stats.jsonl holds (ticks and evaluations)."""
    out: dict[str, list] = {}
    for rec in _stats(run):
        for k, v in numbers(rec).items():
            out.setdefault(k, []).append((rec["step"], v))
    return out


def test_tensorboard_scalars_match_stats_jsonl(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, _ = tracked_run
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    expected = _expected_by_tag(run)
    assert {"fake_score_loss/remain", "generator_loss/forget", "samples_per_s", "skipped_updates/generator",
            "peak_mem_bytes", "lr/generator", "eval/ua/0", "eval/fd"} <= set(expected)
    # final/<metric> (eval.json) are in TensorBoard too; everything else equals stats.jsonl
    assert set(acc.Tags()["scalars"]) - set(expected) == {t for t in acc.Tags()["scalars"] if t.startswith("final/")}
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        # the resume at step 4 purges the first run's events past 4 (none here): stats.jsonl's steps
        assert [s for s, _ in got] == [s for s, _ in points], tag
        for (_, g), (_, want) in zip(got, points):
            assert g == pytest.approx(want, rel=TB_REL, abs=1e-30), tag
    assert [e.step for e in acc.Images("samples")] == [0, 2, 4, 6]
    eval_json = json.loads((run / "eval.json").read_text())
    assert acc.Scalars("final/ua")[-1].value == pytest.approx(eval_json["ua"], rel=TB_REL)


def _wandb_records(offline_dir: Path) -> list[dict]:
    """The records of one offline W&B run, read by wandb's own reader (`wandb leet inspect --json`)."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    cmd = [str(wandb_cli)] if wandb_cli.exists() else [sys.executable, "-m", "wandb"]
    (log,) = offline_dir.glob("run-*.wandb")
    proc = subprocess.run([*cmd, "leet", "inspect", "--json", str(log)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = []
    for line in proc.stdout.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue   # the reader may cut its very last line (the exit record)
    return records


def test_wandb_offline_run_holds_the_same_scalars_and_resume_keeps_its_id(tracked_run):
    run, first_id = tracked_run
    assert (run / WANDB_ID_FILE).read_text().strip() == first_id     # the resume reused it
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith("-" + first_id) for d in offline)
    history: dict[int, dict] = {}
    runs = []
    for d in offline:
        for r in _wandb_records(d):
            if r.get("type") == "run":
                runs.append(r["run"])
            if r.get("type") == "history":
                history.setdefault(int(r["history"]["step"]["num"]), {}).update(r["history"]["item"])
    assert [r["run_id"] for r in runs] == [first_id, first_id] and runs[0]["project"] == "sfd-test"
    assert runs[0]["config"]["update"]["acceleration_plan"]["source"] == "acceleration plan"   # the trainer's own plan
    for rec in _stats(run):
        row = history[rec["step"]]
        for k, v in numbers(rec).items():
            assert row[k] == v, (rec["step"], k)
    # the grids: an image record per grid tick, its PNG in one of the offline run folders
    images = {s: row["samples.path"] for s, row in history.items() if "samples.path" in row}
    assert sorted(images) == [0, 2, 4, 6] and all(row.get("samples._type") == "image-file"
                                                  for row in history.values() if "samples.path" in row)
    assert all(any((d / "files" / p).is_file() for d in offline) for p in images.values())
    assert history[6]["final/ua"] == json.loads((run / "eval.json").read_text())["ua"]


def test_environment_and_report_of_the_tracked_run(tracked_run):
    run, _ = tracked_run
    starts = json.loads((run / "environment.json").read_text())["starts"]
    assert [s["step"] for s in starts] == [0, 4]
    import torch
    assert starts[-1]["torch"] == torch.__version__ and starts[-1]["device"] == "cpu"
    page = (run / "report.html").read_text()
    for sid in ("plan", "environment"):
        assert f'<section id="{sid}">' in page
    assert torch.__version__ in page and "2 start(s)" in page


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_stops_before_anything_is_written(tmp_path, monkeypatch, capsys, name):
    monkeypatch.setitem(sys.modules, name, None)      # `import name` now raises ImportError
    cfg = tiny_digits_config(tmp_path, log={"trackers": [name]})
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(cfg), "--run-dir", str(run)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"log.trackers asks for '{name}'" in err and f".[{name}]" in err
    assert not run.exists()


def test_unknown_or_repeated_tracker_is_a_config_error(tmp_path):
    cfg = tiny_digits_config(tmp_path)
    with pytest.raises(ConfigError, match="log.trackers.*unknown tracker"):
        load_config(cfg, ['log.trackers=["mlflow"]'])
    with pytest.raises(ConfigError, match="log.trackers.*twice"):
        load_config(cfg, ['log.trackers=["wandb", "wandb"]'])
    assert load_config(cfg).log.trackers == []
