"""Sampling a one-step (or few-step) SD generator: latents, VAE decode, prompt grids."""
from __future__ import annotations

from pathlib import Path

import torch

from ..generator import OneStepGenerator
from .loading import SDComponents
from .text import TextEncoderCache

GRID_SEED = 2024


# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_latents(generator: OneStepGenerator, z: torch.Tensor, cond: torch.Tensor, steps: int = 1,
                   rng: torch.Generator | None = None) -> torch.Tensor:
    """One- or multi-step generator sampling (the reference's eval sampler, spec §1b):
    step i uses t_i = floor(t_init (1 - i/steps)) and re-noises the current x0 with fresh noise
    (step 0: x0 = 0 and the noise is z, i.e. x = b_init z). Returns float32 x0 latents."""
    den = generator.denoiser
    x0 = torch.zeros_like(z, dtype=torch.float32)
    for i in range(steps):
        t_i = int(generator.t_init * (1 - i / steps))
        noise = z if i == 0 else torch.randn(z.shape, generator=rng, device=z.device, dtype=z.dtype)
        t = torch.full((z.shape[0],), t_i, dtype=torch.long, device=z.device)
        x = den.schedule.add_noise(x0, noise.float(), t)
        x0 = den.x0(x, t, cond)
    return x0


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scaling_factor: float, chunk: int = 4) -> torch.Tensor:
    """VAE decode in chunks (bounded memory); float32 pixels in about [-1, 1]."""
    dtype = next(vae.parameters()).dtype
    out = [vae.decode((latents[i:i + chunk] / scaling_factor).to(dtype)).sample.float()
           for i in range(0, latents.shape[0], chunk)]
    return torch.cat(out)


def grid_latents(n: int, shape: tuple, device, seed: int = GRID_SEED) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)  # CPU draw: the same latents on any device
    return torch.randn((n, *shape), generator=g).to(device)


def render(generator: OneStepGenerator, comps: SDComponents, cache: TextEncoderCache, prompts: list[str],
           per_prompt: int, shape: tuple, seed: int = GRID_SEED, steps: int = 1, chunk: int = 8) -> torch.Tensor:
    """(len(prompts) * per_prompt, 3, H, W) images in [-1, 1]; row r = prompts[r]."""
    device = next(generator.parameters()).device
    rows = [p for p in prompts for _ in range(per_prompt)]
    z = grid_latents(len(rows), shape, device, seed)
    # the cache's dtype is the text encoder's (bf16 when frozen nets are stored in bf16); grids run
    # without autocast, so the condition takes the generator's dtype
    cond = cache.encode(rows, cache=True).to(device, next(generator.parameters()).dtype)
    rng = torch.Generator(device=device).manual_seed(seed + 1)
    # chunks bound the activation memory at 512 px (same latents, so the same images)
    x0 = torch.cat([sample_latents(generator, z[i:i + chunk], cond[i:i + chunk], steps, rng)
                    for i in range(0, len(rows), chunk)])
    return decode_latents(comps.vae, x0, comps.vae_scaling_factor)


def make_save_grid(comps: SDComponents, cache: TextEncoderCache, prompts: list[str], per_prompt: int,
                   shape: tuple):
    from ..evaluation.grid import save_image_grid

    def save_grid(generator: OneStepGenerator, path: Path):
        was_training = generator.training
        generator.eval()
        images = render(generator, comps, cache, prompts, per_prompt, shape)
        generator.train(was_training)
        path = Path(path)
        save_image_grid(images, len(prompts), path)
        path.with_suffix(".txt").write_text("".join(f"row {i}: {p}\n" for i, p in enumerate(prompts)))
        return path

    return save_grid


