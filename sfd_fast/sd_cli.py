"""`sfd-fast sample` and `sfd-fast export` for Stable Diffusion runs.

    sfd-fast sample --run RUN_DIR --prompt "a photo of ..." [--prompt ...] [--prompt-file F]
                    [--n 8] [--out grid.png] [--steps 1|2|4] [--seed S] [--raw] [--checkpoint DIR]
    sfd-fast export --run RUN_DIR --out DIR [--force] [--raw] [--dtype fp32|fp16|bf16]

`sample` writes one grid row per prompt (n images each) from the run's latest checkpoint (the EMA
generator if the run kept one, else the raw generator; --raw forces the raw one). Multi-step
sampling is the reference's eval sampler: step i re-noises the current x0 to
t_init * (1 - i/steps) with fresh noise.

`export` writes a diffusers StableDiffusionPipeline folder whose UNet is the distilled generator
(safetensors) plus a README.md on one-step sampling. It is written to a temporary folder beside
--out and renamed into place; an existing non-empty --out is only replaced with --force.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from .cli import command

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------
# loading a run
# ---------------------------------------------------------------------------------------------------

def run_config(run_dir: Path):
    """The run's resolved config.json (types checked; prompt files are not re-validated here)."""
    from .config import Config, ConfigError, _build
    f = Path(run_dir) / "config.json"
    if not f.is_file():
        raise SystemExit(f"error: {run_dir} has no config.json; is it a sfd-fast run directory?")
    try:
        cfg = _build(Config, json.loads(f.read_text()), "", str(f))
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.model.kind != "stable_diffusion":
        raise SystemExit(f"error: {run_dir} is a {cfg.model.kind!r} run; sample/export are for stable_diffusion runs")
    return cfg


def generator_weights(run_dir: Path, checkpoint: str | None = None, raw: bool = False) -> tuple[dict, str]:
    """(UNet state dict, description) of the generator: EMA if present (unless raw), else raw."""
    from safetensors.torch import load_file

    from .checkpoint import latest_checkpoint
    try:
        ck = Path(checkpoint) if checkpoint else latest_checkpoint(Path(run_dir))
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    ema = ck / "generator_ema.safetensors"
    f = ema if (ema.is_file() and not raw) else ck / "generator.safetensors"
    if not f.is_file():
        raise SystemExit(f"error: {f} does not exist; {ck} is not a complete checkpoint")
    return load_file(str(f)), f"{ck.name}/{f.name}"


def load_run_generator(run_dir: Path, device, checkpoint=None, raw=False):
    """-> (cfg, SDComponents, OneStepGenerator with the run's weights, description)."""
    from .denoisers import TextUNetDenoiser
    from .generator import OneStepGenerator
    from .sd_run import load_sd_components

    cfg = run_config(run_dir)
    comps = load_sd_components(cfg, device)
    state, desc = generator_weights(run_dir, checkpoint, raw)
    comps.unet.load_state_dict(state)
    generator = OneStepGenerator(TextUNetDenoiser(comps.unet, comps.schedule), cfg.sfd.t_init).eval()
    return cfg, comps, generator, desc


def _device(name: str):
    from .engine import resolve_device
    return resolve_device(name)


# ---------------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------------

@command("sample")
def sample_main(argv):
    p = argparse.ArgumentParser(prog="sfd-fast sample", description="One-step (or few-step) samples of a SD run.")
    p.add_argument("--run", required=True, help="run directory (with config.json and checkpoints/)")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeat for several rows)")
    p.add_argument("--prompt-file", help="text file, one prompt per line (e.g. the forget / val prompts)")
    p.add_argument("--n", type=int, default=8, help="images per prompt")
    p.add_argument("--out", default="grid.png", help="PNG grid, one row per prompt")
    p.add_argument("--out-dir", help="also write every image as OUT_DIR/<prompt>/<index>.png (for "
                   "classifier-based evaluation such as the GCD celebrity protocol)")
    p.add_argument("--steps", type=int, default=1, choices=[1, 2, 4])
    p.add_argument("--seed", type=int, default=2024, help="latent seed (2024 = the training grids' seed)")
    p.add_argument("--raw", action="store_true", help="use the raw generator even if an EMA exists")
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    prompts = list(a.prompt)
    if a.prompt_file:
        from .data.prompts import read_prompt_file
        try:
            prompts += read_prompt_file(a.prompt_file, "prompts")
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
    if not prompts:
        p.error("give at least one --prompt or a --prompt-file")
    if a.n < 1:
        p.error("--n must be >= 1")
    from .conditioning import TextEncoderCache
    from .evaluation.grid import save_image_grid
    from .sd_run import render, sample_shape

    device = _device(a.device)
    cfg, comps, generator, desc = load_run_generator(Path(a.run), device, a.checkpoint, a.raw)
    cache = TextEncoderCache(comps.text_encoder, comps.tokenizer, device)
    shape = sample_shape(comps, cfg.prompts.resolution)
    images = render(generator, comps, cache, prompts, a.n, shape, seed=a.seed, steps=a.steps)
    out = save_image_grid(images, len(prompts), Path(a.out))
    if a.out_dir:
        save_individual(images, prompts, a.n, Path(a.out_dir))
    print(f"{out}: {len(prompts)} prompt(s) x {a.n}, {a.steps} step(s), generator {desc}")
    return out


def save_individual(images: torch.Tensor, prompts: list[str], n: int, out_dir: Path) -> None:
    """OUT_DIR/<prompt as a folder name>/<i:05d>.png, images in [-1, 1]."""
    import re

    from PIL import Image
    x = ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for r, prompt in enumerate(prompts):
        d = out_dir / (re.sub(r"[^\w ,.'-]+", "_", prompt).strip()[:150] or "empty")
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(x[r * n + i]).save(d / f"{i:05d}.png")


# ---------------------------------------------------------------------------------------------------
# export
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


@command("export")
def export_main(argv):
    p = argparse.ArgumentParser(prog="sfd-fast export",
                                description="Export a SD run's generator as a diffusers pipeline folder.")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--out", required=True, help="output folder (must be absent or empty unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--raw", action="store_true", help="export the raw generator even if an EMA exists")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    a = p.parse_args(argv)
    out = export_pipeline(Path(a.run), Path(a.out), a.force, a.raw, a.dtype)
    print(f"exported {a.run} -> {out} (diffusers StableDiffusionPipeline; see {out / 'README.md'})")
    return out
