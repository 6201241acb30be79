"""Config checks of the Stable Diffusion family (called by config.validate through families.py):
the model source, prompt files and concept, before any weights are loaded."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .loading import REQUIRED_PARTS
from .prompts import REMAIN_FILES, concept_specs, forget_sets_from_config


def _sd_pretrained_problem(pretrained: str) -> str | None:
    """Why `model.pretrained` cannot be a Stable Diffusion source, or None if it may be.

    Accepted: an existing diffusers pipeline folder, "tiny:DIR" (a tiny random pipeline built in
    DIR on first use, for CPU smoke runs), or a hub id "org/name" (checked when loading)."""
    if not pretrained:
        return ("is empty; give a diffusers Stable Diffusion folder (e.g. a local copy of "
                "runwayml/stable-diffusion-v1-5), a hub id 'org/name', or 'tiny:DIR' for a CPU smoke run")
    if pretrained.startswith("tiny:"):
        return None if pretrained[5:] else "is 'tiny:' without a folder; use e.g. 'tiny:runs/tiny_sd'"
    p = Path(pretrained).expanduser()
    if p.is_dir():
        missing = [part for part in REQUIRED_PARTS if not (p / part).exists()]
        if missing:
            return (f"= {pretrained!r} is not a diffusers Stable Diffusion folder: it lacks "
                    f"{', '.join(missing)} (expected {', '.join(REQUIRED_PARTS)}, as written by "
                    "StableDiffusionPipeline.save_pretrained)")
        return None
    if p.exists():
        return f"= {pretrained!r} is a file, not a diffusers Stable Diffusion folder"
    parts = Path(pretrained).parts
    looks_local = (pretrained.startswith((".", "/", "~")) or len(parts) != 2
                   or Path(parts[0]).is_dir())
    if looks_local:
        return (f"= {pretrained!r} does not exist; give an existing diffusers Stable Diffusion folder "
                "or a hub id such as 'runwayml/stable-diffusion-v1-5'")
    return None


def _first_prompt_line(path: Path) -> bool:
    from .prompts import read_prompt_file
    try:
        read_prompt_file(path, "remain prompts")   # names the file when it is not UTF-8
    except ValueError as e:
        if "UTF-8" in str(e):
            raise UserError(f"prompts.remain_file: {e}") from None
    with open(path, encoding="utf-8") as f:
        return any(line.strip() for line in f)


def validate(cfg, bad) -> None:
    """Stable Diffusion inputs, checked before any model is built (prompt files, concept, sources)."""
    m, pr = cfg.model, cfg.prompts
    problem = _sd_pretrained_problem(m.pretrained)
    if problem:
        bad("model.pretrained", problem)
    gi = m.generator_init
    if gi.lower().endswith((".pkl", ".pickle")) and not m.trust_pickle:
        bad("model.generator_init", f"= {gi!r} is a pickle; unpickling runs arbitrary code from the file. "
            "Set model.trust_pickle to true only if you trust its source (e.g. a SiD-LSG generator "
            "{'ema': UNet}), or convert it to safetensors / a diffusers UNet folder")
    # remain prompts: only existence and non-emptiness here (a caption list may be millions of lines)
    rp = Path(pr.remain_file).expanduser()
    if not pr.remain_file:
        bad("prompts.remain_file", "is empty; give a text file with one remain prompt per line")
    if rp.is_dir():
        found = [rp / n for n in REMAIN_FILES if (rp / n).is_file()]
        if not found:
            bad("prompts.remain_file", f"= {str(rp)!r} is a directory holding none of {', '.join(REMAIN_FILES)}")
        rp = found[0]
    if not rp.is_file():
        bad("prompts.remain_file", f"= {str(rp)!r} does not exist (expected a text file, one prompt per line)")
    if not _first_prompt_line(rp):
        bad("prompts.remain_file", f"= {str(rp)!r} is empty (expected one prompt per line)")
    forget = validate_concepts(pr, bad)
    if len(pr.use_neg) != 3 or not all(isinstance(u, bool) for u in pr.use_neg):
        bad("prompts.use_neg", f"must be three booleans (kappa1 fake-train, kappa2 fake-eval, kappa4 "
            f"teacher), got {pr.use_neg!r}")
    if pr.sid_w_neg and not forget[0].has_neg:
        bad("prompts.sid_w_neg", "is true but prompts.neg_file is not set; give a negative prompt file")
    if not 0 <= pr.context_dropout < 1:
        bad("prompts.context_dropout", f"must be in [0, 1), got {pr.context_dropout}")
    if pr.resolution <= 0 or pr.resolution % 8:
        bad("prompts.resolution", f"must be a positive multiple of 8 (the VAE factor), got {pr.resolution}")
    if not all(isinstance(p, str) for p in pr.grid_prompts):
        bad("prompts.grid_prompts", "must be a list of strings")
    if pr.grid_per_prompt < 1:
        bad("prompts.grid_per_prompt", f"must be >= 1, got {pr.grid_per_prompt}")
    validate_clip(cfg, bad)


def validate_concepts(pr, bad) -> list:
    """The forget concepts (prompts.concepts, or the single-concept keys): distinct names, positive
    weights, prompt files that exist and name their concept. Returns their ForgetPromptSets."""
    key = "prompts.concepts" if pr.concepts else "prompts"
    if pr.concepts and (pr.concept_to_forget or pr.forget_file):
        bad("prompts.concepts", "is set together with prompts.concept_to_forget / prompts.forget_file; "
            "put every concept in prompts.concepts (the single-concept keys mean a list of one)")
    try:
        specs = concept_specs(pr)
    except ValueError as e:
        bad("prompts.concepts", str(e))
    for i, c in enumerate(specs):
        where = f"prompts.concepts[{i}]" if pr.concepts else "prompts"
        if not c["forget_file"] and not c["concept_to_forget"]:
            bad(f"{where}.forget_file", "is empty and so is concept_to_forget; give the forget prompt "
                "file (prompts naming the concept) or at least the concept")
        w = c["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            bad(f"{where}.weight", f"must be a positive number, got {w!r}")
    names = [c["name"].lower() for c in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        bad(key, f"names the concept(s) {repeated} more than once; each concept to forget must be distinct")
    try:
        return forget_sets_from_config(pr)[0]
    except FileNotFoundError as e:
        bad(key, f"names a missing prompt file: {e}")
    except ValueError as e:
        bad(f"{key}.concept_to_forget" if "concept" in str(e) else key, f"is invalid: {e}")


def validate_clip(cfg, bad) -> None:
    """eval.clip_model: a local CLIP folder must hold a CLIP config (a hub id is checked on loading,
    which build_parts does before training)."""
    if cfg.eval.every:
        bad("eval.every", "is set, but the stable_diffusion family has no evaluation during training (its "
            "CLIP evaluation runs once at the end, with eval.clip_model); set eval.every to 0")
    clip = cfg.eval.clip_model
    if not clip or not cfg.eval.enabled:
        return
    p = Path(clip).expanduser()
    looks_local = p.exists() or clip.startswith((".", "/", "~")) or len(Path(clip).parts) != 2
    if not looks_local:
        return
    if not (p / "config.json").is_file():
        bad("eval.clip_model", f"= {clip!r} is not a CLIP model folder (no config.json there); give a folder "
            "written by transformers CLIPModel.save_pretrained (with its tokenizer) or a hub id such as "
            "'openai/clip-vit-large-patch14', or leave it empty to skip the CLIP evaluation")
    import json
    try:
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError as e:
        bad("eval.clip_model", f"= {clip!r}: config.json is not valid JSON ({e})")
    if model_type != "clip":
        bad("eval.clip_model", f"= {clip!r} holds a {model_type!r} model, not a CLIP model (model_type 'clip')")
