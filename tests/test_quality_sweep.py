"""bench/quality_sweep.py without running a sweep: its settings are valid configs, its rows come from
eval.json, its markdown table replaces only what lies between the markers."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import quality_sweep as qs  # noqa: E402


def _results(runs):
    return {"meta": {"command": "bench/quality_sweep.py --time-limit-s 60", "cpu": "Test CPU @ 1 GHz", "cpus": 2,
                     "tree": {"commit": "abc123", "clean": False}, "date_utc": "2026-12-06 05:00 UTC",
                     "time_limit_s": 60.0, "eval_every": 250, "config": "configs/digits_forget0.json",
                     "targets": {"fd_ratio": 1.0, "ua": 0.99, "retained": 0.95}},
            "runs": runs}


def _eval_json(run_dir: Path, **over):
    ev = {"step": 1234, "sfd_seconds": 60.01, "fd_final": 16.0, "fd_teacher": 16.0, "fd_ratio": 1.0,
          "ua_per_class": {"0": 0.996}, "retained_accuracy": 0.97, "final_meets_targets": True,
          "time_to_target": {"sfd_seconds": 41.5, "step": 750, "held_at_end": True,
                             "targets": {"fd_ratio": 1.0, "ua": 0.99, "retained": 0.95}}}
    ev.update(over)
    run_dir.mkdir(parents=True)
    (run_dir / "eval.json").write_text(json.dumps(ev))
    return run_dir


def test_every_default_setting_is_a_valid_digits_config():
    args = qs.parse_args(["--seeds", "3"])
    qs.check_settings(args, qs.DEFAULT_SETTINGS)   # SystemExit naming the setting otherwise
    assert {"default", "gen_lr_x2", "gen_lr_x3", "fake_lr_x0.5", "fake_lr_x2", "alpha_1.0", "alpha_1.5",
            "t_init_300", "t_init_600", "ema_hl_10", "ema_hl_25", "ema_none", "batch_64", "batch_256",
            "betas_0.5"} <= set(qs.DEFAULT_SETTINGS)
    over = qs.run_overrides(args, ["sfd.alpha=1.5"], 3)
    assert "train.time_limit_s=60.0" in over and "run.seed=3" in over and over[-1] == "sfd.alpha=1.5"
    with pytest.raises(SystemExit, match="bad"):
        qs.check_settings(args, {"bad": ["sfd.t_init=5000"]})
    with pytest.raises(SystemExit, match="unknown setting"):
        qs.load_settings(qs.parse_args(["--only", "nope"]))


def test_rows_from_eval_json_and_failures(tmp_path):
    ok = qs.summarize("gen_lr_x2", 0, ["optim.generator.lr=2e-4"], _eval_json(tmp_path / "a"), 0, 80.04)
    assert (ok["steps"], ok["fd_ratio"], ok["retained"], ok["time_to_target_s"], ok["held_at_end"]) == \
        (1234, 1.0, 0.97, 41.5, True)
    bad = qs.summarize("batch_256", 0, ["train.batch_size=256"], tmp_path / "missing", 2, 3.0)
    assert bad["error"] == "exit status 2, no eval.json"


def test_table_lists_every_run_with_provenance(tmp_path):
    ok = qs.summarize("gen_lr_x2", 0, ["optim.generator.lr=2e-4"], _eval_json(tmp_path / "a"), 0, 80.0)
    never = qs.summarize("default", 1, [], _eval_json(tmp_path / "b", fd_ratio=1.31, final_meets_targets=False,
                                                     time_to_target={"sfd_seconds": None, "step": None,
                                                                     "held_at_end": False}), 0, 80.0)
    bad = qs.summarize("batch_256", 0, ["train.batch_size=256"], tmp_path / "missing", 2, 3.0)
    table = qs.render_table(_results([ok, never, bad]))
    assert "Test CPU @ 1 GHz (2 CPUs); commit abc123 (UNCOMMITTED changes in the tree)" in table
    assert "`bench/quality_sweep.py --time-limit-s 60`" in table and "2026-12-06 05:00 UTC" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows[0] == ("| gen_lr_x2 | `optim.generator.lr=2e-4` | 0 | 1234 | 60.0 | 1.000 | 0: 0.996 | 0.970 | yes "
                       "| 41.5 (step 750) | yes |")
    assert rows[1] == "| default | (config as is) | 1 | 1234 | 60.0 | 1.310 | 0: 0.996 | 0.970 | no | - | no |"
    assert rows[2].startswith("| batch_256 | `train.batch_size=256` | 0 | failed: exit status 2, no eval.json |")
    assert all(r.count("|") == rows[0].count("|") for r in rows)


def test_write_table_replaces_only_between_the_markers(tmp_path):
    doc = tmp_path / "quality.md"
    before, after = "# Quality\n\nintro text\n\n", "\n\n## After\nkept as is\n"
    doc.write_text(f"{before}{qs.BEGIN}\nold table\n{qs.END}{after}")
    qs.write_table(doc, "| new | table |")
    assert doc.read_text() == f"{before}{qs.BEGIN}\n| new | table |\n{qs.END}{after}"
    qs.write_table(doc, "| newer |")   # idempotent: the block is replaced again, not appended
    assert doc.read_text() == f"{before}{qs.BEGIN}\n| newer |\n{qs.END}{after}"
    fresh = tmp_path / "fresh.md"
    fresh.write_text("# Only text")
    qs.write_table(fresh, "T")
    assert fresh.read_text() == f"# Only text\n{qs.BEGIN}\nT\n{qs.END}\n"
    broken = tmp_path / "broken.md"
    broken.write_text(f"x\n{qs.END}\ny\n")
    with pytest.raises(SystemExit, match="markers"):
        qs.write_table(broken, "T")
    assert broken.read_text() == f"x\n{qs.END}\ny\n"   # nothing written
