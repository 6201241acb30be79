"""Stable Diffusion components: tiny pipeline, loader, closed-form x0, text cache, prompt sets.

CPU only, no downloads: the pipeline is a tiny random one written by `build_tiny_sd`.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from sfd_fast.sd.text import TextEncoderCache
from sfd_fast.sd.prompts import ForgetPromptSet, RemainPromptSet, read_prompt_file
from sfd_fast.sd.loading import load_stable_diffusion, sd_denoiser
from sfd_fast.sd.tiny import build_tiny_sd

PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "prompts"


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sd")
    return {pred: build_tiny_sd(root / pred, prediction_type=pred) for pred in ("epsilon", "v_prediction")}


@pytest.fixture(scope="module")
def comps(sd_dirs):
    return load_stable_diffusion(str(sd_dirs["epsilon"]))


# -- tiny pipeline / loader ----------------------------------------------------------------------

def test_tiny_pipeline_loads_in_diffusers_and_runs(sd_dirs):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dirs["epsilon"]), local_files_only=True)
    assert pipe.safety_checker is None
    out = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 128, 128, 3)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_load_components(sd_dirs, pred):
    c = load_stable_diffusion(str(sd_dirs[pred]))
    assert c.prediction == pred and c.schedule.num_timesteps == 1000
    assert c.vae_scaling_factor == pytest.approx(0.18215) and c.vae_scale_factor == 8
    assert c.latent_channels == 4 and c.latent_size == 16 and c.text_dim == 32
    for m in (c.text_encoder, c.vae, c.unet):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert c.tokenizer.model_max_length == 77


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_x0_matches_diffusers_step(sd_dirs, pred):
    from diffusers import DDIMScheduler, DDPMScheduler

    c = load_stable_diffusion(str(sd_dirs[pred]))
    den = sd_denoiser(c.unet, c.schedule)
    g = torch.Generator().manual_seed(1)
    ts = [0, 20, 250, 625, 980, 999]
    x = torch.randn(len(ts), 4, 16, 16, generator=g)
    cond = torch.randn(len(ts), 77, 32, generator=g)
    t = torch.tensor(ts)
    with torch.no_grad():
        x0 = den.x0(x, t, cond)
        raw = c.unet(x, t, encoder_hidden_states=cond).sample
    classes = [DDPMScheduler] + ([DDIMScheduler] if pred == "v_prediction" else [])
    for cls in classes:
        sch = cls.from_pretrained(str(sd_dirs[pred]), subfolder="scheduler")
        if cls is DDIMScheduler:
            sch.set_timesteps(50)
        for i, ti in enumerate(ts):
            ref = sch.step(raw[i:i + 1], ti, x[i:i + 1], generator=torch.Generator().manual_seed(0)).pred_original_sample
            # diffusers builds alphas_cumprod in float32, the schedule in float64 then rounds; at
            # t = 999 (a_t = 0.068) the eps division amplifies rounding by ~15x.
            torch.testing.assert_close(x0[i:i + 1], ref, rtol=1e-4, atol=1e-4)


def test_bad_pretrained_paths(tmp_path, sd_dirs):
    with pytest.raises(FileNotFoundError, match="neither an existing local folder"):
        load_stable_diffusion(str(tmp_path / "does" / "not" / "exist"))
    with pytest.raises(FileNotFoundError, match="neither an existing local folder"):
        load_stable_diffusion("./no_such_model")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text("{}")
    shutil.copytree(sd_dirs["epsilon"] / "unet", partial / "unet")
    with pytest.raises(FileNotFoundError, match=r"missing text_encoder, tokenizer, vae, scheduler") as e:
        load_stable_diffusion(str(partial))
    assert str(partial) in str(e.value)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load_stable_diffusion(str(f))


@pytest.mark.parametrize("key", ["clip_sample", "thresholding"])
def test_clamping_scheduler_refused(tmp_path, sd_dirs, key):
    d = tmp_path / "sd"
    shutil.copytree(sd_dirs["epsilon"], d)
    cfg_file = d / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[key] = True
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"{key}=true.*closed form"):
        load_stable_diffusion(str(d))


def test_tiny_sd_cli(tmp_path):
    from sfd_fast.sd.tiny import main

    main([str(tmp_path / "cli"), "--prediction", "v_prediction"])
    cfg = json.loads((tmp_path / "cli" / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["prediction_type"] == "v_prediction" and cfg["beta_schedule"] == "scaled_linear"
    assert cfg["clip_sample"] is False and (tmp_path / "cli" / "model_index.json").is_file()


# -- text cache ---------------------------------------------------------------------------------

def _count_rows(text_encoder):
    rows = []
    h = text_encoder.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    return rows, h


def test_text_cache_matches_uncached_and_encodes_once(comps):
    cache = TextEncoderCache(comps.text_encoder, comps.tokenizer, "cpu")
    rows, h = _count_rows(comps.text_encoder)
    try:
        prompts = ["", "a photo of Brad Pitt", "", "a red apple on a wooden table", "a photo of Brad Pitt"]
        emb = cache.encode(prompts)
        assert emb.shape == (5, 77, 32)
        assert sum(rows) == 3  # distinct prompts only
        emb2 = cache.encode(["", "a photo of Brad Pitt"])
        assert sum(rows) == 3  # all cached: no encoder call
        assert torch.equal(emb2[0], emb[0]) and torch.equal(emb2[1], emb[1])
        ref = cache.encode_uncached(prompts)
        torch.testing.assert_close(emb, ref, rtol=0, atol=1e-6)
        # remain prompts with cache=False: encoded every call, but "" stays cached
        n = sum(rows)
        cache.encode(["a cat on a sofa", ""], cache=False)
        cache.encode(["a cat on a sofa", ""], cache=False)
        assert sum(rows) - n == 2 and cache.encoded_rows == sum(rows)
        # the returned tensor does not alias the cache
        emb2.zero_()
        assert torch.equal(cache.encode([""])[0], emb[0])
    finally:
        h.remove()


def test_text_cache_lru_and_pin(comps):
    cache = TextEncoderCache(comps.text_encoder, comps.tokenizer, "cpu", max_entries=2)
    cache.pin(["a photo of a dog"])
    cache.encode(["p one", "p two", "p three"])
    assert len(cache) == 3  # pinned + 2 LRU entries
    rows, h = _count_rows(comps.text_encoder)
    try:
        cache.encode(["a photo of a dog", "p three"])
        assert sum(rows) == 0
        cache.encode(["p one"])
        assert sum(rows) == 1  # evicted
    finally:
        h.remove()


def test_long_prompt_truncates_with_one_warning(comps):
    cache = TextEncoderCache(comps.text_encoder, comps.tokenizer, "cpu")
    long_prompt = " ".join(["cat"] * 120)
    with pytest.warns(UserWarning, match="truncated to 77") as rec:
        a = cache.encode([long_prompt, long_prompt])
    assert len([w for w in rec if "truncated" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.encode_uncached([long_prompt])  # already warned for this prompt
        cache.encode(["a short prompt"])
    ids = cache.tokenizer([long_prompt], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77 and a.shape == (2, 77, 32)


# -- prompt files and sets ------------------------------------------------------------------------

def test_shipped_prompt_files():
    for name, n in [("angelina_jolie_train", 50), ("angelina_jolie_val", 6), ("brad_pitt_train", 50),
                    ("brad_pitt_val", 6)]:
        lines = read_prompt_file(PROMPTS / f"{name}.txt", name)
        assert len(lines) == n
        concept = "angelina jolie" if "angelina" in name else "brad pitt"
        assert all(concept in ln.lower() for ln in lines)
    remain = read_prompt_file(PROMPTS / "remain_default.txt", "remain prompts")
    assert len(remain) >= 190 and not any("pitt" in r.lower() or "jolie" in r.lower() for r in remain)


def test_shipped_prompts_fit_tiny_tokenizer(comps):
    for f in sorted(PROMPTS.glob("*.txt")):
        for line in read_prompt_file(f, f.name):
            ids = comps.tokenizer(line).input_ids
            assert len(ids) <= 77
            assert comps.tokenizer.unk_token_id not in ids[1:-1], line


def test_read_prompt_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="forget prompts file .*nope.txt"):
        read_prompt_file(tmp_path / "nope.txt", "forget prompts")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="negative prompts file .*empty.txt.* is empty"):
        read_prompt_file(empty, "negative prompts")


def test_forget_substitution_case_insensitive():
    fs = ForgetPromptSet(["a photo of Brad Pitt", "BRAD PITT smiling", "brad pitt's face, brad Pitt"],
                         "brad pitt", "a middle aged man")
    assert [o for _, o in fs.pairs] == ["a photo of a middle aged man", "a middle aged man smiling",
                                        "a middle aged man's face, a middle aged man"]
    f, o, neg = fs.sample(64, torch.Generator().manual_seed(0))
    assert neg is None and len(f) == len(o) == 64
    assert all(dict(fs.pairs)[a] == b for a, b in zip(f, o))
    assert len(set(f)) == 3
    # regex metacharacters in the concept / backslashes in the override are literal
    fs2 = ForgetPromptSet(["photo of c++ (lang)"], "c++ (lang)", r"a \1 language")
    assert fs2.pairs[0][1] == r"photo of a \1 language"


def test_forget_concept_not_found_and_missing_override():
    with pytest.raises(ValueError, match="occurs in none"):
        ForgetPromptSet(["a photo of a dog"], "brad pitt", "a man")
    with pytest.raises(ValueError, match="concept_to_override is required"):
        ForgetPromptSet(["a photo of brad pitt"], "brad pitt", None)


def test_forget_product_with_override_file(tmp_path):
    (tmp_path / "f.txt").write_text("a photo of X\nX smiling\n")
    (tmp_path / "o.txt").write_text("a man\na woman\na child\n")
    fs = ForgetPromptSet.from_files(tmp_path / "f.txt", "nothing-to-match", None, override_path=tmp_path / "o.txt")
    assert len(fs) == 6 and set(fs.pairs) == {(f, o) for f in ["a photo of X", "X smiling"]
                                              for o in ["a man", "a woman", "a child"]}
    f, o, _ = fs.sample(600, torch.Generator().manual_seed(0))
    assert len(set(zip(f, o))) == 6


def test_pos_keywords_forget_only_and_negatives():
    fs = ForgetPromptSet(["a photo of a person"], "", "", pos_keywords=["kwA", "kwB"],
                         neg_prompts=["neg one", "neg two", "neg three"])
    f, o, neg = fs.sample(400, torch.Generator().manual_seed(0))
    front = sum(p.startswith(("kwA ", "kwB ")) for p in f)
    back = sum(p.endswith((", kwA", ", kwB")) for p in f)
    assert front + back == 400 and 140 < front < 260  # p = 0.5, 6 sigma = 60
    assert {p.split()[0] for p in f if p.startswith("kw")} == {"kwA", "kwB"}
    assert set(o) == {"a photo of a person"}  # override untouched
    assert set(neg) == {"neg one", "neg two", "neg three"}
    # reproducible from the generator
    assert fs.sample(400, torch.Generator().manual_seed(0)) == (f, o, neg)


def test_context_dropout_rate():
    """The production dropout (TextForgetTask, fake-score phase, guidance != 1) drops ~10% of rows,
    and a dropped row is "" for the generator, the fake score and its uncond alike."""
    from sfd_fast.sd.text import TextForgetTask
    remain = RemainPromptSet([f"p{i}" for i in range(50)])
    forget = ForgetPromptSet(["a photo of brad pitt"], "brad pitt", "a man")
    task = TextForgetTask(None, remain, forget, context_dropout=0.1, guidance=(4.5, 1.0, 1.0), use_cache=False)
    out = task.draw_prompts(10000, 10000, torch.Generator().manual_seed(0), "fake_score")
    dropped = [g == "" for g in out["generator"]]
    rate = sum(dropped) / len(dropped)
    # binomial std = sqrt(0.1 * 0.9 / 20000) = 0.0021; tolerance 0.01 is ~4.7 std
    assert abs(rate - 0.1) < 0.01
    assert all((f == "") == d for f, d in zip(out["fake"], dropped))
    assert all(t != "" for t in out["teacher"])  # the teacher is never dropped
    # no dropout in the generator phase, nor when the fake score is never guided
    assert "" not in task.draw_prompts(200, 200, torch.Generator().manual_seed(1), "generator")["generator"]
    unguided = TextForgetTask(None, remain, forget, context_dropout=0.1, use_cache=False)
    assert "" not in unguided.draw_prompts(200, 200, torch.Generator().manual_seed(1), "fake_score")["generator"]


def test_remain_set_and_grid():
    rs = RemainPromptSet.from_path(PROMPTS / "remain_default.txt")
    s = rs.sample(32, torch.Generator().manual_seed(0))
    assert len(s) == 32 and all(p in rs.prompts for p in s)
    fs = ForgetPromptSet.from_files(PROMPTS / "brad_pitt_train.txt", "brad pitt", "a middle aged man",
                                    val_path=PROMPTS / "brad_pitt_val.txt")
    grid = fs.grid_prompts()
    assert len(grid) == 14 and grid[8:] == fs.val_prompts
    assert "" in fs.all_prompts() and "a portrait photo of a middle aged man" in fs.all_prompts()
