"""`sfd-fast report` and the evaluations it shows (issue #13): a digits run with evaluation during
training (resumed, so some steps are logged twice), and a tiny Stable Diffusion run with two concepts
and the CLIP evaluation (a tiny random CLIP saved in the test)."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import torch

from sfd_fast import cli, train
from sfd_fast.config import ConfigError, load_config
from sfd_fast.evaluation.report import read_stats, render_report

from .helpers import tiny_digits_config

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "configs" / "prompts"
SECTIONS = ("losses", "throughput", "evaluation", "samples", "final-eval", "config")


def _section(page: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, flags=re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


def _assert_self_contained_with_every_section(page: str, plotted=SECTIONS[:4]):
    for sid in SECTIONS:
        _section(page, sid)
    for sid in plotted:  # a real embedded PNG in each plot / grid section
        imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', _section(page, sid))
        assert imgs and base64.b64decode(imgs[0])[:8] == b"\x89PNG\r\n\x1a\n", sid
    assert not re.search(r'(src|href)="(https?:)?//', page)   # nothing fetched from the network


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Two forgotten digits, eval every 2 steps, stopped at step 4 and resumed to 6 (steps 4 logged twice)."""
    tmp = tmp_path_factory.mktemp("digits_report")
    cfg = tiny_digits_config(tmp, sfd={"forget_classes": [0, 7], "override_classes": [1, 4]},
                             train={"total_steps": 6, "log_every": 2, "checkpoint_every": 2, "sample_every": 2},
                             pretrain={"classifier_epochs": 3},
                             eval={"enabled": True, "every": 2, "during_samples_per_class": 4,
                                   "samples_per_class": 4, "teacher_steps": 2})
    run = tmp / "run"
    train.main(["--config", str(cfg), "--run-dir", str(run), "--set", "train.total_steps=4"])
    train.main(["--resume", str(run), "--set", "train.total_steps=6"])
    return run


def test_eval_during_training_and_final_eval_per_target(digits_run):
    ticks, evals = read_stats(digits_run)
    assert [r["step"] for r in ticks] == [2, 4, 6]               # the duplicate step-4 record: the last kept
    assert [r["step"] for r in evals] == [0, 2, 4, 6]
    for r in evals:
        assert {"eval/ua/0", "eval/ua/7", "eval/retained_accuracy", "eval/fd"} <= set(r)
        assert all(0 <= r[k] <= 1 for k in ("eval/ua/0", "eval/ua/7", "eval/retained_accuracy"))
    ev = json.loads((digits_run / "eval.json").read_text())
    assert set(ev["ua_per_class"]) == {"0", "7"} and ev["ua"] == pytest.approx(sum(ev["ua_per_class"].values()) / 2)
    assert set(ev["retained_accuracy_per_class"]) == {"1", "2", "3", "4", "5", "6", "8", "9"}
    assert ev["fd_final"] > 0 and ev["fd_teacher"] > 0


def test_digits_report_has_every_section(digits_run, tmp_path, capsys):
    page = (digits_run / "report.html").read_text()   # written at the end of the run
    _assert_self_contained_with_every_section(page)
    assert "ua_per_class/7" in _section(page, "final-eval")
    assert "&quot;forget_classes&quot;: [" in _section(page, "config")
    out = tmp_path / "r.html"
    cli.main(["report", str(digits_run), "--out", str(out)])   # the CLI command, to another file
    assert out.is_file() and str(out) in capsys.readouterr().out


def test_report_of_a_run_stopped_early_and_a_torn_line(tmp_path):
    run = tmp_path / "stopped"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"run": {"name": "stopped"}}))
    (run / "stats.jsonl").write_text(json.dumps({"step": 2, "generator_loss/remain": 1.0, "samples_per_s": 5.0})
                                     + "\n" + '{"step": 4, "generator_lo')
    page = render_report(run)
    for sid in SECTIONS:
        _section(page, sid)
    assert "no eval.json" in _section(page, "final-eval") and "no sample grids" in _section(page, "samples")
    with pytest.raises(SystemExit, match="neither config.json nor stats.jsonl"):
        cli.main(["report", str(tmp_path / "nothing")])


def test_report_without_matplotlib_says_so(tmp_path, digits_run, monkeypatch):
    from sfd_fast.evaluation import report
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    page = render_report(digits_run)
    assert "matplotlib is not installed" in _section(page, "losses")
    _section(page, "samples")  # grids and tables still come


# -- Stable Diffusion: the CLIP evaluation and the report -----------------------------------------------

