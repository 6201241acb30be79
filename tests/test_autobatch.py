"""train.micro_batch "auto" (engine/autobatch.py): the choice, the probe's invisibility, resume, back-off.

CPU only: the limit is stated with engine.memory_limit_gib (the auto choice plans for HEADROOM x the
cap), and CUDA out-of-memory errors are faked by raising torch.cuda.OutOfMemoryError inside the probe.
"""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from sfd_fast import train
from sfd_fast.checkpoint import latest_checkpoint, load_checkpoint
from sfd_fast.config import ConfigError, load_config
from sfd_fast.digits.build import build_parts as build_digits_parts
from sfd_fast.engine import autobatch
from sfd_fast.engine.autobatch import HEADROOM, agree_across_ranks, pick_micro_batch
from sfd_fast.trainer import SFDTrainer

from .fault_tools import run_main
from .helpers import auto_cap_between, tiny_digits_config

CPU = torch.device("cpu")
GIB = 2 ** 30


def _cfg(tmp_path, **train_keys):
    return tiny_digits_config(tmp_path, train={"total_steps": 4, "checkpoint_every": 2, "log_every": 1,
                                               "ema": {"halflife_kimg": 0.01}, **train_keys})


def _cap_between(cfg_path, small: int, large: int) -> float:
    return auto_cap_between(cfg_path, small, large)


def _run_record(run_dir):
    ck = latest_checkpoint(run_dir)
    weights = {n: load_file(str(ck / f"{n}.safetensors")) for n in ("generator", "fake_score", "generator_ema")}
    return ck.name, weights, load_checkpoint(ck)["optim"], load_checkpoint(ck)["rng"], \
        (run_dir / "stats.jsonl").read_text().splitlines()


def _assert_same_run(a, b):
    (name_a, w_a, o_a, r_a, s_a), (name_b, w_b, o_b, r_b, s_b) = _run_record(a), _run_record(b)
    assert name_a == name_b
    for role in w_a:
        assert all(torch.equal(w_a[role][k], w_b[role][k]) for k in w_a[role]), role
    for role in o_a:
        assert all(torch.equal(o_a[role][k], o_b[role][k]) for k in o_a[role]), role
    assert torch.equal(r_a, r_b)
    drop = ("time", "samples_per_s", "sec_per_kimg", "peak_mem_bytes")
    strip = lambda lines: [{k: v for k, v in json.loads(l).items() if k not in drop} for l in lines]
    assert strip(s_a) == strip(s_b)


# ------------------------------------------------------------------ the search itself (no networks)

def test_pick_takes_the_largest_candidate_within_budget_and_probes_only_it():
    probed = []
    choice = pick_micro_batch([8, 4, 2, 1], lambda m: 100 * m, 450, lambda m: probed.append(m))
    assert choice.micro == 4 and choice.need == 400 and probed == [4]
    assert [v.split()[0] for _, v in choice.tried] == ["estimate", "fits"]


def test_pick_backs_off_on_oom_and_on_measured_peak_plus_optimizer_state():
    freed = []

    def probe(m):
        if m > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return {4: 900, 2: 500, 1: 300}[m]     # allocator peaks
    choice = pick_micro_batch([8, 4, 2, 1], lambda m: 10 * m, 1000, probe, unmeasured=200,
                              on_oom=lambda: freed.append(True))
    # 8: OOM; 4: 900 + 200 optimizer state > 1000; 2: 500 + 200 fits
    assert choice.micro == 2 and choice.peak == 500 and freed == [True]
    assert [m for m, _ in choice.tried] == [8, 4, 2]
    assert "out of memory" in choice.tried[0][1] and "probe peak" in choice.tried[1][1]


def test_pick_returns_zero_when_nothing_fits():
    assert pick_micro_batch([2, 1], lambda m: 10, 5, lambda m: None).micro == 0


# ------------------------------------------------------------------ config

def test_auto_with_grad_accum_and_bad_memory_limit_are_refused(tmp_path):
    path = _cfg(tmp_path)
    with pytest.raises(ConfigError, match="train.micro_batch"):
        load_config(path, ["train.micro_batch=auto", "train.grad_accum=2"])
    for bad in ("0", "-1", "true"):
        with pytest.raises(ConfigError, match="engine.memory_limit_gib"):
            load_config(path, [f"engine.memory_limit_gib={bad}"])
    assert load_config(path, ["train.micro_batch=auto"]).train.micro_batch == "auto"


