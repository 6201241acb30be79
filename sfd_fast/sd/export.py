"""`sfd-fast export`: a Stable Diffusion run's generator as a diffusers pipeline folder, atomically."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .build import load_run_generator

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# ---------------------------------------------------------------------------------------------------

README = """# One-step Stable Diffusion generator (sfd-fast export)

This folder is a diffusers `StableDiffusionPipeline`. Its UNet is the one-step generator distilled
by Score Forgetting Distillation (run `{run}`, {weights}); text encoder, tokenizer, VAE and
scheduler are those of `{source}`. It has no safety checker (`requires_safety_checker=False`).

Forgotten concept: `{concept}` (override: `{override}`).  t_init = {t_init}, prediction = {prediction}.

## One-step sampling with diffusers

The generator maps noise z ~ N(0, I) to an image in ONE UNet call at timestep t_init = {t_init}.
Its input is the VP-scaled noise b * z with b = sqrt(1 - alphas_cumprod[{t_init}]) = {b_init:.6f}
(not z itself), and it uses no classifier-free guidance (guidance_scale=1):

```python
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{name}", torch_dtype=torch.float16).to("cuda")
b = (1 - pipe.scheduler.alphas_cumprod[{t_init}]) ** 0.5          # = {b_init:.6f}
h = w = pipe.unet.config.sample_size
z = torch.randn(4, 4, h, w, generator=torch.Generator().manual_seed(0))
images = pipe(["a photo of ..."] * 4, timesteps=[{t_init}], guidance_scale=1.0,
              latents=(b * z).to("cuda", torch.float16)).images
```

With `timesteps=[{t_init}]` the DDPM scheduler's single step returns the x0 estimate (its added
noise has standard deviation 1e-10 there).

## The same thing by hand

    a = sqrt(alphas_cumprod[{t_init}]),  b = sqrt(1 - alphas_cumprod[{t_init}])
    x_t = b * z
    out = unet(x_t, {t_init}, text_embeddings).sample
    x0  = (x_t - b * out) / a          (epsilon prediction)
    x0  = a * x_t - b * out            (v prediction)
    image = vae.decode(x0 / vae.config.scaling_factor).sample      # in [-1, 1]

Few-step sampling (the reference's evaluation): for i = 0..n-1 use t_i = floor({t_init} * (1 - i/n)),
re-noise the current x0 as a_{{t_i}} x0 + b_{{t_i}} n with fresh noise n (z at i = 0, x0 = 0), and
take x0 again.

`sfd_export.json` records the run, checkpoint and t_init.
"""


def export_pipeline(run_dir: Path, out: Path, force: bool = False, raw: bool = False,
                    dtype: str = "fp32", device="cpu") -> Path:
    """Write the diffusers folder atomically (temp folder beside `out`, then rename)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise SystemExit(f"error: {out} exists and is not empty; pass --force to replace it")
    cfg, comps, generator, desc = load_run_generator(Path(run_dir), torch.device(device), raw=raw)
    scheduler = DDPMScheduler.from_config(comps.scheduler_config)
    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                   unet=comps.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    if dtype != "fp32":  # training keeps fp32 master weights
        pipe.to(dtype=DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        info = {"run": str(run_dir), "weights": desc, "t_init": cfg.sfd.t_init,
                "b_init": comps.schedule.b(cfg.sfd.t_init), "prediction": comps.prediction,
                "source": str(cfg.model.pretrained), "concept_to_forget": cfg.prompts.concept_to_forget,
                "concept_to_override": cfg.prompts.concept_to_override, "dtype": dtype}
        (tmp / "sfd_export.json").write_text(json.dumps(info, indent=1) + "\n")
        (tmp / "README.md").write_text(README.format(
            run=run_dir, weights=desc, source=cfg.model.pretrained, concept=cfg.prompts.concept_to_forget,
            override=cfg.prompts.concept_to_override, t_init=cfg.sfd.t_init, prediction=comps.prediction,
            b_init=comps.schedule.b(cfg.sfd.t_init), name=out.name))
        old = None
        if out.exists():  # --force (or an empty folder): move aside, rename new in, then delete old
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
