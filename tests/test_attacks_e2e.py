"""The attacks end to end on a tiny digits run: trained with eval.attacks on (every reference,
the "retrain" one pretrained and distilled into the cache), then `sfd-fast attack RUN_DIR` again
with --set; attacks.json, eval.json["attacks"], the report section; bad input names the key."""
import json

import pytest

from sfd_fast.cli import main as cli_main
from sfd_fast.train import main as train_main

TINY_ATTACKS = {"enabled": True, "samples": 8, "other_labels": 1,
                "noise": {"steps": 2}, "condition": {"steps": 2, "fit_samples": 4},
                "relearn": {"max_steps": 4, "check_every": 2, "batch_size": 4, "images": 2}}


def tiny_auto_config(tmp_path, attacks=TINY_ATTACKS) -> str:
    cfg = {
        "run": {"name": "tiny", "root": str(tmp_path / "runs"), "seed": 3, "device": "cpu"},
        "model": {"kind": "digits", "teacher": "auto", "hidden": 32, "blocks": 1},
        "optim": {"fake_score": {"lr": 1e-3}, "generator": {"lr": 1e-3}},
        "train": {"batch_size": 8, "total_steps": 2, "log_every": 1, "checkpoint_every": 2,
                  "sample_every": 2, "progress": False},
        "pretrain": {"steps": 5, "batch_size": 16, "classifier_epochs": 2},
        "eval": {"enabled": True, "samples_per_class": 4, "teacher_steps": 2, "report": True,
                 "attacks": attacks},
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_attacks_at_the_end_of_a_run_and_again_from_the_cli(tmp_path):
    result = train_main(["--config", tiny_auto_config(tmp_path)])
    run_dir = tmp_path / "runs" / "tiny"
    full = json.loads((run_dir / "attacks.json").read_text())
    per = full["per_class"]["0"]
    assert set(per) == {"noise", "condition", "relearn"}
    assert set(per["noise"]["references"]) == {"label 1 (override)", "label 2", "teacher", "retrain"}
    assert per["noise"]["reference"] == "retrain"
    assert "details" in per["noise"]
    summary = json.loads((run_dir / "eval.json").read_text())["attacks"]
    assert "details" not in summary["per_class"]["0"]["noise"]
    assert summary["per_class"]["0"]["noise"]["gap"] == pytest.approx(per["noise"]["gap"])
    assert "ua" in json.loads((run_dir / "eval.json").read_text())      # the evaluation is kept
    assert result["attacks"]["per_class"]["0"]["noise"]["rate"] == per["noise"]["rate"]
    # the retrain reference: a teacher without class 0 and its distillation, cached
    cache = tmp_path / "runs" / "cache"
    assert list(cache.glob("digits-teacher-without-0-*.safetensors"))
    retrain_dirs = [p for p in cache.glob("digits-retrain-*") if p.is_dir()]
    assert len(retrain_dirs) == 1 and (retrain_dirs[0] / "retrain_done.json").is_file()
    assert not (retrain_dirs[0] / "attacks.json").exists()      # the reference is never attacked itself
    assert "Worst-case forgetting" in (run_dir / "report.html").read_text()

    # again from the command line, same seed: the cached reference is reused, the numbers repeat
    mtime = (retrain_dirs[0] / "retrain_done.json").stat().st_mtime
    cli_main(["attack", str(run_dir)])
    again = json.loads((run_dir / "attacks.json").read_text())
    assert again["per_class"] == full["per_class"]
    assert (retrain_dirs[0] / "retrain_done.json").stat().st_mtime == mtime
    # --set changes the budget: a noise-only attack with the override label as the only reference
    cli_main(["attack", str(run_dir), "--set", "eval.attacks.references=[\"labels\"]",
              "eval.attacks.other_labels=0", "eval.attacks.condition.enabled=false",
              "eval.attacks.relearn.enabled=false"])
    narrow = json.loads((run_dir / "attacks.json").read_text())["per_class"]["0"]
    assert set(narrow) == {"noise"} and set(narrow["noise"]["references"]) == {"label 1 (override)"}
    # another surrogate seed: another surrogate (cached beside the first), named in attacks.json
    cli_main(["attack", str(run_dir), "--set", "eval.attacks.surrogate_seed_offset=202",
              "eval.attacks.references=[\"labels\"]", "eval.attacks.condition.enabled=false",
              "eval.attacks.relearn.enabled=false"])
    other = json.loads((run_dir / "attacks.json").read_text())
    assert len(list(cache.glob("digits-surrogate-*.safetensors"))) == 2
    assert other["surrogate"].startswith("digits CNN, seed +202") and full["surrogate"].startswith("digits CNN, seed +101")


@pytest.mark.parametrize("setting, key", [
    ("eval.attacks.noise.radius=3", "eval.attacks.noise.radius"),
    ("eval.attacks.references=[\"teacher\",\"oracle\"]", "eval.attacks.references"),
    ("eval.attacks.relearn.check_every=500", "eval.attacks.relearn.check_every"),
    ("eval.attacks.condition.step_size=-1", "eval.attacks.condition.step_size"),
    ("eval.attacks.samples=0", "eval.attacks.samples"),
    ("eval.attacks.surrogate_seed_offset=-1", "eval.attacks.surrogate_seed_offset"),
    ("eval.attacks.surrogate_seed_offset=\"other\"", "eval.attacks.surrogate_seed_offset"),
    ("eval.attacks.noise.steps=\"many\"", "eval.attacks.noise.steps"),
    ("eval.attacks.relearn.epochs=3", "eval.attacks.relearn.epochs"),
    ("sfd.forget_class=3", "only eval.attacks"),
])
def test_bad_attack_settings_are_clear_errors(tmp_path, capsys, setting, key):
    from sfd_fast.config import load_config
    from sfd_fast.errors import UserError
    cfg = tiny_auto_config(tmp_path)
    if not setting.startswith("sfd."):
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            load_config(cfg, [setting])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(load_config(cfg).to_dict()))
    with pytest.raises(SystemExit) as e:
        cli_main(["attack", str(run_dir), "--set", setting])
    assert e.value.code == 2
    assert key in capsys.readouterr().err
    assert not (run_dir / "attacks.json").exists()


def test_attack_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["attack", str(tmp_path)])
    assert e.value.code == 2 and "config.json" in capsys.readouterr().err


def test_noise_attack_during_training_goes_to_stats(tmp_path):
    attacks = {"during": True, "noise": {"steps": 2}}
    path = tiny_auto_config(tmp_path, attacks)
    train_main(["--config", path, "--set", "eval.every=1", "eval.during_samples_per_class=4",
                "eval.report=false"])
    records = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "stats.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/attack_noise/0" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    for r in evals:
        assert r["eval/attack_noise/0"] * 4 == round(r["eval/attack_noise/0"] * 4)     # a share of 4
        assert 0 <= r["eval/attack_noise_override/0"] <= 1
    assert not (tmp_path / "runs" / "tiny" / "attacks.json").exists()      # enabled is off: no end attack


def test_attack_during_needs_evaluation_during_training(tmp_path):
    from sfd_fast.config import load_config
    from sfd_fast.errors import UserError
    with pytest.raises(UserError, match=r"eval\.attacks\.during.*eval\.every"):
        load_config(tiny_auto_config(tmp_path, {"during": True}))