# ------------------------------------------------------------------ the choice in a run

def test_generous_limit_picks_the_whole_batch_and_records_it(tmp_path):
    path = _cfg(tmp_path, total_steps=2)
    run = tmp_path / "run"
    train.main(["--config", str(path), "--run-dir", str(run), "--set", "train.micro_batch=auto",
                "engine.memory_limit_gib=64"])
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["micro_batch"] == 8 and saved["grad_accum"] == 1      # resolved: an int, not "auto"
    line = [l for l in (run / "log.txt").read_text().splitlines() if "train.micro_batch=auto" in l]
    assert len(line) == 1 and "-> 8 remain + 8 forget rows" in line[0] and "grad_accum 1" in line[0]
    assert "estimate" in line[0] and "limit" in line[0] and "largest that fits" in line[0]


def test_tight_limit_picks_a_smaller_divisor(tmp_path):
    path = _cfg(tmp_path)
    cap = _cap_between(path, 2, 4)
    report = train.main(["--config", str(path), "--dry-run", "--set", "train.micro_batch=auto",
                         f"engine.memory_limit_gib={cap!r}"])
    mb = report["micro_batch"]
    assert mb["micro_batch"] == 2 and mb["grad_accum"] == 4 and mb["auto"]["per_rank"] == 2
    assert mb["auto"]["estimate_bytes"] <= mb["auto"]["budget_bytes"] == int(HEADROOM * int(cap * GIB))
    assert report["config"]["train"]["micro_batch"] == 2 and report["config"]["train"]["grad_accum"] == 4


def test_limit_below_micro_batch_one_is_refused_before_anything_is_written(tmp_path):
    path = _cfg(tmp_path)
    cap = _cap_between(path, 1, 2) / 100      # a hundredth of what a micro-batch of 1 needs
    run = tmp_path / "run"
    code, msg = run_main(["--config", str(path), "--run-dir", str(run), "--set", "train.micro_batch=auto",
                          f"engine.memory_limit_gib={cap!r}"])
    assert code == 2 and "train.micro_batch='auto'" in msg and "not even a micro-batch of 1" in msg, msg
    assert "engine.memory_limit_gib" in msg and "activation_checkpointing" in msg
    assert not run.exists()


def test_auto_run_equals_the_explicit_int_run_bit_for_bit(tmp_path, monkeypatch):
    """The probe step runs on the run's own networks, task and RNG: nothing of it may show."""
    path = _cfg(tmp_path)
    cap = _cap_between(path, 2, 4)
    probed = []
    real_probe = autobatch.probe_step
    monkeypatch.setattr(autobatch, "probe_step", lambda tr, m: probed.append(m) or real_probe(tr, m))
    train.main(["--config", str(path), "--run-dir", str(tmp_path / "auto"), "--set", "train.micro_batch=auto",
                f"engine.memory_limit_gib={cap!r}"])
    assert probed == [2]
    train.main(["--config", str(path), "--run-dir", str(tmp_path / "int"), "--set", "train.micro_batch=2"])
    _assert_same_run(tmp_path / "auto", tmp_path / "int")


def test_resume_of_an_auto_run_reuses_the_recorded_choice(tmp_path, monkeypatch):
    path = _cfg(tmp_path)
    cap = _cap_between(path, 2, 4)
    auto = ["--set", "train.micro_batch=auto", f"engine.memory_limit_gib={cap!r}"]
    train.main(["--config", str(path), "--run-dir", str(tmp_path / "full"), *auto])
    train.main(["--config", str(path), "--run-dir", str(tmp_path / "part"), *auto,
                "train.total_steps=2"])
    assert json.loads((tmp_path / "part" / "config.json").read_text())["train"]["micro_batch"] == 2

    def no_probe(*a, **k):
        raise AssertionError("--resume must not choose again")
    monkeypatch.setattr(autobatch, "probe_step", no_probe)
    monkeypatch.setattr(autobatch, "resolve_auto_micro_batch", no_probe)
    train.main(["--resume", str(tmp_path / "part"), "--set", "train.total_steps=4"])
    _assert_same_run(tmp_path / "full", tmp_path / "part")


def _fake_oom_above(monkeypatch, largest: int) -> None:
    """The probe runs out of memory (a faked CUDA OOM, raised after its fake-score phase and its
    generator draw) for every micro-batch above `largest` rows per branch."""
    real_draw = autobatch.draw_phase

    def draw(task, rng, n_remain, *a):
        d = real_draw(task, rng, n_remain, *a)
        if a[-1] == "generator" and n_remain > largest:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return d
    monkeypatch.setattr(autobatch, "draw_phase", draw)


