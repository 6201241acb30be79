"""The Stable Diffusion soft-prompt attack and paraphrase list: mechanics on the tiny random
pipeline with a tiny random CLIP judge (the rates of random networks mean nothing; the budget,
the determinism and the files do)."""
import json

import pytest
import torch

from sfd_fast.evaluation.attacks.soft_prompt import (mean_token_norm, project_rows, soft_prompt_search,
                                                     soft_tokens, with_placeholders)
from sfd_fast.train import main as train_main
from tests.test_report import _sd_config, sd_and_clip  # noqa: F401  (the tiny SD + CLIP fixture)


def test_placeholders_go_after_the_start_token():
    ids = torch.tensor([[49406, 5, 6, 49407, 49407, 49407], [49406, 7, 49407, 49407, 49407, 49407]])
    out = with_placeholders(ids, 2, 0)
    assert out.tolist() == [[49406, 0, 0, 5, 6, 49407], [49406, 0, 0, 7, 49407, 49407]]


@pytest.mark.parametrize("seed", [0, 1])
def test_project_rows_bounds_each_token(seed):
    g = torch.Generator().manual_seed(seed)
    e0, e = torch.randn(5, 16, generator=g), 10 * torch.randn(5, 16, generator=g)
    p = project_rows(e, e0, 0.7)
    assert ((p - e0).norm(dim=1) <= 0.7 * (1 + 1e-5)).all()
    inside = e0 + 0.01 * torch.randn(5, 16, generator=g)
    assert torch.equal(project_rows(inside, e0, 0.7), inside)


def _tiny_sd_generator(sd):
    from sfd_fast.denoisers import TextUNetDenoiser
    from sfd_fast.generator import OneStepGenerator
    from sfd_fast.sd.loading import load_stable_diffusion
    comps = load_stable_diffusion(str(sd), device="cpu", dtype=torch.float32)
    gen = OneStepGenerator(TextUNetDenoiser(comps.unet, comps.schedule), 625).eval().requires_grad_(False)
    return comps, gen


def test_soft_prompt_search_budget_steps_and_seed(sd_and_clip):
    from sfd_fast.evaluation.attacks.config import SoftPromptAttackConfig
    comps, gen = _tiny_sd_generator(sd_and_clip[0])
    te = comps.text_encoder
    ids = with_placeholders(comps.tokenizer(["a photo of a cat", "a dog"], padding="max_length", max_length=77,
                                            truncation=True, return_tensors="pt").input_ids, 3, 0)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cfg = SoftPromptAttackConfig(tokens=3, steps=4, step_size=0.5, radius=0.6)
    calls = []
    handle = te.register_forward_hook(lambda *a: calls.append(1))
    tokens = soft_prompt_search(gen, te, ids, z, target, cfg, seed=0)
    handle.remove()
    assert len(calls) == 4 and tokens.shape == (3, te.get_input_embeddings().weight.shape[1])
    start = te.get_input_embeddings().weight[torch.randint(0, te.get_input_embeddings().weight.shape[0], (3,),
                                                           generator=torch.Generator().manual_seed(0))]
    scale = mean_token_norm(te)
    assert ((tokens - start).norm(dim=1) <= 0.6 * scale * (1 + 1e-5)).all()
    assert torch.equal(tokens, soft_prompt_search(gen, te, ids, z, target, cfg, seed=0))     # same seed
    assert not torch.equal(tokens, soft_prompt_search(gen, te, ids, z, target, cfg, seed=1))
    # the tokens reach the conditioning: positions 1..3 differ, the hook is gone afterwards
    with soft_tokens(te, [tokens]):
        adv = te(ids)[0]
    assert not torch.allclose(adv, te(ids)[0])
    assert not te.get_input_embeddings()._forward_hooks
    # and the search lowered its objective from the start tokens
    def loss(tok):
        with soft_tokens(te, [tok]), torch.no_grad():
            return float((gen(z, te(ids)[0]) - target).square().mean())
    assert loss(tokens) < loss(start)


def test_sd_run_with_soft_prompt_attack_and_paraphrases(tmp_path, sd_and_clip):
    sd, clip = sd_and_clip
    attacks = {"enabled": True, "soft_prompt": {"tokens": 2, "steps": 2, "prompts": 2}}
    train_main(["--config", str(_sd_config(tmp_path, sd, clip_model=str(clip), attacks=attacks)),
                "--run-dir", str(tmp_path / "run")])
    full = json.loads((tmp_path / "run" / "attacks.json").read_text())
    assert set(full["per_concept"]) == {"angelina jolie", "brad pitt"}
    for concept, per in full["per_concept"].items():
        sp = per["soft_prompt"]
        assert sp["prompts"] == 2 and set(sp["references"]) == {"teacher"}
        for v in (sp["rate"], sp["rate_before"], sp["references"]["teacher"]):
            assert v * 2 == round(v * 2)          # a share of 2 prompts (one image each)
        para = per["paraphrases"]
        assert para["file"].endswith(f"paraphrases_{concept.replace(' ', '_')}.txt") and para["prompts"] >= 10
    assert full["references_not_built"] == ["labels", "retrain"]
    assert "attacks" in json.loads((tmp_path / "run" / "eval.json").read_text())
