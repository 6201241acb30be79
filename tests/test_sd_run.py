"""Stable Diffusion SFD end to end on a tiny random pipeline (CPU, no downloads).

The pipelines are built once per module (latents 8x8, i.e. 64 px) and every model here is tiny so
the file runs in well under three minutes on two shared cores.
"""
from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from sfd_fast import train
from sfd_fast.sd.text import TextEncoderCache
from sfd_fast.config import ConfigError, load_config
from sfd_fast.sd.prompts import ForgetPromptSet, RemainPromptSet
from sfd_fast.sd.tiny import build_tiny_sd
from sfd_fast.sd.build import build_parts as build_sd_parts, make_task
from sfd_fast.sd.sampling import sample_latents
from sfd_fast.step import PhaseDraws, draw_phase
from sfd_fast.conditions import PhaseConditions
from sfd_fast.sd.text import TextForgetTask
from sfd_fast.trainer import SFDTrainer
from tests.helpers import fake_phase, gen_phase

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "configs" / "prompts"
SHAPE = (4, 8, 8)




@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_run")
    return {pred: build_tiny_sd(root / pred, prediction_type=pred, sample_size=8)
            for pred in ("epsilon", "v_prediction")}


def sd_config(tmp_path: Path, pretrained, **sections) -> Path:
    """configs/sd15_tiny.json with absolute prompt paths, a tmp run root and `sections` merged in."""
    cfg = json.loads((ROOT / "configs" / "sd15_tiny.json").read_text())
    for k in ("remain_file", "forget_file", "val_file"):
        cfg["prompts"][k] = str(ROOT / cfg["prompts"][k])
    cfg["model"]["pretrained"] = str(pretrained)
    cfg["run"]["root"] = str(tmp_path / "runs")
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    path = tmp_path / f"sd_{len(list(tmp_path.glob('sd_*.json')))}.json"
    path.write_text(json.dumps(cfg))
    return path


def _parts(tmp_path, pretrained, **sections):
    cfg = load_config(sd_config(tmp_path, pretrained, **sections))
    return cfg, build_sd_parts(cfg)


def _draws(task, cfg, seed, phase, n=3):
    rng = torch.Generator().manual_seed(seed)
    s = cfg.sfd
    return draw_phase(task, rng, n, n, SHAPE, s.t_min, s.t_max, 1.0, 0.5, "cpu", phase)


# -- equivalences ---------------------------------------------------------------------------------

def test_cached_and_uncached_text_conditioning_give_the_same_losses(tmp_path, sd_dirs):
    cfg, parts = _parts(tmp_path, sd_dirs["epsilon"])
    comps = parts.extra_state["components"]
    ref_task = make_task(cfg, TextEncoderCache(comps.text_encoder, comps.tokenizer, "cpu"), use_cache=False)
    for phase in ("fake_score", "generator"):
        d_fast, d_ref = _draws(parts.task, cfg, 7, phase), _draws(ref_task, cfg, 7, phase)
        assert parts.task.last_prompts == ref_task.last_prompts  # same RNG use, same table
        torch.testing.assert_close(d_fast.z, d_ref.z, rtol=0, atol=0)
        for f in ("generator_cond", "fake_cond", "teacher_cond", "fake_uncond", "teacher_uncond"):
            # batched vs per-role text-encoder calls: float32 rounding only
            torch.testing.assert_close(getattr(d_fast.cond, f), getattr(d_ref.cond, f), rtol=1e-5, atol=1e-5)
        if phase == "fake_score":
            a, _ = fake_phase(parts.generator, parts.fake_score, parts.teacher.schedule, d_fast, 4.5, 3)
            b, _ = fake_phase(parts.generator, parts.fake_score, parts.teacher.schedule, d_ref, 4.5, 3)
        else:
            args = (parts.teacher.schedule,)
            a, _ = gen_phase(parts.generator, parts.fake_score, parts.teacher, *args, d_fast, 1.0, 4.5, 4.5, 3)
            b, _ = gen_phase(parts.generator, parts.fake_score, parts.teacher, *args, d_ref, 1.0, 4.5, 4.5, 3)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_each_distinct_prompt_is_encoded_once_per_draw(tmp_path, sd_dirs):
    cfg, parts = _parts(tmp_path, sd_dirs["epsilon"])
    cache, task = parts.extra_state["text_cache"], parts.task
    rng = torch.Generator().manual_seed(0)
    task.draw(4, 4, rng, "cpu", "generator")  # warm: forget/override/""/grid were pinned at build
    before = cache.encoded_rows
    task.draw(4, 4, rng, "cpu", "generator")
    remain = set(task.last_prompts["generator"][:4])
    # the remain captions once each (shared by G, fake score and teacher); pinned prompts: never
    assert cache.encoded_rows - before == len(remain)


