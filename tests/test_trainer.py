"""Trainer: exact resume, NaN-robust updates, atomic checkpoints, run artefacts."""
import json

import pytest
import torch
from safetensors.torch import load_file

from sfd_fast import checkpoint as ckpt_mod
from sfd_fast import train
from sfd_fast.checkpoint import latest_checkpoint, load_checkpoint
from sfd_fast.config import load_config
from sfd_fast.digits.build import build_parts as build_digits_parts
from sfd_fast.trainer import SFDTrainer

from .helpers import tiny_digits_config


def _final_weights(run_dir):
    ck = latest_checkpoint(run_dir)
    return {name: load_file(str(ck / f"{name}.safetensors")) for name in ("generator", "fake_score")}, ck


def assert_split_run_resumes_bit_exact(tmp_path, cfg_path, total: int, split: int):
    """`total` steps in one run vs `split` steps, then --resume to `total`: the same final weights.
    Returns the two final checkpoint folders."""
    full, part = tmp_path / "full", tmp_path / "part"
    train.main(["--config", str(cfg_path), "--run-dir", str(full)])
    train.main(["--config", str(cfg_path), "--run-dir", str(part), "--set", f"train.total_steps={split}"])
    train.main(["--resume", str(part), "--set", f"train.total_steps={total}"])
    (w_full, ck_full), (w_part, ck_part) = _final_weights(full), _final_weights(part)
    assert ck_full.name == ck_part.name == f"step-{total:08d}"
    for role in w_full:
        for k in w_full[role]:
            assert torch.equal(w_full[role][k], w_part[role][k]), (role, k)
    return ck_full, ck_part


