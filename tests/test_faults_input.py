"""Fault injection: bad values, bad files, bad devices and run directories, resume-rule violations.
Each case asserts exit status 2, a message naming the key or file, and that nothing was written."""
import json
import os
import subprocess
import sys

import pytest

from .fault_tools import ROOT, copy_run, fault_base, run_main, subprocess_env, tree  # noqa: F401

# every numeric key family: NaN, Infinity and an out-of-domain value (the key the message must name)
BAD_VALUES = [
    ("sfd.alpha", "NaN", "sfd.alpha"), ("sfd.alpha", "-0.5", "sfd.alpha"),
    ("sfd.cfg_eval_real", "Infinity", "sfd.cfg_eval_real"), ("sfd.cfg_train_fake", "0", "sfd.cfg_train_fake"),
    ("sfd.sg_forget_coef", "NaN", "sfd.sg_forget_coef"), ("sfd.g_remain_coef", "-1", "sfd.g_remain_coef"),
    ("schedule.beta_end", "NaN", "schedule.beta_end"), ("schedule.beta_end", "1.5", "beta_end"),
    ("schedule.beta_start", "0", "beta_start"), ("schedule.beta_start", "0.05", "beta_start"),
    ("train.ema.halflife_kimg", "NaN", "train.ema.halflife_kimg"), ("train.ema.halflife_kimg", "-1", "halflife"),
    ("train.ema.decay", "1.0", "train.ema.decay"), ("train.ema.rampup_ratio", "0", "train.ema.rampup_ratio"),
    ("optim.generator.eps", "-1e-8", "optim.generator.eps"), ("optim.fake_score.eps", "0", "optim.fake_score.eps"),
    ("optim.generator.weight_decay", "-0.1", "optim.generator.weight_decay"),
    ("optim.fake_score.lr", "NaN", "optim.fake_score.lr"), ("optim.generator.lr", "Infinity", "optim.generator.lr"),
    ("optim.generator.betas", "[0.9, NaN]", "optim.generator.betas"), ("optim.fake_score.betas", "[0.9, 1.0]", "betas"),
    ("optim.generator.grad_clip_value", "-1", "grad_clip_value"),
    ("optim.generator.grad_clip_value", "NaN", "grad_clip_value"),
    ("sfd.t_min", "-1", "t_min"), ("sfd.t_max", "2000", "t_max"), ("sfd.t_init", "1000", "sfd.t_init"),
    ("train.batch_size", "0", "train.batch_size"), ("train.total_steps", "0", "train.total_steps"),
    ("train.log_every", "0", "train.log_every"), ("train.keep_checkpoints", "-1", "train.keep_checkpoints"),
    ("train.max_consecutive_skips", "0", "train.max_consecutive_skips"),
    ("pretrain.steps", "0", "pretrain.steps"), ("pretrain.lr", "NaN", "pretrain.lr"),
    ("pretrain.cond_drop_prob", "1.0", "pretrain.cond_drop_prob"), ("eval.teacher_steps", "0", "eval.teacher_steps"),
    ("run.device", "tpu", "run.device"), ("run.device", "cuda:x", "run.device"),
    ("train.batch_size", "true", "train.batch_size"), ("sfd.alpha", "\"big\"", "sfd.alpha"),
]


@pytest.mark.parametrize("key,value,needle", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_bad_value_exit_2_nothing_written(fault_base, tmp_path, key, value, needle):
    run = tmp_path / "run"
    code, msg = run_main(["--config", str(fault_base["cfg"]), "--run-dir", str(run), "--set", f"{key}={value}"])
    assert code == 2 and needle in msg, msg
    assert not run.exists()


def test_nan_literal_in_config_file(fault_base, tmp_path):
    cfg = json.loads(fault_base["cfg"].read_text())
    cfg["sfd"]["alpha"] = float("nan")
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(cfg))          # json writes the literal NaN, which json.loads accepts
    code, msg = run_main(["--config", str(path), "--run-dir", str(tmp_path / "run")])
    assert code == 2 and "sfd.alpha" in msg and str(path) in msg
    assert not (tmp_path / "run").exists()


def test_teacher_with_nan_weight_refused(fault_base, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file
    sd = load_file(str(fault_base["dir"] / "teacher.safetensors"))
    name = sorted(sd)[1]
    sd[name].view(-1)[3] = float("nan")
    save_file(sd, str(tmp_path / "teacher.safetensors"))
    code, msg = run_main(["--config", str(fault_base["cfg"]), "--run-dir", str(tmp_path / "run"),
                          "--set", f"model.teacher={tmp_path / 'teacher.safetensors'}"])
    assert code == 2 and f"'{name}'" in msg and "model.teacher" in msg and "non-finite" in msg, msg
    assert not (tmp_path / "run").exists()
    assert torch.isnan(sd[name]).any()


# ------------------------------------------------------------------------------- files and encodings

def test_non_utf8_config_names_the_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"run": {"name": "caf\u00e9"}}'.encode("latin-1"))
    code, msg = run_main(["--config", str(path)])
    assert code == 2 and str(path) in msg and "UTF-8" in msg, msg


