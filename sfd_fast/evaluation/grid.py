"""Sample grids as PNG (one row per condition)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def save_image_grid(images: torch.Tensor, rows: int, path: Path, drange=(-1.0, 1.0), upscale: int = 1):
    """images (N, C, H, W) with N = rows * cols, values in `drange`; written atomically as PNG."""
    from PIL import Image
    import os

    images = images.detach().float().cpu()
    n, c, h, w = images.shape
    if n % rows:
        raise ValueError(f"save_image_grid: {n} images do not fill {rows} rows")
    cols = n // rows
    lo, hi = drange
    x = ((images - lo) / (hi - lo)).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    x = x.reshape(rows, cols, c, h, w).transpose(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    img = Image.fromarray(np.ascontiguousarray(x[..., 0] if c == 1 else x))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def class_grid_saver(num_classes: int, per_class: int, shape: tuple, seed: int):
    """save_grid(generator, path) for class-conditional families: one row per class, `per_class`
    one-step samples each, from noise fixed by `seed` (the same images at every snapshot)."""
    def save_grid(gen, out: Path):
        device = next(gen.parameters()).device
        labels = torch.arange(num_classes, device=device).repeat_interleave(per_class)
        g = torch.Generator(device=device).manual_seed(seed)
        z = torch.randn((labels.shape[0], *shape), generator=g, device=device)
        with torch.no_grad():
            x = gen(z, labels)
        save_image_grid(x, num_classes, out)
    return save_grid