def test_cfg_batched_equals_two_separate_calls(tmp_path, sd_dirs):
    _, parts = _parts(tmp_path, sd_dirs["epsilon"])
    d = _draws(parts.task, load_config(sd_config(tmp_path, sd_dirs["epsilon"])), 3, "generator")
    den, c = parts.teacher, d.cond
    x_t = den.schedule.add_noise(torch.randn(6, *SHAPE), d.noise, d.t)
    with torch.no_grad():
        batched = den.output(x_t, d.t, c.teacher_cond, c.teacher_uncond, 4.5)
        e_c = den.forward_raw(x_t, d.t, c.teacher_cond).float()
        e_u = den.forward_raw(x_t, d.t, c.teacher_uncond).float()
    # one 2B UNet call vs two B calls: kernel rounding only (float32)
    torch.testing.assert_close(batched, e_u + 4.5 * (e_c - e_u), rtol=1e-4, atol=1e-4)


def _slice(d: PhaseDraws, sl) -> PhaseDraws:
    c = d.cond
    cut = lambda x: None if x is None else x[sl]  # noqa: E731
    cond = PhaseConditions(c.generator_cond[sl], c.fake_cond[sl], c.teacher_cond[sl], cut(c.fake_uncond),
                           cut(c.teacher_uncond), c.is_forget[sl])
    return PhaseDraws(d.z[sl], d.noise[sl], d.t[sl], cond, d.coef[sl])


def test_remain_and_forget_batched_equals_separate_passes(tmp_path, sd_dirs):
    cfg, parts = _parts(tmp_path, sd_dirs["epsilon"])
    sch, n = parts.teacher.schedule, 3
    for phase in ("fake_score", "generator"):
        d = _draws(parts.task, cfg, 11, phase, n)
        parts_ = [d, _slice(d, slice(0, n)), _slice(d, slice(n, 2 * n))]
        losses, grads = [], []
        for dd in parts_:
            net = parts.fake_score if phase == "fake_score" else parts.generator
            net.zero_grad(set_to_none=True)
            if phase == "fake_score":
                loss, _ = fake_phase(parts.generator, parts.fake_score, sch, dd, 4.5, n)
            else:
                loss, _ = gen_phase(parts.generator, parts.fake_score, parts.teacher, sch, dd, 1.0, 4.5, 4.5, n)
            loss.backward()
            losses.append(loss.detach())
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
        # reference: coef_r * L_remain + coef_f * L_forget in two passes (coef per row, same denominator)
        torch.testing.assert_close(losses[0], losses[1] + losses[2], rtol=1e-4, atol=1e-4)
        # summation order differs (one 2n batch vs two n batches): float32 rounding relative to |g|max
        scale = grads[0].abs().max().item()
        torch.testing.assert_close(grads[0], grads[1] + grads[2], rtol=1e-3, atol=1e-4 * scale)
        parts.fake_score.zero_grad(set_to_none=True)
        parts.generator.zero_grad(set_to_none=True)


# -- the conditioning table (spec §1b) ----------------------------------------------------------------

