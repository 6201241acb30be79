"""Stable Diffusion evaluation without external scripts (eval.json), scored with a CLIP model the
user points to (`eval.clip_model`: a local folder written by CLIPModel.save_pretrained with its
tokenizer, or a hub id).

For each forget concept, its first `eval.clip_prompts` forget prompts, and for the validation
prompts of all concepts: `eval.clip_images_per_prompt` one-step samples each, from fixed latents
(seed 4242, drawn on the CPU: the same on any device), of the EMA (else raw) generator.

  concept_share/<concept>   zero-shot share of the concept's images whose CLIP image embedding is
                            closer (cosine) to the concept text than to its override text (a
                            concept without a text override, e.g. an override file, compares each
                            image with its own forget prompt against the paired override prompt).
                            Low = forgotten; 1 - share is reported as ua/<concept>.
  val_clip_score            retention: mean CLIP score 100 * max(cos(image, prompt), 0) of the
                            validation images with their own prompts (Hessel et al. 2021, w = 100).

Without eval.clip_model the run logs that this evaluation was skipped and eval.json says so.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import atomic_write_json
from .sampling import render

log = logging.getLogger("sfd_fast")

EVAL_SEED = 4242
# OpenAI CLIP preprocessing constants (used when the folder has no preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """CLIP image / text embeddings (unit norm) with CLIP's resize, centre crop and normalisation
    done in torch on the images' device (no PIL round trip)."""

    def __init__(self, source: str, device):
        try:
            from transformers import AutoTokenizer, CLIPModel
            self.model = CLIPModel.from_pretrained(source).to(device).eval().requires_grad_(False)
            self.tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as e:  # noqa: BLE001  (any loading failure becomes one clear message)
            raise ValueError(f"eval.clip_model = {source!r} does not load as a CLIP model with its tokenizer "
                             f"({type(e).__name__}: {str(e)[:300]}); give a folder written by "
                             "CLIPModel.save_pretrained plus the tokenizer's save_pretrained, or a hub id such "
                             "as 'openai/clip-vit-large-patch14', or leave it empty to skip") from None
        self.device = torch.device(device)
        self.size = self.model.config.vision_config.image_size
        mean, std = CLIP_MEAN, CLIP_STD
        pre = Path(source) / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W) in [-1, 1] -> (N, D) unit vectors."""
        x = (images.to(self.device).float().clamp(-1, 1) + 1) / 2
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)   # shortest side to `size` (bicubic), then the centre crop
        x = F.interpolate(x, size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))),
                          mode="bicubic", align_corners=False, antialias=True)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        out = self.model.get_image_features(pixel_values=(x - self.mean) / self.std)
        return F.normalize(getattr(out, "pooler_output", out), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        out = self.model.get_text_features(**{k: v.to(self.device) for k, v in tok.items()})
        return F.normalize(getattr(out, "pooler_output", out), dim=-1)


def concept_share(scorer: ClipScorer, images: torch.Tensor, concept: str, override: str,
                  forget_rows: list[str], override_rows: list[str]) -> float:
    """Share of `images` closer to the concept than to its override (see the module docstring)."""
    img = scorer.image_features(images)
    if concept and override:
        text = scorer.text_features([concept.split("|")[0], override])
        closer = (img @ text[0]) > (img @ text[1])
    else:
        closer = (img * scorer.text_features(forget_rows)).sum(1) > (img * scorer.text_features(override_rows)).sum(1)
    return float(closer.float().mean())


def clip_score(scorer: ClipScorer, images: torch.Tensor, prompts: list[str]) -> float:
    cos = (scorer.image_features(images) * scorer.text_features(prompts)).sum(1)
    return float((100 * cos.clamp(min=0)).mean())


@torch.no_grad()
def evaluate_sd(scorer: ClipScorer, generator, comps, cache, task, shape, n_prompts: int,
                per_prompt: int) -> dict:
    """The metrics of the module docstring for the task's concepts (task: sd.text.TextForgetTask)."""
    metrics: dict = {"concept_share": {}, "ua": {}}
    val = []
    for name, prompt_set in zip(task.target_names, task.forget_sets):
        pairs = prompt_set.pairs[:n_prompts]
        forget_rows = [f for f, _ in pairs for _ in range(per_prompt)]
        override_rows = [o for _, o in pairs for _ in range(per_prompt)]
        images = render(generator, comps, cache, [f for f, _ in pairs], per_prompt, shape, seed=EVAL_SEED)
        share = concept_share(scorer, images, prompt_set.concept_to_forget or "",
                              prompt_set.concept_to_override or "", forget_rows, override_rows)
        metrics["concept_share"][name] = share
        metrics["ua"][name] = 1.0 - share
        val += prompt_set.val_prompts
    val = list(dict.fromkeys(val))[:n_prompts]
    if val:
        images = render(generator, comps, cache, val, per_prompt, shape, seed=EVAL_SEED + 1)
        metrics["val_clip_score"] = clip_score(scorer, images, [p for p in val for _ in range(per_prompt)])
    metrics.update(prompts_per_concept=n_prompts, images_per_prompt=per_prompt, val_prompts=len(val))
    return metrics


def load_scorer(cfg, device) -> ClipScorer | None:
    """The CLIP scorer of eval.clip_model (None when unset or the evaluation is disabled); loaded by
    build_parts so a CLIP model that does not load stops the run before training."""
    if not cfg.eval.enabled or not cfg.eval.clip_model:
        return None
    return ClipScorer(cfg.eval.clip_model, device)


def evaluate_run(cfg, parts, trainer, run_dir: Path) -> dict:
    """End-of-run evaluation of a Stable Diffusion run (rank 0): eval.json, or a note that it was skipped."""
    scorer = parts.extra_state.get("clip_scorer")
    if scorer is None:
        reason = "no CLIP model: set eval.clip_model (a local CLIP folder or a hub id) to score the run"
        log.info("evaluation skipped: %s", reason)
        atomic_write_json(Path(run_dir) / "eval.json", {"skipped": reason, "step": trainer.step})
        return {"eval": {"skipped": reason}}
    ev = cfg.eval
    gen = trainer.generator_ema
    was_training = gen.training
    gen.eval()
    metrics = evaluate_sd(scorer, gen, parts.extra_state["components"], parts.extra_state["text_cache"],
                          parts.task, parts.sample_shape, ev.clip_prompts, ev.clip_images_per_prompt)
    gen.train(was_training)
    metrics.update(step=trainer.step, clip_model=ev.clip_model)
    atomic_write_json(Path(run_dir) / "eval.json", metrics)
    log.info("eval: %s", json.dumps(metrics))
    return {"eval": metrics}
