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
from pathlib import Path

import torch

# ---------------------------------------------------------------------------------------------------
# loading a run
# ---------------------------------------------------------------------------------------------------

def _device(name: str):
    from ..engine import resolve_device
    return resolve_device(name)


# ---------------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------------

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
        from .prompts import read_prompt_file
        try:
            prompts += read_prompt_file(a.prompt_file, "prompts")
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
    if not prompts:
        p.error("give at least one --prompt or a --prompt-file")
    if a.n < 1:
        p.error("--n must be >= 1")
    from ..evaluation.grid import save_image_grid
    from .build import sample_shape
    from .sampling import render
    from .text import TextEncoderCache

    from .build import load_run_generator
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


def export_main(argv):
    p = argparse.ArgumentParser(prog="sfd-fast export",
                                description="Export a SD run's generator as a diffusers pipeline folder.")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--out", required=True, help="output folder (must be absent or empty unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--raw", action="store_true", help="export the raw generator even if an EMA exists")
    p.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"])
    a = p.parse_args(argv)
    from .export import export_pipeline
    out = export_pipeline(Path(a.run), Path(a.out), a.force, a.raw, a.dtype)
    print(f"exported {a.run} -> {out} (diffusers StableDiffusionPipeline; see {out / 'README.md'})")
    return out
