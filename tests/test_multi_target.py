"""Several forget targets in one run (issue #13): class-conditional (digits) and Stable Diffusion.

- a list of one replays today's single-target run bit for bit (same RNG consumption);
- all targets' rows ride in one batch, each with its own conditions per network;
- per-target statistics (device-side scatter) match a plain per-group reference;
- bad target lists are refused before anything is built.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sfd_fast import train
from sfd_fast.checkpoint import latest_checkpoint
from sfd_fast.conditions import ClassForgetTask, PhaseConditions
from sfd_fast.config import ConfigError, load_config
from sfd_fast.sd.prompts import ForgetPromptSet, RemainPromptSet
from sfd_fast.sd.text import TextForgetTask
from sfd_fast.step import STAT_N, STAT_NONFINITE, STAT_SUM, phase_stats, tick_losses

from .helpers import tiny_digits_config

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "configs" / "prompts"


# -- class-conditional ------------------------------------------------------------------------------

def _single_target_reference_draw(n_remain, n_forget, rng, forget, override):
    """Today's single-class draw written out plainly (the pre-#13 ClassForgetTask): remain classes
    r + (r >= forget) from one randint, forget rows all `forget`, teacher rows all `override`."""
    r = torch.randint(0, 9, (n_remain,), generator=rng)
    remain = r + (r >= forget).long()
    gen = torch.cat([remain, torch.full((n_forget,), forget)])
    teacher = torch.cat([remain, torch.full((n_forget,), override)])
    return gen, teacher


def test_class_list_of_one_draws_like_the_single_target_task():
    task = ClassForgetTask(10, [3], "fixed", [5])
    rng_a, rng_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(3):
        c = task.draw(7, 5, rng_a, "cpu", "generator")
        gen, teacher = _single_target_reference_draw(7, 5, rng_b, 3, 5)
        assert torch.equal(c.generator_cond, gen) and torch.equal(c.teacher_cond, teacher)
        assert c.target.tolist() == [-1] * 7 + [0] * 5
    assert torch.equal(rng_a.get_state(), rng_b.get_state())  # same RNG consumption


def test_two_classes_share_one_batch_with_their_own_overrides():
    task = ClassForgetTask(10, [0, 7], "fixed", [1, 4])
    c = task.draw(500, 6, torch.Generator().manual_seed(0), "cpu", "fake_score")
    remain, forget = c.generator_cond[:500], c.generator_cond[500:]
    assert not torch.isin(remain, torch.tensor([0, 7])).any()          # remain never draws a forgotten class
    assert set(remain.tolist()) == {1, 2, 3, 4, 5, 6, 8, 9}            # 500 draws over 8 classes: all appear
    assert forget.tolist() == [0, 7, 0, 7, 0, 7]                       # stratified: an exact half each
    assert c.teacher_cond[500:].tolist() == [1, 4, 1, 4, 1, 4]        # each target's own override
    assert torch.equal(c.fake_cond, c.generator_cond)
    assert c.target[500:].tolist() == [0, 1, 0, 1, 0, 1] and (c.target[:500] == -1).all()
    rnd = ClassForgetTask(10, [0, 7], "random").draw(4, 400, torch.Generator().manual_seed(0), "cpu", "generator")
    assert not torch.isin(rnd.teacher_cond, torch.tensor([0, 7])).any()  # random overrides are not forgotten


def test_phase_stats_scatter_matches_a_per_group_loop():
    per_row = torch.tensor([1.0, 2.0, float("nan"), 4.0, 8.0, 16.0, float("inf"), 32.0])
    target = torch.tensor([-1, -1, -1, 0, 1, 2, 2, 1])
    cond = PhaseConditions(None, None, None, None, None, target >= 0, target)
    got = phase_stats(per_row, cond, n_targets=3)
    for g in range(4):
        rows = per_row[target == g - 1]
        fin = rows[torch.isfinite(rows)]
        assert got[g, STAT_SUM].item() == fin.sum().item()
        assert got[g, STAT_N].item() == fin.numel()
        assert got[g, STAT_NONFINITE].item() == rows.numel() - fin.numel()
    rec = tick_losses([got.tolist(), got.tolist()], ["a", "b", "c"])
    assert rec["generator_loss/remain"] == 1.5 and rec["fake_score_loss/forget/b"] == 20.0
    assert rec["generator_loss/forget"] == (4 + 8 + 16 + 32) / 4 and rec["nonfinite_rows"] == 4
    one = tick_losses([got[:2].tolist()] * 2, ["only"])
    assert "generator_loss/forget/only" not in one  # one target: the stats.jsonl keys of before


def _weights(run_dir):
    ck = latest_checkpoint(run_dir)
    return {n: load_file(str(ck / f"{n}.safetensors")) for n in ("generator", "fake_score", "generator_ema")}


def test_digits_list_of_one_equals_single_target_run_step_for_step(tmp_path):
    cfg_path = tiny_digits_config(tmp_path, train={"total_steps": 3, "ema": {"halflife_kimg": 0.01}})
    single, listed = tmp_path / "single", tmp_path / "listed"
    train.main(["--config", str(cfg_path), "--run-dir", str(single)])
    train.main(["--config", str(cfg_path), "--run-dir", str(listed), "--set", "sfd.forget_classes=[0]",
                "sfd.override_classes=[1]", "sfd.forget_class=5", "sfd.override_class=6"])  # lists win
    a, b = _weights(single), _weights(listed)
    for role in a:
        assert all(torch.equal(a[role][k], b[role][k]) for k in a[role]), role


def test_digits_two_targets_log_per_target_losses(tmp_path):
    cfg_path = tiny_digits_config(tmp_path, sfd={"forget_classes": [0, 7], "override_classes": [1, 4]},
                                  train={"total_steps": 2, "log_every": 1})
    out = train.main(["--config", str(cfg_path)])
    recs = [json.loads(line) for line in (Path(out["run_dir"]) / "stats.jsonl").read_text().splitlines()]
    for rec in recs:
        for net in ("fake_score_loss", "generator_loss"):
            per = [rec[f"{net}/forget/0"], rec[f"{net}/forget/7"]]
            assert all(math.isfinite(v) for v in per)
            # 4 forget rows of each target per step (batch 8): the forget mean is the mean of the two
            assert rec[f"{net}/forget"] == pytest.approx(sum(per) / 2, rel=1e-6)  # float32 sums


@pytest.mark.parametrize("sfd, match", [
    ({"forget_classes": [0, 0], "override_classes": [1, 1]}, r"forget_classes' repeats class\(es\) \[0\]"),
    ({"forget_classes": [0, 7], "override_classes": [1, 7]}, r"override_classes' equals sfd.forget_classes entry \(7\)"),
    ({"forget_classes": [0, 7], "override_classes": [7, 1]}, r"overrides class 0 with 7, which is forgotten too"),
    ({"forget_classes": [0, 7], "override_classes": [1]}, r"one override class per forgotten class"),
    ({"forget_classes": [0, 12], "override_classes": [1, 2]}, r"classes in \[0, 10\)"),
])
def test_bad_class_targets_are_refused(tmp_path, sfd, match):
    with pytest.raises(ConfigError, match=match):
        load_config(tiny_digits_config(tmp_path, sfd=sfd))


# -- Stable Diffusion: prompt tables (no model needed) ----------------------------------------------

class _NoCache:
    def pin(self, prompts):
        pass


def _sets():
    jolie = ForgetPromptSet.from_files(PROMPTS / "angelina_jolie_train.txt", "angelina jolie", "a middle aged woman",
                                       val_path=PROMPTS / "angelina_jolie_val.txt")
    pitt = ForgetPromptSet.from_files(PROMPTS / "brad_pitt_train.txt", "brad pitt", "a middle aged man",
                                      val_path=PROMPTS / "brad_pitt_val.txt")
    return jolie, pitt


def _sd_task(sets, **kw):
    remain = RemainPromptSet([f"remain {i}" for i in range(50)])
    return TextForgetTask(_NoCache(), remain, sets, context_dropout=0.0, **kw)


def test_sd_list_of_one_draws_like_the_single_concept_task():
    jolie, _ = _sets()
    single, listed = _sd_task(jolie), _sd_task([jolie], target_names=["angelina jolie"])
    rng_a, rng_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for phase in ("fake_score", "generator"):
        assert single.draw_prompts(5, 5, rng_a, phase) == listed.draw_prompts(5, 5, rng_b, phase)
    assert torch.equal(rng_a.get_state(), rng_b.get_state())


def test_sd_two_concepts_in_one_batch_with_their_own_overrides():
    jolie, pitt = _sets()
    task = _sd_task([jolie, pitt], target_names=["angelina jolie", "brad pitt"])
    t = task.draw_prompts(4, 8, torch.Generator().manual_seed(0), "generator")
    forget_gen, forget_teacher, target = t["generator"][4:], t["teacher"][4:], t["target"][4:]
    assert target == [0, 1] * 4 and t["target"][:4] == [-1] * 4
    for g, tc, k in zip(forget_gen, forget_teacher, target):
        name, override = (("Angelina Jolie", "a middle aged woman") if k == 0 else ("Brad Pitt", "a middle aged man"))
        assert name.lower() in g.lower() and override in tc and name.lower() not in tc.lower()
    assert t["fake"][4:] == forget_gen          # fake score and generator: the forget prompt
    weighted = _sd_task([jolie, pitt], weights=[3.0, 1.0]).draw_prompts(0, 400, torch.Generator().manual_seed(0),
                                                                        "generator")
    share = weighted["target"].count(0) / 400
    # binomial(400, 0.75): sd 0.022; 5 sd = 0.11 (a seeded draw, so the margin only guards the mapping)
    assert abs(share - 0.75) < 0.11


# -- Stable Diffusion: config and a tiny run -----------------------------------------------------------

def _sd_cfg(tmp_path, sd_dir, **prompts) -> Path:
    cfg = json.loads((ROOT / "configs" / "sd15_tiny.json").read_text())
    for k in ("remain_file", "forget_file", "val_file"):
        cfg["prompts"][k] = str(ROOT / cfg["prompts"][k])
    cfg["prompts"].update(prompts)
    cfg["model"]["pretrained"] = str(sd_dir)
    cfg["run"]["root"] = str(tmp_path / "runs")
    cfg["train"].update(total_steps=2, log_every=1, checkpoint_every=2, sample_every=2)
    path = tmp_path / f"sd_{len(list(tmp_path.glob('sd_*.json')))}.json"
    path.write_text(json.dumps(cfg))
    return path


def _concept(name, override, stem, **kw):
    return {"concept_to_forget": name, "concept_to_override": override,
            "forget_file": str(PROMPTS / f"{stem}_train.txt"), "val_file": str(PROMPTS / f"{stem}_val.txt"), **kw}


JOLIE = ("angelina jolie", "a middle aged woman", "angelina_jolie")
PITT = ("brad pitt", "a middle aged man", "brad_pitt")
SINGLE_KEYS = {"forget_file": "", "concept_to_forget": "", "concept_to_override": "", "val_file": ""}


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from sfd_fast.sd.tiny import build_tiny_sd
    return build_tiny_sd(tmp_path_factory.mktemp("multi_sd") / "sd", sample_size=8)


def test_sd_bad_concepts_are_refused(tmp_path, sd_dir):
    with pytest.raises(ConfigError, match=r"names the concept\(s\) \['angelina jolie'\] more than once"):
        load_config(_sd_cfg(tmp_path, sd_dir, concepts=[_concept(*JOLIE), _concept(*JOLIE)], **SINGLE_KEYS))
    wrong_file = _concept("angelina jolie", "a woman", "brad_pitt")
    with pytest.raises(ConfigError, match=r"concept_to_forget.*'angelina jolie' occurs in none"):
        load_config(_sd_cfg(tmp_path, sd_dir, concepts=[wrong_file], **SINGLE_KEYS))
    with pytest.raises(ConfigError, match=r"concepts\[0\].weight' must be a positive number"):
        load_config(_sd_cfg(tmp_path, sd_dir, concepts=[_concept(*JOLIE, weight=0)], **SINGLE_KEYS))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['forget'\]"):
        load_config(_sd_cfg(tmp_path, sd_dir, concepts=[{"forget": "x"}], **SINGLE_KEYS))
    with pytest.raises(ConfigError, match=r"set together with prompts.concept_to_forget"):
        load_config(_sd_cfg(tmp_path, sd_dir, concepts=[_concept(*PITT)]))


def _run_weights(cfg_path, run_dir):
    train.main(["--config", str(cfg_path), "--run-dir", str(run_dir)])
    return {n: load_file(str(latest_checkpoint(run_dir) / f"{n}.safetensors")) for n in ("generator", "fake_score")}


def test_sd_list_of_one_equals_single_concept_run_and_two_concepts_train(tmp_path, sd_dir):
    single = _run_weights(_sd_cfg(tmp_path, sd_dir), tmp_path / "single")
    listed = _run_weights(_sd_cfg(tmp_path, sd_dir, concepts=[_concept(*JOLIE)], **SINGLE_KEYS), tmp_path / "listed")
    for role in single:
        assert all(torch.equal(single[role][k], listed[role][k]) for k in single[role]), role
    two = tmp_path / "two"
    _run_weights(_sd_cfg(tmp_path, sd_dir, concepts=[_concept(*JOLIE), _concept(*PITT)], **SINGLE_KEYS), two)
    rec = json.loads((two / "stats.jsonl").read_text().splitlines()[-1])
    for net in ("fake_score_loss", "generator_loss"):
        assert math.isfinite(rec[f"{net}/forget/angelina jolie"]) and math.isfinite(rec[f"{net}/forget/brad pitt"])
    rows = (two / "samples" / "step-00000002.txt").read_text()
    assert "Angelina Jolie" in rows and "Brad Pitt" in rows   # one grid row block per concept


def test_ddpm_family_takes_several_classes(tmp_path):
    from sfd_fast.ddpm.build import build_parts
    sets = [f"ddpm.checkpoint=random:{tmp_path}", "sfd.forget_classes=[0, 3]", "sfd.override_classes=[1, 2]"]
    task = build_parts(load_config(ROOT / "configs" / "ddpm_tiny.json", sets)).task
    c = task.draw(40, 4, torch.Generator().manual_seed(0), "cpu", "generator")
    assert c.generator_cond[40:].tolist() == [0, 3, 0, 3] and c.teacher_cond[40:].tolist() == [1, 2, 1, 2]
    assert not torch.isin(c.generator_cond[:40], torch.tensor([0, 3])).any()
    with pytest.raises(ConfigError, match=r"repeats class\(es\) \[3\]"):
        load_config(ROOT / "configs" / "ddpm_tiny.json", sets[:1] + ["sfd.forget_classes=[3, 3]"])