def test_non_utf8_prompt_file_names_the_file(tmp_path):
    from sfd_fast.sd.prompts import ForgetPromptSet
    f = tmp_path / "forget.txt"
    f.write_bytes("a photo of Ren\u00e9e\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{f}.*not UTF-8"):
        ForgetPromptSet.from_files(str(f), "ren\u00e9e", "a woman")


def test_bad_scheduler_config_names_the_file(tmp_path):
    from sfd_fast.sd.loading import REQUIRED_PARTS, load_stable_diffusion
    for part in REQUIRED_PARTS:
        (tmp_path / part).mkdir() if "." not in part else (tmp_path / part).write_text("{}")
    bad = tmp_path / "scheduler" / "scheduler_config.json"
    bad.write_text("{ not json")
    with pytest.raises(ValueError, match="scheduler_config.json"):
        load_stable_diffusion(str(tmp_path))


def test_offline_hub_id_names_model_pretrained(monkeypatch):
    from sfd_fast.sd.loading import load_stable_diffusion
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")      # this machine has no network; never wait for one
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # read at import: set it too
    with pytest.raises(FileNotFoundError, match="model.pretrained.*no-such-org/no-such-model"):
        load_stable_diffusion("no-such-org/no-such-model")


def test_empty_unet_folder_names_model_pretrained(tmp_path):
    from sfd_fast.sd.loading import load_stable_diffusion
    from sfd_fast.sd.tiny import build_tiny_sd
    build_tiny_sd(tmp_path / "sd")
    for f in (tmp_path / "sd" / "unet").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match="model.pretrained.*sd"):
        load_stable_diffusion(str(tmp_path / "sd"))


# ------------------------------------------------------------------------------- devices, run dirs, memory

