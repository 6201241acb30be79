"""DeepSpeed ZeRO backend on CPU: 2 ranks over gloo (torchrun), against the single-process run.

One torchrun launch (module fixture) runs every distributed job in sequence inside the same two
processes (a process group and DeepSpeed's JIT-built comm op are paid for once); the tests then
read the run directories. Jobs: ZeRO 0/1/2/3 for 5 steps; ZeRO-2 and ZeRO-3 stopped at step 3 and
resumed to 5; 8-bit Adam under ZeRO-2; a NaN injected on rank 1 only (ZeRO 0, 2, 3); bf16
under ZeRO-2.

Draws are comparable by construction: every rank draws the global micro batch from the same seeded
stream and keeps rows [r*m, (r+1)*m) of the remain and of the forget half (engine.rng_mode
'global_slice'), so a 2-rank run at global batch B draws exactly what the single-process
run draws at B; the only difference left is the order of floating-point reductions.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sfd_fast import train
from sfd_fast.config import ConfigError, load_config

from .helpers import auto_cap_between, tiny_digits_config

ROOT = Path(__file__).resolve().parents[1]
def _installed(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAS_DS, HAS_BNB = _installed("deepspeed"), _installed("bitsandbytes")
needs_ds = pytest.mark.skipif(not HAS_DS, reason="deepspeed is not installed (pip install -e '.[dist]')")
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install bitsandbytes)")

STEPS = 5
# fp32 tolerance on per-step mean losses (values 1e-1..1e2): the DS run differs from one process
# only in reduction order (per-rank partial sums, then the rank average; ZeRO's flat buckets), about
# 1e-7 relative per op. Adam with beta1 = 0 normalises each update (g / sqrt(v)), so those errors
# enter the weights at the 1e-7 level and grow only mildly over 5 steps: measured max 5e-6 rel.
# 1e-4 is 20x above that and about 100x below the smallest loss change between steps.
RTOL, ATOL = 1e-4, 1e-5
# bf16: DeepSpeed keeps bf16 weights (fp32 masters) where the plain path keeps fp32 weights under
# autocast; the fake-score losses agree to about 1e-3 relative (measured), bf16's resolution is 4e-3.
BF16_RTOL = 5e-3

SECTIONS = dict(train={"total_steps": STEPS, "batch_size": 8, "grad_accum": 2, "log_every": 1,
                       "checkpoint_every": 3, "sample_every": 100, "ema": {"halflife_kimg": 0.01}})

WORKER = textwrap.dedent('''
    import json, os, sys, torch
    from pathlib import Path
    from sfd_fast import train
    jobs = json.loads(Path(sys.argv[1]).read_text())

    def digits_trainer(job):
        """A DeepSpeed SFDTrainer on the digits parts of job["config"] + job["set"], in job["run_dir"]."""
        from sfd_fast.config import load_config
        from sfd_fast.digits.build import build_parts
        from sfd_fast.engine.distributed import init_distributed
        from sfd_fast.trainer import SFDTrainer
        cfg = load_config(job["config"], job["set"])
        device = init_distributed(cfg)
        run_dir = Path(job["run_dir"]); run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.run.seed)
        return SFDTrainer(cfg, build_parts(cfg), run_dir, device), torch.distributed.get_rank(), run_dir

    for job in jobs:
        if job["kind"] == "train":
            train.main(job["argv"])
        elif job["kind"] == "nan":  # a NaN in one row on rank 1 only: every rank must skip the update
            tr, rank, run_dir = digits_trainer(job)
            tr.train_step()
            b = tr.backend
            full = lambda: {**{"G." + k: v for k, v in b._full_fp32(tr.generator.net).items()},
                            **{"F." + k: v for k, v in b._full_fp32(tr.fake_score.net).items()}}
            before = full()
            orig = b.draw
            def nan_draw(phase, *a):
                d = orig(phase, *a)
                if rank == 1:
                    d.z[0] = float("nan")
                return d
            b.draw = nan_draw
            tr.train_step()
            after_nan = full()
            b.draw = orig
            tr.train_step()
            after_ok = full()
            if rank == 0:
                out = {"unchanged": all(torch.equal(before[k], after_nan[k]) for k in before),
                       "finite": all(torch.isfinite(v).all().item() for v in after_nan.values()),
                       "skipped": tr.skipped.tolist(),
                       "moved_after": any(not torch.equal(before[k], after_ok[k]) for k in before)}
                Path(job["out"]).write_text(json.dumps(out))
        elif job["kind"] == "ema_off":  # no persistent fp32 generator copy without EMA (issue #10)
            tr, rank, run_dir = digits_trainer(job)
            b = tr.backend
            meta = lambda: all(p.is_meta for p in tr.generator_ema.net.parameters())
            out = {"meta_at_start": meta()}
            tr.train_step(); tr.train_step()
            gen = b.sampling_generator()
            masters = b._full_fp32(tr.generator.net)
            out["meta_while_sampling"] = meta()
            if rank == 0:
                out["copy_is_masters"] = all(torch.equal(v, masters[k]) for k, v in gen.net.state_dict().items())
                out["copy_dtypes"] = sorted({str(v.dtype) for v in gen.net.state_dict().values()})
            b.release_sampling()
            out["meta_after_release"] = meta()
            tr.train(4)      # grids at steps 3 (released after) and 4 (kept by finish for the evaluation)
            out["meta_after_finish"] = meta()
            if rank == 0:
                from safetensors.torch import load_file
                final = load_file(str(run_dir / "checkpoints" / "step-00000004" / "generator.safetensors"))
                out["final_copy_is_export"] = all(torch.equal(v, final[k]) for k, v in tr.generator_ema.net.state_dict().items())
            Path(job["out"] + f".rank{rank}").write_text(json.dumps(out))
        torch.distributed.barrier() if torch.distributed.is_initialized() else None
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()   # as train.cli does: no gloo teardown at exit
''')


def _stats(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "stats.jsonl").read_text().splitlines()]


def _losses(run_dir):
    keys = ("fake_score_loss/remain", "fake_score_loss/forget", "generator_loss/remain", "generator_loss/forget")
    return {(r["step"], k): r[k] for r in _stats(run_dir) for k in keys}


def _final(run_dir, step=STEPS):
    ck = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    return {role: load_file(str(ck / f"{role}.safetensors")) for role in ("generator", "fake_score", "generator_ema")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not HAS_DS:
        pytest.skip("deepspeed is not installed (pip install -e '.[dist]')")
    tmp = tmp_path_factory.mktemp("ds")
    cfg = str(tiny_digits_config(tmp, **SECTIONS))
    out = {"tmp": tmp, "cfg": cfg, "timing": {}}
    t0 = time.time()
    train.main(["--config", cfg, "--run-dir", str(tmp / "plain")])
    train.main(["--config", cfg, "--run-dir", str(tmp / "plain_bf16"), "--set", "engine.precision=bf16"])
    out["timing"]["plain"] = time.time() - t0
    ds = lambda *kv: ["--set", "engine.backend=deepspeed", *kv]
    jobs = [{"kind": "train", "argv": ["--config", cfg, "--run-dir", str(tmp / f"z{s}"), *ds(f"engine.zero_stage={s}")]}
            for s in range(4)]
    for s in (2, 3):
        part = str(tmp / f"z{s}_part")
        jobs += [{"kind": "train", "argv": ["--config", cfg, "--run-dir", part,
                                            *ds(f"engine.zero_stage={s}", "train.total_steps=3")]},
                 {"kind": "train", "argv": ["--resume", part, "--set", f"train.total_steps={STEPS}"]}]
    if HAS_BNB:
        jobs.append({"kind": "train", "argv": ["--config", cfg, "--run-dir", str(tmp / "z2_adam8bit"),
                                               *ds("engine.zero_stage=2", "engine.optimizer=adam8bit",
                                                   "train.total_steps=2", "train.checkpoint_every=2")]})
    jobs.append({"kind": "train", "argv": ["--config", cfg, "--run-dir", str(tmp / "z2_bf16"),
                                           *ds("engine.zero_stage=2", "engine.precision=bf16")]})
    # micro_batch "auto", ZeRO-2, a cap fitting 2 rows per rank (not 4): the z2 job's 2 x accum 2 x world 2
    ds_cap = auto_cap_between(cfg, 2, 4, ["engine.backend=deepspeed", "engine.zero_stage=2"], world=2)
    jobs.append({"kind": "train", "argv": ["--config", cfg, "--run-dir", str(tmp / "z2_auto"),
                                           *ds("engine.zero_stage=2", "train.grad_accum=1", "train.micro_batch=auto",
                                               f"engine.memory_limit_gib={ds_cap!r}")]})
    for s in (0, 2, 3):   # ZeRO-0: the optimizer's own guard; ZeRO 1-3: DeepSpeed's overflow check
        jobs.append({"kind": "nan", "config": cfg, "run_dir": str(tmp / f"z{s}_nan"), "out": str(tmp / f"nan{s}.json"),
                     "set": ["engine.backend=deepspeed", f"engine.zero_stage={s}"]})
    jobs.append({"kind": "ema_off", "config": cfg, "run_dir": str(tmp / "z2_ema_off"), "out": str(tmp / "ema_off.json"),
                 "set": ["engine.backend=deepspeed", "engine.zero_stage=2", "engine.precision=bf16",
                         "train.ema.halflife_kimg=0", "train.sample_every=1", "train.checkpoint_every=4"]})
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    (tmp / "worker.py").write_text(WORKER)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PYTHONWARNINGS": "ignore"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun) if torchrun.exists() else sys.executable, *([] if torchrun.exists() else ["-m", "torch.distributed.run"]),
           "--standalone", "--nproc_per_node", "2", str(tmp / "worker.py"), str(tmp / "jobs.json")]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    out["timing"]["deepspeed"] = time.time() - t0
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return out


def _assert_close_losses(a, b, rtol, atol):
    assert a.keys() == b.keys() and len(a) == 4 * STEPS
    worst = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in a)
    for k in a:
        assert abs(a[k] - b[k]) <= atol + rtol * abs(b[k]), (k, a[k], b[k], worst)
    return worst


@needs_ds
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_losses_match_single_process(runs, stage):
    ref = _losses(runs["tmp"] / "plain")
    got = _losses(runs["tmp"] / f"z{stage}")
    _assert_close_losses(got, ref, RTOL, ATOL)
    # the exported plain safetensors weights match the single-process weights too. Adam with
    # beta1 = 0 moves each weight by lr * g / sqrt(v) per step; for the rare element whose gradient
    # is at the rounding-noise floor that ratio is itself noise, so the bound is a small fraction
    # of lr x steps (5e-3): atol 2e-5 (measured worst: 7.5e-6, one element of 1024)
    wa, wb = _final(runs["tmp"] / f"z{stage}"), _final(runs["tmp"] / "plain")
    for role in wb:
        assert wa[role].keys() == wb[role].keys()
        for k in wb[role]:
            torch.testing.assert_close(wa[role][k], wb[role][k], rtol=1e-4, atol=2e-5)
    d = json.loads((runs["tmp"] / f"z{stage}" / "deepspeed_generator.json").read_text())
    assert d["zero_optimization"]["stage"] == stage
    assert (d["train_batch_size"], d["train_micro_batch_size_per_gpu"], d["gradient_accumulation_steps"]) == (8, 2, 2)


@needs_ds
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_from_deepspeed_checkpoint_is_identical(runs, stage):
    full, part = runs["tmp"] / f"z{stage}", runs["tmp"] / f"z{stage}_part"
    assert _losses(part) == _losses(full)          # bit-identical per-step losses, steps 1-5
    wa, wb = _final(full), _final(part)
    for role in wa:
        for k in wa[role]:
            assert torch.equal(wa[role][k], wb[role][k]), (role, k)


@needs_ds
def test_plain_path_reads_the_exported_weights(runs):
    """generator_init from a DeepSpeed run directory (the single-process reader) loads its EMA."""
    from sfd_fast.digits.build import load_generator_init
    from sfd_fast.digits.model import DigitsEpsMLP
    cfg = load_config(runs["cfg"], [f"model.generator_init={runs['tmp'] / 'z2'}"])
    net = load_generator_init(cfg, DigitsEpsMLP(10, 32, 1))
    ema = _final(runs["tmp"] / "z2")["generator_ema"]
    assert all(torch.equal(net.state_dict()[k], ema[k]) for k in ema)


@needs_ds
@needs_bnb
def test_adam8bit_under_zero2_has_uint8_state(runs):
    run = runs["tmp"] / "z2_adam8bit"
    stats = _stats(run)
    assert [s["step"] for s in stats] == [1, 2]
    assert all(s["skipped_updates/generator"] == 0 for s in stats)
    for role in ("generator", "fake_score"):
        f = run / "checkpoints" / "step-00000002" / f"ds_{role}" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        base = torch.load(f, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["state"]
        # ZeRO-2 hands bnb one flat fp32 partition per rank (7552 elements >= bnb's 4096 minimum)
        dtypes = {}
        for st in base.values():
            st = {**st, **st.get("__bnb_optimizer_quant_state__", {})}
            dtypes.update({k: v.dtype for k, v in st.items() if torch.is_tensor(v)})
        assert dtypes["state1"] == torch.uint8 and dtypes["state2"] == torch.uint8, dtypes


@needs_ds
def test_bf16_runs_close_to_plain_bf16(runs):
    got, ref = _losses(runs["tmp"] / "z2_bf16"), _losses(runs["tmp"] / "plain_bf16")
    assert got.keys() == ref.keys() and all(map(lambda v: v == v, got.values()))
    for (step, key), v in got.items():
        if key.startswith("fake_score"):   # a mean of O(100) squared errors: bf16-level agreement
            assert abs(v - ref[step, key]) <= BF16_RTOL * abs(ref[step, key]), (step, key, v, ref[step, key])
        else:
            # the generator loss is built from y_real - y_fake, two nearly equal x0-estimates; bf16
            # weight rounding (2^-9 relative) is as large as one Adam step here (lr 1e-3), so two
            # bf16 implementations differ by O(10%) (plain bf16 vs plain fp32 already by 2-4%)
            assert abs(v - ref[step, key]) <= 0.2 * abs(ref[step, key]) + 0.05, (step, key, v, ref[step, key])
    d = json.loads((runs["tmp"] / "z2_bf16" / "deepspeed_fake_score.json").read_text())
    assert d["bf16"] == {"enabled": True} and d["fp16"] == {"enabled": False}


@needs_ds
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_nan_on_one_rank_skips_the_update_on_all_ranks(runs, stage):
    out = json.loads((runs["tmp"] / f"nan{stage}.json").read_text())
    assert out["unchanged"] and out["finite"], out
    assert out["skipped"] == [1.0, 1.0], out
    assert out["moved_after"], out


@needs_ds
def test_no_persistent_fp32_generator_copy_without_ema(runs):
    """DeepSpeed without EMA: the sampling generator is a meta-device skeleton (no storage) except
    while a grid/evaluation needs it, and then on rank 0 only; the temporary copy holds exactly the
    fp32 master weights; the copy kept after the run is the exported final generator."""
    r0, r1 = (json.loads((runs["tmp"] / f"ema_off.json.rank{r}").read_text()) for r in (0, 1))
    assert r0["meta_at_start"] and r1["meta_at_start"]
    assert not r0["meta_while_sampling"] and r1["meta_while_sampling"]
    assert r0["copy_is_masters"] and r0["copy_dtypes"] == ["torch.float32"]
    assert r0["meta_after_release"] and r1["meta_after_release"]
    assert not r0["meta_after_finish"] and r1["meta_after_finish"]
    assert r0["final_copy_is_export"]
    grids = sorted(p.name for p in (runs["tmp"] / "z2_ema_off" / "samples").glob("*.png"))
    assert grids == ["step-00000003.png", "step-00000004.png"]

# ------------------------------------------------------------------------------- bad input (no launch)

@needs_ds
def test_auto_micro_batch_under_zero2_is_agreed_recorded_and_equals_the_explicit_run(runs):
    auto, explicit = runs["tmp"] / "z2_auto", runs["tmp"] / "z2"
    saved = json.loads((auto / "config.json").read_text())["train"]
    assert saved["micro_batch"] == 4 and saved["grad_accum"] == 2          # global: 2 rows x world 2
    ds = [json.loads((auto / f"deepspeed_{r}.json").read_text()) for r in ("generator", "fake_score")]
    assert all(d["train_micro_batch_size_per_gpu"] == 2 and d["gradient_accumulation_steps"] == 2 for d in ds)
    assert "auto -> 2 remain + 2 forget rows per micro-batch on each of 2 rank(s)" in (auto / "log.txt").read_text()
    assert _losses(auto) == _losses(explicit)
    a, b = _final(auto), _final(explicit)
    assert all(torch.equal(a[r][k], b[r][k]) for r in a for k in a[r])


def test_zero_stage_out_of_range(tmp_path):
    with pytest.raises(ConfigError, match="engine.zero_stage"):
        load_config(tiny_digits_config(tmp_path), ["engine.backend=deepspeed", "engine.zero_stage=4"])


def test_accumulation_times_world_must_divide_batch(tmp_path, monkeypatch):
    cfg = tiny_digits_config(tmp_path, train={"batch_size": 8, "grad_accum": 2})
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match=r"train.batch_size \(8\).*grad_accum \(2\) x world size \(3\)"):
        train.main(["--config", str(cfg), "--set", "engine.backend=deepspeed"])
    assert not (tmp_path / "runs" / "tiny").exists()   # nothing written


def test_adam8bit_without_bitsandbytes_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # import bitsandbytes -> ImportError
    cfg = tiny_digits_config(tmp_path)
    with pytest.raises(SystemExit, match="pip install bitsandbytes"):
        train.main(["--config", str(cfg), "--set", "engine.optimizer=adam8bit"])
    assert not (tmp_path / "runs" / "tiny").exists()


def test_xformers_without_working_xformers_fails_before_training(tmp_path):
    cfg = tiny_digits_config(tmp_path)   # run.device cpu: xformers cannot run even when installed
    with pytest.raises(SystemExit, match="engine.attention='xformers'.*attention='sdpa'"):
        train.main(["--config", str(cfg), "--set", "engine.attention=xformers"])
    assert not (tmp_path / "runs" / "tiny").exists()


def test_deepspeed_config_merge_and_owned_keys(tmp_path):
    from sfd_fast.engine.distributed import build_deepspeed_config
    cfg = load_config(tiny_digits_config(tmp_path), ["engine.backend=deepspeed", "engine.zero_stage=2",
                                                     f"engine.deepspeed_config={ROOT / 'configs' / 'ds_zero2.json'}"])
    d = build_deepspeed_config(cfg, "generator", 2)
    assert d["zero_optimization"]["stage"] == 2 and d["zero_optimization"]["overlap_comm"] is True
    assert d["train_micro_batch_size_per_gpu"] * d["gradient_accumulation_steps"] * 2 == d["train_batch_size"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    cfg.engine.deepspeed_config = str(bad)
    with pytest.raises(ConfigError, match="optimizer"):
        build_deepspeed_config(cfg, "generator", 2)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="engine.zero_stage"):
        build_deepspeed_config(cfg, "generator", 2)


# ------------------------------------------------------------------------------- plain backend pieces

@needs_bnb
def test_adam8bit_in_plain_backend(tmp_path):
    from sfd_fast.digits.build import build_parts as build_digits_parts
    from sfd_fast.trainer import SFDTrainer
    cfg = load_config(tiny_digits_config(tmp_path), ["engine.optimizer=adam8bit"])
    (tmp_path / "r").mkdir()
    tr = SFDTrainer(cfg, build_digits_parts(cfg), tmp_path / "r", torch.device("cpu"))
    tr.train_step()
    dtypes = {v.dtype for st in tr.backend.optimizers["generator"].state.values() for k, v in st.items() if k == "state1"}
    assert torch.uint8 in dtypes   # tensors >= 4096 elements (time.0.weight: 128 x 32)
    # the skip protocol: a set flag leaves the weights unchanged
    before = {k: v.clone() for k, v in tr.generator.state_dict().items()}
    orig = tr.backend.draw

    def nan_draw(phase, *a):
        d = orig(phase, *a)
        d.z[1] = float("nan")
        return d
    tr.backend.draw = nan_draw
    tr.train_step()
    assert all(torch.equal(v, before[k]) for k, v in tr.generator.state_dict().items())
    assert tr.skipped.tolist() == [1.0, 1.0]


def test_activation_checkpointing_same_step(tmp_path):
    from sfd_fast.digits.build import build_parts as build_digits_parts
    from sfd_fast.digits.model import DigitsEpsMLP
    from sfd_fast.trainer import SFDTrainer
    losses = []
    for ac in (False, True):
        cfg = load_config(tiny_digits_config(tmp_path), [f"engine.activation_checkpointing={str(ac).lower()}"])
        d = tmp_path / f"r{ac}"
        d.mkdir()
        tr = SFDTrainer(cfg, build_digits_parts(cfg), d, torch.device("cpu"))
        assert all(type(b).__name__.startswith("Checkpointed") == ac for b in tr.generator.net.blocks)
        tr.train_step()
        tr.train_step()
        losses.append(tr.stats.clone())
        assert set(tr.generator.net.state_dict()) == set(DigitsEpsMLP(10, 32, 1).state_dict())  # keys unchanged
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)


def test_gpu_telemetry_is_empty_without_gpu():
    from sfd_fast.engine.telemetry import gpu_telemetry
    assert gpu_telemetry(torch.device("cpu")) == {}


@needs_ds
@pytest.mark.slow
def test_documented_deepspeed_launch_exits_cleanly(tmp_path):
    """The README's command, `deepspeed --num_gpus 2 sfd_fast/train.py ...` (DeepSpeed's own launcher,
    2 CPU ranks over gloo): both ranks train, rank 0 writes, and the launch exits 0 (train.cli closes
    the process group on every rank before the interpreter's exit)."""
    launcher = Path(sys.executable).with_name("deepspeed")
    if not launcher.exists():
        pytest.skip(f"the deepspeed launcher is not beside {sys.executable}")
    cfg = tiny_digits_config(tmp_path)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    run = tmp_path / "run"
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()),
                           str(ROOT / "sfd_fast" / "train.py"), "--config", cfg, "--run-dir", str(run),
                           "--set", "engine.backend=deepspeed", "engine.zero_stage=2", "train.total_steps=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert _stats(run)[-1]["step"] == 2
    assert "deepspeed: world 2" in (run / "log.txt").read_text()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