@pytest.fixture(scope="module")
def sd_and_clip(tmp_path_factory):
    """A tiny random pipeline, and a tiny random CLIP (transformers CLIPModel) saved with its tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from sfd_fast.sd.tiny import build_tiny_sd
    root = tmp_path_factory.mktemp("sd_clip")
    sd = build_tiny_sd(root / "sd", sample_size=8)
    tok = CLIPTokenizer.from_pretrained(str(Path(sd) / "tokenizer"))
    torch.manual_seed(0)
    config = CLIPConfig(text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32,
                                     "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "max_position_embeddings": 77},
                        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                                       "num_hidden_layers": 1, "num_attention_heads": 2},
                        projection_dim=8)
    clip = root / "clip"
    CLIPModel(config).save_pretrained(clip)
    tok.save_pretrained(clip)
    return sd, clip


def _sd_config(tmp_path, sd, **eval_keys) -> Path:
    cfg = json.loads((ROOT / "configs" / "sd15_tiny.json").read_text())
    cfg["prompts"].update(remain_file=str(PROMPTS / "remain_default.txt"), forget_file="", val_file="",
                          concept_to_forget="", concept_to_override="", concepts=[
                              {"concept_to_forget": c, "concept_to_override": o,
                               "forget_file": str(PROMPTS / f"{stem}_train.txt"),
                               "val_file": str(PROMPTS / f"{stem}_val.txt")}
                              for c, o, stem in (("angelina jolie", "a middle aged woman", "angelina_jolie"),
                                                 ("brad pitt", "a middle aged man", "brad_pitt"))])
    cfg["model"]["pretrained"] = str(sd)
    cfg["run"]["root"] = str(tmp_path / "runs")
    cfg["train"].update(total_steps=2, log_every=1, checkpoint_every=2, sample_every=1)
    cfg["eval"] = {"enabled": True, "clip_prompts": 2, "clip_images_per_prompt": 2, **eval_keys}
    path = tmp_path / f"sd_{len(list(tmp_path.glob('sd_*.json')))}.json"
    path.write_text(json.dumps(cfg))
    return path


def test_sd_run_with_clip_eval_and_report(tmp_path, sd_and_clip):
    sd, clip = sd_and_clip
    out = train.main(["--config", str(_sd_config(tmp_path, sd, clip_model=str(clip))), "--run-dir",
                      str(tmp_path / "run")])
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(ev["concept_share"]) == {"angelina jolie", "brad pitt"}
    for name, share in ev["concept_share"].items():
        assert share * 4 == round(share * 4) and ev["ua"][name] == 1 - share   # 2 prompts x 2 images
    assert 0 <= ev["val_clip_score"] <= 100 and ev["val_prompts"] == 2
    page = Path(out["report"]).read_text()
    _assert_self_contained_with_every_section(page, plotted=("losses", "throughput", "samples"))
    assert "concept_share/brad pitt" in _section(page, "final-eval")


def test_clip_share_and_score_against_a_plain_computation(sd_and_clip):
    """concept_share / clip_score equal the cosine comparison done by hand with the same CLIP."""
    from sfd_fast.sd.evaluate import ClipScorer, clip_score, concept_share
    scorer = ClipScorer(str(sd_and_clip[1]), "cpu")
    images = torch.rand(6, 3, 40, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    img = scorer.image_features(images)
    assert img.shape == (6, 8) and torch.allclose(img.norm(dim=1), torch.ones(6), atol=1e-5)  # fp32 rounding
    text = scorer.text_features(["angelina jolie", "a middle aged woman"])
    want = ((img @ text[0]) > (img @ text[1])).float().mean().item()
    assert concept_share(scorer, images, "angelina jolie|jolie", "a middle aged woman", [], []) == want
    prompts = [f"prompt {i}" for i in range(6)]
    cos = (img * scorer.text_features(prompts)).sum(1)
    assert clip_score(scorer, images, prompts) == pytest.approx(float(100 * cos.clamp(min=0).mean()), rel=1e-6)


def test_sd_without_clip_says_skipped_and_bad_clip_is_refused(tmp_path, sd_and_clip):
    sd, _ = sd_and_clip
    not_clip = tmp_path / "not_clip"
    not_clip.mkdir()
    with pytest.raises(ConfigError, match=r"eval.clip_model.*not a CLIP model folder"):
        load_config(_sd_config(tmp_path, sd, clip_model=str(not_clip)))
    (not_clip / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match=r"holds a 'bert' model"):
        load_config(_sd_config(tmp_path, sd, clip_model=str(not_clip)))
    with pytest.raises(ConfigError, match=r"eval.every' is set, but the stable_diffusion family"):
        load_config(_sd_config(tmp_path, sd, every=5))
    (not_clip / "config.json").write_text(json.dumps({"model_type": "clip"}))   # no weights: does not load
    with pytest.raises(SystemExit, match=r"eval.clip_model = .* does not load"):
        train.main(["--config", str(_sd_config(tmp_path, sd, clip_model=str(not_clip)))])
    assert not (tmp_path / "runs" / "sd15_tiny" / "checkpoints").exists()   # refused before training
    from sfd_fast.sd.evaluate import evaluate_run

    class _Trainer:
        step = 0
    cfg = load_config(_sd_config(tmp_path, sd))
    run = tmp_path / "skipped"
    run.mkdir()
    out = evaluate_run(cfg, type("P", (), {"extra_state": {}})(), _Trainer(), run)
    assert "skipped" in out["eval"] and "eval.clip_model" in json.loads((run / "eval.json").read_text())["skipped"]