class _NoCache:
    def pin(self, prompts):
        pass


def _task(neg=True, **kw):
    forget = ForgetPromptSet(["a photo of Brad Pitt", "Brad Pitt smiling"], "brad pitt", "a middle aged man",
                             neg_prompts=["ugly, blurry"] if neg else None)
    remain = RemainPromptSet([f"remain {i}" for i in range(50)])
    kw.setdefault("guidance", (4.5, 4.5, 4.5))
    return TextForgetTask(_NoCache(), remain, forget, **kw)


def _table(task, phase, n=16, seed=0):
    return task.draw_prompts(n, n, torch.Generator().manual_seed(seed), phase)


def test_table_teacher_gets_override_on_forget_rows():
    t = _table(_task(context_dropout=0.0), "generator")
    n = 16
    assert t["generator"][:n] == t["fake"][:n] == t["teacher"][:n]
    assert all(p.startswith("remain") for p in t["teacher"][:n])
    assert all("Brad Pitt" in p for p in t["generator"][n:]) and t["fake"][n:] == t["generator"][n:]
    assert all(o == f.replace("Brad Pitt", "a middle aged man") for f, o in zip(t["generator"][n:], t["teacher"][n:]))
    assert t["is_forget"] == [False] * n + [True] * n


@pytest.mark.parametrize("phase", ["fake_score", "generator"])
def test_table_sg_w_override(phase):
    t = _table(_task(sg_w_override=True, context_dropout=0.0), phase)
    assert t["fake"][16:] == t["teacher"][16:]  # override on the fake score's forget rows
    assert all("Brad Pitt" in p for p in t["generator"][16:])  # G still samples the forget prompt


def test_table_use_neg_and_sid_w_neg():
    task = _task(use_neg=(True, False, True), context_dropout=0.0)
    f, g = _table(task, "fake_score"), _table(task, "generator")
    assert f["fake_uncond"] == [""] * 16 + ["ugly, blurry"] * 16       # kappa1 uses negatives
    assert g["fake_uncond"] == [""] * 32                                # kappa2 does not
    assert g["teacher_uncond"] == [""] * 16 + ["ugly, blurry"] * 16    # kappa4 does
    w = _table(_task(use_neg=(False, False, True), sid_w_neg=True, context_dropout=0.0), "generator")
    assert w["teacher_uncond"] == ["ugly, blurry"] * 32 and w["fake_uncond"] == [""] * 32
    no_neg = _table(_task(neg=False, use_neg=(True, True, True), context_dropout=0.0), "generator")
    assert no_neg["teacher_uncond"] == [""] * 32                        # no negatives: no effect
    with pytest.raises(ValueError, match="sid_w_neg needs negative prompts"):
        _task(neg=False, sid_w_neg=True)


def test_table_dropout_only_in_fake_phase_and_only_with_guidance():
    task = _task(use_neg=(True, True, True), sid_w_neg=True, context_dropout=0.5)
    f = _table(task, "fake_score", n=64)
    dropped = [i for i, p in enumerate(f["fake"]) if p == ""]
    assert 20 < len(dropped) < 108
    for i in dropped:  # G's prompt and the uncond row go with it
        assert f["generator"][i] == "" and f["fake_uncond"][i] == ""
    assert "" not in f["teacher"]
    g = _table(task, "generator", n=64)
    assert "" not in g["fake"] and "" not in g["generator"]
    off = _task(context_dropout=0.5, guidance=(1.0, 1.0, 4.5))
    f1 = _table(off, "fake_score", n=64)
    assert "" not in f1["fake"] and f1["fake_uncond"] is None           # kappa1 = 1: no uncond needed
    assert _table(off, "generator")["teacher_uncond"] is not None


# -- training ------------------------------------------------------------------------------------

