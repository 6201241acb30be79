"""Quality against SFD time (issue #22): the sfd_seconds clock (evaluation excluded, kept on resume),
eval.targets, time_to_target from stats records, train.time_limit_s, the report's quality section."""
from __future__ import annotations

import json
import re
import time
import types

import pytest

from sfd_fast import train
from sfd_fast.checkpoint import latest_checkpoint
from sfd_fast.config import ConfigError, load_config
from sfd_fast.digits.build import build_parts as build_digits_parts
from sfd_fast.evaluation.report import read_stats, render_report
from sfd_fast.quality import TargetsConfig, meets_targets, quality_curve, time_to_target
from sfd_fast.trainer import SFDTrainer

from .helpers import tiny_digits_config

TARGETS = TargetsConfig(fd_ratio=1.0, ua=0.99, retained=0.95)


def _rec(step, secs, ratio, uas, retained):
    return {"step": step, "sfd_seconds": secs, "eval/fd_ratio": ratio, "eval/retained_accuracy": retained,
            **{f"eval/ua/{c}": v for c, v in uas.items()}}


# ------------------------------------------------------------------ time_to_target from records
def test_time_to_target_reached_and_held():
    recs = [_rec(0, 0.0, 1.3, {"0": 1.0}, 0.99), _rec(100, 5.0, 0.99, {"0": 0.98}, 0.97),   # UA short
            _rec(200, 10.0, 1.0, {"0": 0.99}, 0.95),   # every target met exactly at its bound
            _rec(300, 15.0, 0.9, {"0": 1.0}, 0.96)]
    ttt = time_to_target(recs, TARGETS, eval_every=100)
    assert (ttt["sfd_seconds"], ttt["step"], ttt["held_at_end"]) == (10.0, 200, True)
    assert ttt["targets"] == {"fd_ratio": 1.0, "ua": 0.99, "retained": 0.95} and "reason" not in ttt


def test_time_to_target_reached_then_lost_and_every_forgotten_class_counts():
    recs = [_rec(0, 0.0, 0.9, {"0": 1.0, "7": 0.5}, 0.99),      # digit 7 not forgotten yet
            _rec(10, 2.0, 0.9, {"0": 1.0, "7": 0.995}, 0.99),
            _rec(20, 4.0, 1.2, {"0": 1.0, "7": 1.0}, 0.99)]      # fd lost again
    ttt = time_to_target(recs, TARGETS, eval_every=10)
    assert (ttt["sfd_seconds"], ttt["step"], ttt["held_at_end"]) == (2.0, 10, False)


