"""What the attacks need from a Stable Diffusion run: the soft-prompt attack and the paraphrase
list per concept, judged by CLIP zero-shot (eval.clip_model, as the SD evaluation: an image shows
the concept when its CLIP embedding is closer to the concept's text than to its override's).

Subjects: the run's generator and the teacher-initialised generator (the upper bound, same budget,
same noises). SD has no reference that never knew the concept (that would be a Stable Diffusion
pretrained without it), so `gap` is not reported; `rate_before` (the benign prompts without the free
tokens) and the teacher's rate frame the attack's rate. Only the mechanics are tested, on the tiny
random pipeline (sfd_fast/sd/tiny.py): with real weights the same code runs unchanged.
"""
from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import torch

from ..config import ConfigError
from ..denoisers import TextUNetDenoiser
from ..evaluation.attacks.soft_prompt import conditions_with_tokens, soft_prompt_search, with_placeholders
from ..generator import OneStepGenerator
from .build import generator_weights, load_sd_components, sample_shape
from .evaluate import ClipScorer, concept_share
from .prompts import forget_sets_from_config, read_prompt_file
from .sampling import decode_latents, grid_latents
from .tiny import shipped_prompt_dir

log = logging.getLogger("sfd_fast")
PLACEHOLDER_ID = 0     # a low id: never the end token that CLIP's pooling looks for (replaced anyway)


def paraphrase_file(concept: str, configured: str) -> Path | None:
    """eval.attacks.soft_prompt.paraphrase_file, else the shipped list for the concept, if any."""
    if configured:
        return Path(configured)
    slug = re.sub(r"[^a-z0-9]+", "_", concept.split("|")[0].lower()).strip("_")
    path = shipped_prompt_dir() / f"paraphrases_{slug}.txt"
    return path if path.is_file() else None


def _ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


def run_attacks(cfg, run_dir: Path, device) -> dict:
    """families.py `attack` entry for stable_diffusion runs."""
    acfg, sp = cfg.eval.attacks, cfg.eval.attacks.soft_prompt
    if not cfg.eval.clip_model:
        raise ConfigError("eval.attacks on a stable_diffusion run needs eval.clip_model: CLIP zero-shot is the "
                          "judge of the soft-prompt attack and the paraphrases; set it to a CLIP folder or hub id")
    scorer = ClipScorer(cfg.eval.clip_model, device)
    comps = load_sd_components(cfg, device)
    shape = sample_shape(comps, cfg.prompts.resolution)
    te, tok = comps.text_encoder, comps.tokenizer
    gen_unet = copy.deepcopy(comps.unet)
    gen_unet.load_state_dict(generator_weights(run_dir)[0])
    subjects = {"attack": OneStepGenerator(TextUNetDenoiser(gen_unet, comps.schedule), cfg.sfd.t_init)}
    teacher_gen = OneStepGenerator(TextUNetDenoiser(comps.unet, comps.schedule), cfg.sfd.t_init)
    if "teacher" in acfg.references:
        subjects["teacher"] = teacher_gen
    for g in subjects.values():
        g.eval().requires_grad_(False)
    out = {"judge": f"CLIP zero-shot ({cfg.eval.clip_model})", "surrogate": "latent distance to the teacher-init "
           "generator's image of the forget prompt", "budgets": {"soft_prompt": dict(vars(sp))},
           "seed": acfg.seed, "references_not_built": [r for r in acfg.references if r != "teacher"],
           "per_concept": {}}
    sets, names, _ = forget_sets_from_config(cfg.prompts)
    for name, pset in zip(names, sets):
        concept, override = pset.concept_to_forget or "", pset.concept_to_override or ""
        pairs = pset.pairs[:sp.prompts]
        forget_rows, benign = [f for f, _ in pairs], [o for _, o in pairs]
        z = grid_latents(len(pairs), shape, device, seed=acfg.seed)
        with torch.no_grad():
            target = teacher_gen(z, te(_ids(tok, forget_rows, device))[0])
        ids_plain = _ids(tok, benign, device)
        ids_adv = with_placeholders(ids_plain, sp.tokens, PLACEHOLDER_ID)

        def judged(gen, cond):
            with torch.no_grad():
                images = decode_latents(comps.vae, gen(z, cond), comps.vae_scaling_factor)
            return concept_share(scorer, images, concept, override, forget_rows, benign)
        rates = {}
        for who, gen in subjects.items():
            log.info("attack: soft prompt, %s: %s", name, who)
            tokens = soft_prompt_search(gen, te, ids_adv, z, target, sp, acfg.seed)
            rates[who] = {"rate": judged(gen, conditions_with_tokens(te, ids_adv, tokens)),
                          "rate_before": judged(gen, conditions_with_tokens(te, ids_plain, None))}
        per = {"soft_prompt": {"rate": rates["attack"]["rate"], "rate_before": rates["attack"]["rate_before"],
                               "references": {k: v["rate"] for k, v in rates.items() if k != "attack"},
                               "prompts": len(pairs), "details": rates}}
        para = paraphrase_file(concept, sp.paraphrase_file)
        if para is not None:
            prompts = read_prompt_file(para, "eval.attacks.soft_prompt.paraphrase_file")
            zp = grid_latents(len(prompts), shape, device, seed=acfg.seed + 1)
            ids_p = _ids(tok, prompts, device)
            shares = {}
            for who, gen in subjects.items():
                with torch.no_grad():
                    images = decode_latents(comps.vae, gen(zp, te(ids_p)[0]), comps.vae_scaling_factor)
                shares[who] = concept_share(scorer, images, concept, override, [concept] * len(prompts),
                                            [override] * len(prompts))
            per["paraphrases"] = {"rate": shares["attack"], "references": {k: v for k, v in shares.items() if k != "attack"},
                                  "prompts": len(prompts), "file": str(para)}
        out["per_concept"][name] = per
    return out