def test_v_prediction_trains(tmp_path, sd_dirs):
    cfg, parts = _parts(tmp_path, sd_dirs["v_prediction"])
    assert parts.teacher.schedule.prediction == "v_prediction"
    run = tmp_path / "v"
    run.mkdir()
    tr = SFDTrainer(cfg, parts, run, torch.device("cpu"))
    before = copy.deepcopy(tr.generator.net.state_dict())
    for _ in range(2):
        tr.train_step()
    assert torch.isfinite(tr.stats).all() and tr.skipped.tolist() == [0.0, 0.0]
    assert tr.stats[0, 0, 1] > 0 and tr.stats[1, 1, 1] > 0  # remain and forget rows counted (STAT_N)
    assert any(not torch.equal(v, before[k]) for k, v in tr.generator.net.state_dict().items())


def test_activation_checkpointing_gives_the_same_step(tmp_path, sd_dirs):
    """diffusers gradient checkpointing on all three UNets: the same losses and updated weights as
    without (the fake score inside the generator loss then runs with requires_grad off instead of
    FrozenView, whose detached weights the backward recomputation would not see)."""
    results = []
    for ckpt in (False, True):
        cfg, parts = _parts(tmp_path, sd_dirs["epsilon"], engine={"activation_checkpointing": ckpt})
        (tmp_path / f"ck{ckpt}").mkdir()
        torch.manual_seed(0)
        tr = SFDTrainer(cfg, parts, tmp_path / f"ck{ckpt}", torch.device("cpu"))
        assert tr.generator.net.is_gradient_checkpointing == ckpt
        tr.train_step()
        results.append((tr.stats.clone(), {k: v.clone() for k, v in tr.generator.net.state_dict().items()},
                        {k: v.clone() for k, v in tr.fake_score.net.state_dict().items()}))
        assert all(p.requires_grad for p in tr.fake_score.parameters())  # restored after the phase
    (s0, g0, f0), (s1, g1, f1) = results
    # recomputation replays the same fp32 ops; allow for reduction-order differences only
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-6)
    for a, b in ((g0, g1), (f0, f1)):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def _perturbed_unet(sd_dir, scale=0.01):
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(str(sd_dir), subfolder="unet", local_files_only=True)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(scale)
    return unet


def _assert_generator_is(parts, unet):
    gen, ref = parts.generator.net.state_dict(), unet.state_dict()
    assert all(torch.equal(gen[k], ref[k].to(gen[k].dtype)) for k in ref)
    teacher, fake = parts.teacher.net.state_dict(), parts.fake_score.net.state_dict()
    assert all(torch.equal(fake[k], teacher[k]) for k in teacher)  # fake score starts at the teacher
    assert not any(torch.equal(gen[k], teacher[k]) for k in list(teacher)[:3])
    assert all(p.requires_grad for p in parts.generator.parameters())
    assert not any(p.requires_grad for p in parts.teacher.parameters())


def test_two_stage_init_from_safetensors_and_diffusers_folder(tmp_path, sd_dirs):
    from safetensors.torch import save_file
    unet = _perturbed_unet(sd_dirs["epsilon"])
    f = tmp_path / "g.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(f))
    _, parts = _parts(tmp_path, sd_dirs["epsilon"], model={"generator_init": str(f)})
    _assert_generator_is(parts, unet)
    unet.save_pretrained(str(tmp_path / "g_unet"))
    _, parts = _parts(tmp_path, sd_dirs["epsilon"], model={"generator_init": str(tmp_path / "g_unet")})
    _assert_generator_is(parts, unet)