def test_time_to_target_never_reached_no_eval_and_resumed_duplicates():
    recs = [_rec(0, 0.0, 1.3, {"0": 1.0}, 0.99), _rec(10, 1.0, 0.8, {"0": 1.0}, 0.90)]   # retained short
    ttt = time_to_target(recs, TARGETS, eval_every=10)
    assert ttt["sfd_seconds"] is None and ttt["step"] is None and ttt["held_at_end"] is False
    assert "never met in 2 evaluations" in ttt["reason"]
    off = time_to_target(recs, TARGETS, eval_every=0)
    assert off["sfd_seconds"] is None and off["held_at_end"] is None and "eval.every is 0" in off["reason"]
    assert "no evaluation record" in time_to_target([{"step": 5, "loss": 1.0}], TARGETS, 10)["reason"]
    # a resumed run logs step 10 twice: the last record of a step wins
    dup = recs + [_rec(10, 1.5, 0.8, {"0": 1.0}, 0.96)]
    assert time_to_target(dup, TARGETS, 10)["sfd_seconds"] == 1.5
    curve = quality_curve(dup)
    assert [p["step"] for p in curve] == [0, 10] and curve[1] == {"step": 10, "sfd_seconds": 1.5, "fd_ratio": 0.8,
                                                                 "ua": {"0": 1.0}, "retained": 0.96}
    assert not meets_targets({"step": 1, "eval/fd_ratio": 0.5, "eval/retained_accuracy": 1.0}, TARGETS)  # no UA


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("override, field", [
    ("eval.targets.fd_ratio=0", "eval.targets.fd_ratio"),
    ("eval.targets.ua=1.5", "eval.targets.ua"),
    ("eval.targets.retained=-0.1", "eval.targets.retained"),
    ("eval.targets.ua=\"high\"", "eval.targets.ua"),
    ("eval.targets.fid=1", "eval.targets.fid"),
    ("train.time_limit_s=-1", "train.time_limit_s"),
])
def test_targets_and_time_limit_validation_names_the_field(tmp_path, override, field):
    cfg = tiny_digits_config(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(cfg, [override])


def test_targets_defaults_and_time_limit_needs_the_plain_backend(tmp_path):
    cfg = load_config(tiny_digits_config(tmp_path), ["eval.targets.ua=0.9", "train.time_limit_s=30"])
    assert cfg.eval.targets == TargetsConfig(fd_ratio=1.0, ua=0.9, retained=0.95) and cfg.train.time_limit_s == 30
    with pytest.raises(ConfigError, match="train.time_limit_s.*plain"):
        load_config(tiny_digits_config(tmp_path), ["train.time_limit_s=30", "engine.backend=deepspeed"])


# ------------------------------------------------------------------ the clock in the trainer
class FakeTime:
    """A perf_counter that moves only when told: SFD steps cost 1 s, evaluation 100 s, checkpoints 50 s."""
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


@pytest.fixture
def fake_time(monkeypatch):
    clock = FakeTime()
    monkeypatch.setattr("sfd_fast.sfd_clock.time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    step, save = SFDTrainer.train_step, SFDTrainer.save

    def timed_step(self):
        step(self)
        clock.now += 1.0

    def timed_save(self):
        clock.now += 50.0
        return save(self)
    monkeypatch.setattr(SFDTrainer, "train_step", timed_step)
    monkeypatch.setattr(SFDTrainer, "save", timed_save)
    return clock


def _trainer(tmp_path, evaluate, **train):
    cfg = load_config(tiny_digits_config(tmp_path, train={"total_steps": 6, "log_every": 2, "checkpoint_every": 3,
                                                          "sample_every": 3, **train},
                                         eval={"enabled": True, "every": 2}))
    parts = build_digits_parts(cfg)
    parts.evaluate_during = evaluate
    run = tmp_path / "run"
    run.mkdir()
    return SFDTrainer(cfg, parts, run, __import__("torch").device("cpu")), run


def test_sfd_seconds_counts_steps_only_exactly(tmp_path, fake_time):
    def slow_eval(gen):
        fake_time.now += 100.0
        return {"x": 1.0}
    trainer, run = _trainer(tmp_path, slow_eval)
    trainer.train()
    ticks, evals = read_stats(run)
    assert [(r["step"], r["sfd_seconds"]) for r in evals] == [(0, 0.0), (2, 2.0), (4, 4.0), (6, 6.0)]
    # tick records do not carry it: a tracker merges a step's tick and evaluation into one row (W&B)
    assert [r["step"] for r in ticks] == [2, 4, 6] and not any("sfd_seconds" in r for r in ticks)
    assert trainer.clock.seconds() == 6.0 and fake_time.now == 6 + 4 * 100 + 2 * 50


def test_sfd_seconds_monotone_and_excludes_a_slow_evaluation_in_real_time(tmp_path):
    pause = 0.25

    def slow_eval(gen):
        time.sleep(pause)
        return {"x": 1.0}
    trainer, run = _trainer(tmp_path, slow_eval)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    secs = [r["sfd_seconds"] for r in read_stats(run)[1]]
    assert secs[0] == 0.0 and all(b >= a for a, b in zip(secs, secs[1:]))
    # the wall time of train() holds 4 sleeps (steps 0, 2, 4, 6); SFD seconds hold none of them
    assert trainer.clock.seconds() <= wall - 4 * pause


def test_time_limit_stops_early_and_resume_keeps_sfd_seconds(tmp_path, fake_time):
    """A 3.5 s budget on the fake clock stops a 100-step run after step 4, which still finishes normally
    (checkpoint, eval.json with time_to_target and the curve, report); a resume with a larger budget
    continues the clock from the checkpoint's 4 s."""
    cfg = tiny_digits_config(tmp_path, train={"total_steps": 100, "log_every": 2, "checkpoint_every": 50,
                                              "sample_every": 50, "time_limit_s": 3.5},
                             pretrain={"classifier_epochs": 3},
                             eval={"enabled": True, "every": 2, "during_samples_per_class": 4,
                                   "samples_per_class": 4, "teacher_steps": 2, "targets": {"fd_ratio": 1e9,
                                                                                          "ua": 0.0, "retained": 0.0}})
    run = tmp_path / "run"
    train.main(["--config", str(cfg), "--run-dir", str(run)])
    ev = json.loads((run / "eval.json").read_text())
    assert ev["step"] == 4 and ev["sfd_seconds"] == 4.0 and latest_checkpoint(run).name == "step-00000004"
    state = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())
    assert state["sfd_seconds"] == 4.0
    # targets that every record meets: the first evaluation (step 0) reaches them, the last holds them
    assert ev["time_to_target"] == {"sfd_seconds": 0.0, "step": 0, "held_at_end": True,
                                    "targets": {"fd_ratio": 1e9, "ua": 0.0, "retained": 0.0}}
    assert [(p["step"], p["sfd_seconds"]) for p in ev["curve"]] == [(0, 0.0), (2, 2.0), (4, 4.0)]
    assert ev["fd_ratio"] == pytest.approx(ev["fd_final"] / ev["fd_teacher"]) and ev["final_meets_targets"] is True
    evals = read_stats(run)[1]
    assert len({r["eval/fd_teacher"] for r in evals}) == 1          # computed once, before training
    assert all(r["eval/fd_ratio"] == pytest.approx(r["eval/fd"] / r["eval/fd_teacher"]) for r in evals)
    page = render_report(run)
    section = re.search(r'<section id="quality">(.*?)</section>', page, flags=re.S).group(1)
    assert "first met after 0.0 s of SFD training (step 0); held at the end" in section
    assert 'src="data:image/png;base64,' in section
    final = re.search(r'<section id="final-eval">(.*?)</section>', page, flags=re.S).group(1)
    assert "<td>time_to_target/held_at_end</td><td>True</td>" in final and "<td>curve" not in final
    # the budget is used up: a resume with the same limit is refused, naming the key
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(run)])
    assert e.value.code == 2
    train.main(["--resume", str(run), "--set", "train.time_limit_s=7.5"])
    state = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["sfd_seconds"] == 8.0
    assert [(r["step"], r["sfd_seconds"]) for r in read_stats(run)[1]][-2:] == [(6, 6.0), (8, 8.0)]


def test_the_clock_syncs_the_device_only_where_the_loop_pauses(tmp_path, monkeypatch):
    """On CUDA the clock waits for the device when it pauses (before evaluation, grids, checkpoints,
    which read the device anyway) and at the end: never per step. Counted on CPU through the
    synchronize call a CUDA clock makes."""
    import torch

    from sfd_fast.sfd_clock import SFDClock
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    clock = SFDClock(torch.device("cuda"))
    clock.start()
    for _ in range(100):
        clock.over_limit(), clock.seconds()
        with clock.paused(False):
            pass
    assert calls == []
    with clock.paused():
        assert clock._since is None
    assert len(calls) == 1 and clock._since is not None
    # in the loop: 10 steps, evaluation / grid / checkpoint every 5 -> pauses at steps 5 and 10, then the end
    trainer, _ = _trainer(tmp_path, lambda gen: {"x": 1.0}, total_steps=10, checkpoint_every=5, sample_every=5,
                          log_every=1)
    trainer.cfg.eval.every = 5
    trainer.clock.device = torch.device("cuda")
    calls.clear()
    trainer.train()
    assert len(calls) == 3