def test_fake_oom_in_the_probe_backs_off_and_leaves_no_trace(tmp_path, monkeypatch):
    """An out-of-memory error in the middle of the probe (after its draws, the fake-score backward
    and the generator forward) for micro-batches above 2: the choice is 2, and the trainer steps
    exactly as one built with micro_batch=2."""
    path = _cfg(tmp_path)
    _fake_oom_above(monkeypatch, 2)

    def trainer(micro):
        cfg = load_config(path, [f"train.micro_batch={micro}", "engine.memory_limit_gib=64"])
        torch.manual_seed(cfg.run.seed)
        tr = SFDTrainer(cfg, build_digits_parts(cfg), None, CPU)
        return tr, torch.get_rng_state()
    (auto, auto_global), (ref, ref_global) = trainer("auto"), trainer(2)
    assert torch.equal(auto_global, ref_global)          # the global torch RNG as without a probe
    choice = auto.micro_batch_choice
    assert choice["per_rank"] == 2 and auto.cfg.train.grad_accum == 4
    assert [(m, v) for m, v in choice["tried"]] == [(8, "probe ran out of memory"), (4, "probe ran out of memory"),
                                                    (2, "fits")]
    assert all(p.grad is None for net in (auto.generator, auto.fake_score) for p in net.parameters())
    assert torch.equal(auto.rng.get_state(), ref.rng.get_state())
    for _ in range(2):
        auto.train_step(), ref.train_step()
    for a, b in ((auto.generator, ref.generator), (auto.fake_score, ref.fake_score),
                 (auto.generator_ema, ref.generator_ema)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(auto.stats, ref.stats) and auto.step == ref.step == 2


# ------------------------------------------------------------------ ranks agree

def _agree_worker(rank, port, values, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=len(values))
    try:
        out[rank] = agree_across_ranks(values[rank], CPU)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("values,agreed", [((4, 2), 2), ((0, 4), 0)])
def test_ranks_agree_on_the_smallest_choice(values, agreed):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.get_context("spawn").Manager().dict()
    mp.spawn(_agree_worker, args=(port, values, out), nprocs=len(values))
    assert dict(out) == {r: agreed for r in range(len(values))}
    assert agree_across_ranks(3, CPU) == 3      # no process group: this process's own choice


# ------------------------------------------------------------------ Stable Diffusion

def test_sd15_configs_ask_for_auto():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    for name in ("sd15_jolie.json", "sd15_pitt.json"):
        cfg = load_config(root / "configs" / name)
        assert cfg.train.micro_batch == "auto" and cfg.train.grad_accum == 1 and cfg.train.batch_size == 8, name


def test_tiny_sd_auto_with_fake_oom_equals_the_explicit_run(tmp_path, monkeypatch):
    """The text task (prompt stream, CLIP cache) and the UNets: the probe at 2 rows runs out of
    memory mid-way (fake), the choice is 1, and two steps equal a micro_batch=1 trainer's exactly."""
    from sfd_fast.sd.build import build_parts as build_sd_parts
    from sfd_fast.sd.tiny import build_tiny_sd
    from .test_sd_run import sd_config
    pretrained = build_tiny_sd(tmp_path / "tiny_sd", sample_size=8)
    path = sd_config(tmp_path, pretrained, train={"batch_size": 2})
    _fake_oom_above(monkeypatch, 1)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def trainer(micro):
            cfg = load_config(path, [f"train.micro_batch={micro}"])
            torch.manual_seed(cfg.run.seed)
            return SFDTrainer(cfg, build_sd_parts(cfg), None, CPU)
        auto, ref = trainer("auto"), trainer(1)
        assert auto.micro_batch_choice["tried"] == [(2, "probe ran out of memory"), (1, "fits")]
        assert auto.cfg.train.grad_accum == ref.cfg.train.grad_accum == 2
        assert torch.equal(auto.parts.task.rng_state(), ref.parts.task.rng_state())
        for _ in range(2):
            auto.train_step(), ref.train_step()
    finally:
        torch.set_num_threads(n)
    for a, b in ((auto.generator, ref.generator), (auto.fake_score, ref.fake_score)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(auto.stats, ref.stats)