def test_pickle_init_needs_trust_pickle(tmp_path, sd_dirs):
    unet = _perturbed_unet(sd_dirs["epsilon"], 0.02)
    pkl = tmp_path / "sid_lsg.pkl"
    with open(pkl, "wb") as fh:
        pickle.dump({"ema": unet}, fh)
    with pytest.raises(ConfigError, match="model.generator_init.*pickle.*trust_pickle"):
        load_config(sd_config(tmp_path, sd_dirs["epsilon"], model={"generator_init": str(pkl)}))
    cfg = load_config(sd_config(tmp_path, sd_dirs["epsilon"]))
    cfg.model.generator_init = str(pkl)  # past config validation: the builder refuses too
    with pytest.raises(ValueError, match="trust_pickle"):
        build_sd_parts(cfg)
    _, parts = _parts(tmp_path, sd_dirs["epsilon"], model={"generator_init": str(pkl), "trust_pickle": True})
    _assert_generator_is(parts, unet)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The shipped configs/sd15_tiny.json end to end; model.pretrained 'tiny:DIR' builds DIR itself."""
    root = tmp_path_factory.mktemp("tiny_run")
    run_dir = root / "run"
    import os
    cwd = os.getcwd()
    os.chdir(ROOT)  # the config's prompt paths are relative to the repository root
    try:
        out = train.main(["--config", str(ROOT / "configs" / "sd15_tiny.json"), "--run-dir", str(run_dir),
                          "--set", f"model.pretrained=tiny:{root / 'tiny_sd'}", "train.total_steps=2",
                          "train.log_every=1", "train.checkpoint_every=2", "train.sample_every=2"])
    finally:
        os.chdir(cwd)
    return Path(out["run_dir"])


def test_end_to_end_run_leaves_checkpoint_and_grids(tiny_run):
    ck = tiny_run / "checkpoints" / "step-00000002"
    assert (ck / "generator.safetensors").is_file() and (ck / "fake_score.safetensors").is_file()
    assert (tiny_run / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    stats = [json.loads(line) for line in (tiny_run / "stats.jsonl").read_text().splitlines()]
    assert len(stats) == 2 and all(s["fake_score_loss/forget"] == s["fake_score_loss/forget"] for s in stats)
    for step in (0, 2):
        png = tiny_run / "samples" / f"step-{step:08d}.png"
        rows = (png.with_suffix(".txt")).read_text().splitlines()
        assert len(rows) == 14 and "Angelina Jolie" in rows[0]  # 8 forget + 6 validation prompts
        assert Image.open(png).size == (2 * 64, 14 * 64)


def test_export_round_trip_matches_engine_one_step(tiny_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sfd_fast.cli import main as cli_main
    from sfd_fast.sd.build import load_run_generator
    from sfd_fast.sd.sampling import decode_latents

    out = tmp_path / "export"
    cli_main(["export", "--run", str(tiny_run), "--out", str(out)])
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert "timesteps=[625]" in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".export.tmp-*"))
    with pytest.raises(SystemExit, match="not empty; pass --force"):
        cli_main(["export", "--run", str(tiny_run), "--out", str(out)])
    cli_main(["export", "--run", str(tiny_run), "--out", str(out), "--force"])

    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    _, comps, gen, _ = load_run_generator(tiny_run, torch.device("cpu"))
    prompts = ["a photo of Angelina Jolie", "a red apple on a wooden table"]
    z = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    b = float((1 - pipe.scheduler.alphas_cumprod[625]) ** 0.5)
    kw = dict(timesteps=[625], guidance_scale=1.0, latents=b * z, height=64, width=64)
    lat = pipe(prompts, output_type="latent", **kw).images
    img = pipe(prompts, output_type="pt", **kw).images
    cache = TextEncoderCache(comps.text_encoder, comps.tokenizer, "cpu")
    x0 = sample_latents(gen, z, cache.encode(prompts))
    mine = (decode_latents(comps.vae, x0, comps.vae_scaling_factor) / 2 + 0.5).clamp(0, 1)
    # same fp32 math; diffusers adds 1e-10 * noise in DDPM's last step and builds alphas in float32
    torch.testing.assert_close(lat, x0, rtol=0, atol=1e-4)
    torch.testing.assert_close(img, mine, rtol=0, atol=1e-4)


def test_sample_cli_writes_grid(tiny_run, tmp_path):
    from sfd_fast.cli import main as cli_main
    out = tmp_path / "g.png"
    cli_main(["sample", "--run", str(tiny_run), "--prompt", "a photo of Angelina Jolie", "--prompt", "a cat",
              "--n", "3", "--out", str(out), "--steps", "2", "--seed", "5", "--device", "cpu",
              "--out-dir", str(tmp_path / "imgs")])
    assert Image.open(out).size == (3 * 64, 2 * 64)
    assert sorted(p.name for p in (tmp_path / "imgs" / "a cat").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert (tmp_path / "imgs" / "a photo of Angelina Jolie" / "00002.png").is_file()


# -- bad inputs -----------------------------------------------------------------------------------

def _bad(tmp_path, sd_dir, match, **sections):
    with pytest.raises(ConfigError, match=match):
        load_config(sd_config(tmp_path, sd_dir, **sections))


def test_bad_inputs_are_refused_before_training(tmp_path, sd_dirs):
    good = sd_dirs["epsilon"]
    _bad(tmp_path, "", r"model.pretrained' is empty", )
    partial = tmp_path / "partial"
    (partial / "unet").mkdir(parents=True)
    _bad(tmp_path, partial, r"model.pretrained.*not a diffusers Stable Diffusion folder.*lacks model_index.json")
    _bad(tmp_path, tmp_path / "nope" / "sd", r"model.pretrained.*does not exist")
    _bad(tmp_path, good, r"missing prompt file.*forget prompts file .*nope.txt",
         prompts={"forget_file": str(tmp_path / "nope.txt")})
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    _bad(tmp_path, good, r"forget prompts file .*empty.txt.* is empty", prompts={"forget_file": str(empty)})
    _bad(tmp_path, good, r"remain_file.*is empty", prompts={"remain_file": str(empty)})
    _bad(tmp_path, good, r"concept_to_forget.*occurs in none", prompts={"concept_to_forget": "brad pitt"})
    _bad(tmp_path, good, r"sid_w_neg.*neg_file", prompts={"sid_w_neg": True})
    _bad(tmp_path, good, r"use_neg", prompts={"use_neg": [True, False]})
    _bad(tmp_path, good, r"context_dropout", prompts={"context_dropout": 1.5})


def test_long_prompt_warns_before_training(tmp_path, sd_dirs):
    f = tmp_path / "long.txt"
    f.write_text("a photo of angelina jolie " + "cat " * 120 + "\n")
    with pytest.warns(UserWarning, match="truncated to 77"):
        _parts(tmp_path, sd_dirs["epsilon"], prompts={"forget_file": str(f)})


def test_grid_is_deterministic_and_uses_grid_prompts(tmp_path, sd_dirs):
    _, parts = _parts(tmp_path, sd_dirs["epsilon"], prompts={"grid_prompts": ["a cat", "a photo of Angelina Jolie"],
                                                             "grid_per_prompt": 3})
    a, b = parts.save_grid(parts.generator, tmp_path / "a.png"), parts.save_grid(parts.generator, tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()  # fixed latents (seed 2024)
    assert Image.open(a).size == (3 * 64, 2 * 64)
    assert a.with_suffix(".txt").read_text() == "row 0: a cat\nrow 1: a photo of Angelina Jolie\n"


def test_prompt_picks_use_a_host_generator_on_accelerators():
    """On a non-CPU trainer generator, string choices come from the task's own CPU generator (no
    device->host sync); its state round-trips for exact resume. Simulated with a fake device rng."""
    task = _task()

    class FakeDeviceGen:
        device = torch.device("meta")

    a = task.draw_prompts(3, 2, FakeDeviceGen(), "fake_score")
    state = task.rng_state()
    b = task.draw_prompts(3, 2, FakeDeviceGen(), "fake_score")
    task.set_rng_state(state)
    assert task.draw_prompts(3, 2, FakeDeviceGen(), "fake_score") == b
    assert len(a["generator"]) == 5