def test_cuda_on_a_cpu_machine(fault_base, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, msg = run_main(["--config", str(fault_base["cfg"]), "--run-dir", str(tmp_path / "run"),
                          "--set", "run.device=cuda"])
    assert code == 2 and "run.device" in msg and "CUDA is not available" in msg
    assert not (tmp_path / "run").exists()


def test_run_dir_is_a_file(fault_base, tmp_path):
    f = tmp_path / "run"
    f.write_text("x")
    code, msg = run_main(["--config", str(fault_base["cfg"]), "--run-dir", str(f)])
    assert code == 2 and str(f) in msg and "is a file" in msg
    assert f.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_run_dir_not_writable(fault_base, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, msg = run_main(["--config", str(fault_base["cfg"]), "--run-dir", str(ro / "run")])
    finally:
        ro.chmod(0o700)
    assert code == 2 and "not writable" in msg and not (ro / "run").exists()


def test_huge_batch_refused_with_estimate_and_limit(fault_base, tmp_path):
    code, msg = run_main(["--config", str(fault_base["cfg"]), "--run-dir", str(tmp_path / "run"),
                          "--set", "train.batch_size=2000000000"])
    assert code == 2 and "train.batch_size=2000000000" in msg and "GiB" in msg and "available" in msg, msg
    assert not (tmp_path / "run").exists()


def test_cli_train_exit_status_and_one_paragraph(fault_base, tmp_path):
    """`python -m sfd_fast.cli train` (what `sfd-fast train` runs): status 2, no traceback."""
    out = subprocess.run([sys.executable, "-m", "sfd_fast.cli", "train", "--config", str(fault_base["cfg"]),
                          "--run-dir", str(tmp_path / "run"), "--set", "schedule.beta_end=NaN"],
                         env=subprocess_env(), capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert out.returncode == 2
    assert out.stderr.count("schedule.beta_end") == 1 and "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- resume rules

REFUSED_ON_RESUME = ["train.batch_size=16", "train.grad_accum=2", "sfd.forget_class=3", "sfd.override_class=2",
                     "run.seed=1", "train.ema.halflife_kimg=1.0", "engine.precision=bf16",
                     "optim.generator.lr=0.01", "schedule.beta_end=0.03"]


@pytest.mark.parametrize("change", REFUSED_ON_RESUME)
def test_resume_refuses_changes_outside_the_allow_list(fault_base, tmp_path, change):
    run = copy_run(fault_base["six"], tmp_path / "run")
    before = tree(run)
    code, msg = run_main(["--resume", str(run), "--set", "train.total_steps=9", change])
    assert code == 2 and f"'{change.split('=')[0]}'" in msg and "cannot change on resume" in msg, msg
    assert tree(run) == before       # config.json, checkpoints, stats: untouched


@pytest.mark.parametrize("extra", [["--config", "x.json"], ["--run-dir", "elsewhere"]])
def test_resume_with_config_or_run_dir_is_an_error(fault_base, tmp_path, extra, capsys):
    run = copy_run(fault_base["six"], tmp_path / "run")
    before = tree(run)
    code, _ = run_main(["--resume", str(run), *extra])
    assert code == 2 and "cannot be combined" in capsys.readouterr().err
    assert tree(run) == before


def test_complete_run_resume_says_so(fault_base, tmp_path):
    run = copy_run(fault_base["six"], tmp_path / "run")
    code, msg = run_main(["--resume", str(run)])
    assert code == 2 and "complete" in msg and "train.total_steps" in msg


def test_resume_from_another_working_directory(fault_base, tmp_path, monkeypatch):
    """Relative paths in the config are stored resolved: the resume finds the same teacher and root."""
    cfg = json.loads(fault_base["cfg"].read_text())
    monkeypatch.chdir(fault_base["dir"])
    cfg["model"]["teacher"] = "teacher.safetensors"
    cfg["run"]["root"] = "rel_runs"
    rel = tmp_path / "rel.json"
    rel.write_text(json.dumps(cfg))
    assert run_main(["--config", str(rel), "--set", "run.name=relrun", "train.total_steps=3"]) == (0, "")
    run = fault_base["dir"] / "rel_runs" / "relrun"
    stored = json.loads((run / "config.json").read_text())
    assert stored["model"]["teacher"] == str(fault_base["dir"] / "teacher.safetensors")
    assert stored["run"]["root"] == str(fault_base["dir"] / "rel_runs")
    monkeypatch.chdir(tmp_path)
    assert run_main(["--resume", str(run), "--set", "train.total_steps=9"]) == (0, "")
    from .fault_tools import assert_bit_identical
    assert_bit_identical(run, fault_base["reference"])


@pytest.mark.parametrize("bad", ["nan", "garbage"])
def test_bad_generator_init_names_the_key(fault_base, tmp_path, bad):
    from safetensors.torch import load_file, save_file
    f = tmp_path / "gen.safetensors"
    if bad == "nan":
        sd = load_file(str(fault_base["dir"] / "teacher.safetensors"))
        sd[sorted(sd)[0]].view(-1)[0] = float("inf")
        save_file(sd, str(f))
    else:
        f.write_bytes(b"not a safetensors file")
    code, msg = run_main(["--config", str(fault_base["cfg"]), "--run-dir", str(tmp_path / "run"),
                          "--set", f"model.generator_init={f}"])
    assert code == 2 and "model.generator_init" in msg and str(f) in msg, msg
    assert ("non-finite" in msg) == (bad == "nan")
    assert not (tmp_path / "run").exists()


def test_memory_estimate_terms(fault_base):
    """The estimate's terms follow the documented formula (engine/memory.py)."""
    from sfd_fast.config import load_config
    from sfd_fast.digits.build import build_parts
    from sfd_fast.engine.memory import estimate_bytes
    import torch
    cpu = torch.device("cpu")
    cfg = load_config(fault_base["cfg"])
    parts = build_parts(cfg)
    trained = sum(p.numel() for n in (parts.fake_score, parts.generator) for p in n.parameters())
    plain = estimate_bytes(cfg, parts, cpu)
    assert plain["gradients_and_adam"] == 12 * trained and plain["rows"] == 16 and plain["activations"] > 0
    cfg.engine.backend, cfg.engine.zero_stage = "deepspeed", 2
    assert estimate_bytes(cfg, parts, cpu, world=2)["gradients_and_adam"] == 6 * trained
    cfg.engine.zero_stage, cfg.engine.optimizer = 1, "adam8bit"
    assert estimate_bytes(cfg, parts, cpu, world=2)["gradients_and_adam"] == 5 * trained   # 4 + 2/2
    cfg.engine.activation_checkpointing = True
    assert estimate_bytes(cfg, parts, cpu, world=2)["activations"] == 0
    cfg.engine.activation_checkpointing, cfg.sfd.cfg_eval_real = False, 2.0   # guidance: cond + uncond rows
    assert estimate_bytes(cfg, parts, cpu, world=2)["rows"] == 16     # 8 rows per rank, x2 for guidance