def test_resume_is_bit_exact(tmp_path):
    cfg_path = tiny_digits_config(tmp_path, train={"total_steps": 6, "grad_accum": 2,
                                                   "ema": {"halflife_kimg": 0.01}})
    ck_full, ck_part = assert_split_run_resumes_bit_exact(tmp_path, cfg_path, 6, 3)
    ema_a = load_file(str(ck_full / "generator_ema.safetensors"))
    ema_b = load_file(str(ck_part / "generator_ema.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    oa, ob = load_checkpoint(ck_full)["optim"], load_checkpoint(ck_part)["optim"]
    for role in oa:
        assert all(torch.equal(oa[role][k], ob[role][k]) for k in oa[role])


def test_run_artifacts(tmp_path):
    cfg_path = tiny_digits_config(tmp_path)
    out = train.main(["--config", str(cfg_path)])
    run_dir = tmp_path / "runs" / "tiny"
    assert out["run_dir"] == str(run_dir)
    stats = [json.loads(l) for l in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [2, 4, 6]
    assert all(s["samples_per_s"] > 0 and s["skipped_updates/generator"] == 0 for s in stats)
    assert (run_dir / "samples" / "step-00000000.png").is_file()
    assert (run_dir / "samples" / "step-00000006.png").is_file()
    assert json.loads((run_dir / "config.json").read_text())["train"]["total_steps"] == 6


def _trainer(tmp_path):
    cfg = load_config(tiny_digits_config(tmp_path))
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    return SFDTrainer(cfg, build_digits_parts(cfg), run_dir, torch.device("cpu"))


def test_nan_injected_step_leaves_weights_unchanged_and_is_counted(tmp_path):
    tr = _trainer(tmp_path)
    tr.train_step()  # a normal step first, so the optimizer has state
    before_g = {k: v.clone() for k, v in tr.generator.state_dict().items()}
    before_f = {k: v.clone() for k, v in tr.fake_score.state_dict().items()}
    orig_draw = tr.backend.draw

    def nan_draw(phase, *a):
        d = orig_draw(phase, *a)
        d.z[1] = float("nan")  # one poisoned row in both phases
        return d

    tr.backend.draw = nan_draw
    tr.train_step()
    for k, v in tr.generator.state_dict().items():
        assert torch.isfinite(v).all() and torch.equal(v, before_g[k]), k
    for k, v in tr.fake_score.state_dict().items():
        assert torch.isfinite(v).all() and torch.equal(v, before_f[k]), k
    assert tr.skipped.tolist() == [1.0, 1.0]
    tr.backend.draw = orig_draw
    tr.train_step()  # training goes on normally afterwards
    assert tr.skipped.tolist() == [1.0, 1.0]
    assert any(not torch.equal(v, before_g[k]) for k, v in tr.generator.state_dict().items())


def test_interrupted_checkpoint_leaves_previous_loadable(tmp_path, monkeypatch):
    tr = _trainer(tmp_path)
    tr.train_step()
    first = tr.save()
    tr.train_step()
    calls = {"n": 0}
    real_save = ckpt_mod.save_file

    def dying_save(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed mid-write")
        return real_save(*a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        tr.save()
    monkeypatch.setattr(ckpt_mod, "save_file", real_save)
    latest = latest_checkpoint(tr.run_dir)
    assert latest == first
    ck = load_checkpoint(latest)
    assert ck["state"]["step"] == 1
    assert set(ck["weights"]) >= {"generator", "fake_score"}


def test_two_stage_init_from_a_previous_run(tmp_path):
    cfg_path = tiny_digits_config(tmp_path)
    first = tmp_path / "stage1"
    train.main(["--config", str(cfg_path), "--run-dir", str(first)])
    stage1 = load_file(str(latest_checkpoint(first) / "generator.safetensors"))
    cfg = load_config(cfg_path, [f"model.generator_init={first}"])
    parts = build_digits_parts(cfg)
    got = parts.generator.net.state_dict()
    assert all(torch.equal(got[k], stage1[k]) for k in stage1)
    # the fake score still starts from the teacher
    teacher = parts.teacher.net.state_dict()
    assert all(torch.equal(parts.fake_score.net.state_dict()[k], teacher[k]) for k in teacher)


def test_ema_beta_halflife_rampup_and_fixed(tmp_path):
    tr = _trainer(tmp_path)
    tr.cfg.train.ema.halflife_kimg, tr.cfg.train.ema.rampup_ratio = 0.5, 0.05
    tr.nimg = 4000  # ramp-up: h = min(500, 200) = 200 images; batch 8 -> beta = 0.5 ** (8 / 200)
    assert abs(tr.ema_beta() - 0.5 ** (8 / 200)) < 1e-12
    tr.cfg.train.ema.decay = 0.9999
    assert tr.ema_beta() == 0.9999


def test_dry_run_builds_steps_and_writes_nothing(tmp_path, capsys):
    cfg_path = tiny_digits_config(tmp_path)
    run_dir = tmp_path / "dry"
    report = train.main(["--config", str(cfg_path), "--run-dir", str(run_dir), "--dry-run"])
    assert not run_dir.exists()
    assert report["dry_run"] and report["peak_mem_bytes"] > 0 and report["step_seconds"] > 0
    assert set(report["parameters"]) == {"teacher", "fake_score", "generator"}
    assert report["parameters"]["generator"] == report["parameters"]["teacher"] > 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["parameters"] == report["parameters"]  # the printed report
    assert report["config"]["train"]["total_steps"] == load_config(cfg_path).train.total_steps


def test_attention_auto_on_cpu_is_sdpa_and_explicit_xformers_fails(caplog):
    from sfd_fast.engine import resolve_attention
    with caplog.at_level("INFO", logger="sfd_fast"):
        assert resolve_attention("auto", torch.device("cpu")) == "sdpa"
    assert "engine.attention auto -> sdpa" in caplog.text
    assert resolve_attention("sdpa", torch.device("cpu")) == "sdpa"
    with pytest.raises(RuntimeError, match="xformers"):
        resolve_attention("xformers", torch.device("cpu"))


def test_tick_record_has_peak_memory(tmp_path):
    cfg_path = tiny_digits_config(tmp_path, train={"total_steps": 2, "log_every": 1})
    train.main(["--config", str(cfg_path), "--run-dir", str(tmp_path / "r")])
    recs = [json.loads(line) for line in (tmp_path / "r" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and all(r["peak_mem_bytes"] > 0 for r in recs)
