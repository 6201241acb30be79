"""FID and Inception Score of image folders: torchmetrics' metrics on our FID Inception-v3.

torchmetrics (`pip install "sfd-fast[eval]"`) holds the statistics and formulas: its
`FrechetInceptionDistance` (float64 running sums, eigenvalue square root) and `InceptionScore`
(softmax KL per split, exp; mean and std over the splits). The features come from
sfd_fast/evaluation/inception.py (the TF FID Inception, torch-fidelity's weight file), computed
once per image: each metric's feature module takes its columns of that one output, so the
Inception network runs once per image for both metrics.

Conventions, as torch-fidelity's `fid` / `isc` (the usual FID-50k / IS numbers):
- FID on the 2048-d pool features; IS on the bias-free 1008-way logits, 10 splits;
- images are read as 8-bit RGB (grey images are repeated to 3 channels) and resized to 299 inside
  the network with TF1's bilinear resize;
- IS shuffles the samples before splitting (torch.chunk: for fewer than splits^2 images there may be
  fewer parts than `splits`; eval.json's is_splits is the count used); here that shuffle is seeded (`seed`), so the same
  images give the same score. The std over splits is torchmetrics' (unbiased, N-1);
  torch-fidelity reports the population std (N), about 5% smaller for 10 splits.
"""
from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .inception import NUM_LOGITS, POOL_FEATURES

INSTALL_HINT = 'pip install "sfd-fast[eval]"'
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def torchmetrics_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("torchmetrics") is not None


def require_torchmetrics():
    """(FrechetInceptionDistance, InceptionScore), or an ImportError with the install hint."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore
    except ImportError as e:
        raise ImportError(f"FID / Inception Score need torchmetrics, which is not installed ({e}); install "
                          f"the eval extra: {INSTALL_HINT}") from None
    return FrechetInceptionDistance, InceptionScore


def image_files(folder, what: str = "image folder") -> list[Path]:
    """Every image file under `folder` (recursively, sorted); an error if there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{what}: {folder} is not a folder")
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise ValueError(f"{what}: {folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_rgb_uint8(files: list[Path]) -> list[torch.Tensor]:
    """[3, H, W] uint8 per file (PIL convert("RGB"): grey and palette images become RGB)."""
    from PIL import Image
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
    return out


class _Columns(nn.Module):
    """A torchmetrics feature module: columns [lo, hi) of the Inception output rows, in float64."""

    def __init__(self, lo: int, hi: int):
        super().__init__()
        self.lo, self.hi, self.num_features = lo, hi, hi - lo

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[:, self.lo:self.hi].double()


def inception_rows(net, files: list[Path], device, batch_size: int, progress: bool, desc: str):
    """Yield [n, 2048 + 1008] float32 rows (pool features | bias-free logits) per batch of files.
    Images of different sizes in one batch go through the network in runs of equal size."""
    from tqdm import tqdm
    bar = tqdm(total=len(files), desc=desc, unit="img", disable=not progress)
    for start in range(0, len(files), batch_size):
        images = read_rgb_uint8(files[start:start + batch_size])
        parts = []
        for _, run in itertools.groupby(images, key=lambda t: tuple(t.shape)):
            with torch.no_grad():
                pool, logits = net(torch.stack(list(run)).to(device))
            parts.append(torch.cat([pool, logits], 1))
        bar.update(len(images))
        yield torch.cat(parts)
    bar.close()


def fid_inception_score(sample_files: list[Path], real_files: list[Path], net, device="cpu", batch_size: int = 50,
                        splits: int = 10, seed: int = 0, progress: bool = True) -> dict:
    """FID(samples, real) and the Inception Score of the samples, with `net` an FIDInceptionV3."""
    fid_metric, is_metric = require_torchmetrics()
    if splits < 2:
        raise ValueError(f"Inception Score: {splits} split(s); the std over splits needs at least 2")
    if len(sample_files) < splits:
        raise ValueError(f"FID / Inception Score: {len(sample_files)} sample image(s); FID needs at least 2 and "
                         f"the Inception Score over {splits} splits at least {splits}")
    if len(real_files) < 2:
        raise ValueError(f"FID: {len(real_files)} real image(s); FID needs at least 2")
    device = torch.device(device)
    net = net.to(device).eval()
    fid = fid_metric(feature=_Columns(0, POOL_FEATURES), normalize=False).to(device)
    with warnings.catch_warnings():  # "will save all extracted features": [n, 1008] float64, expected
        warnings.simplefilter("ignore", UserWarning)
        isc = is_metric(feature=_Columns(POOL_FEATURES, POOL_FEATURES + NUM_LOGITS), splits=splits).to(device)
    for rows in inception_rows(net, sample_files, device, batch_size, progress, "inception (samples)"):
        fid.update(rows, real=False)
        isc.update(rows)
    for rows in inception_rows(net, real_files, device, batch_size, progress, "inception (real)"):
        fid.update(rows, real=True)
    with torch.random.fork_rng(devices=[]):  # IS shuffles with torch.randperm (CPU generator): seed it
        torch.manual_seed(seed)
        is_mean, is_std = isc.compute()
    # torchmetrics splits with torch.chunk (ceil(n / splits) rows each): fewer than `splits` parts for
    # small n (12 images, 10 splits -> 6 parts); the count actually used is reported
    used = len(torch.arange(len(sample_files)).chunk(splits))
    return {"fid": float(fid.compute()), "inception_score_mean": float(is_mean),
            "inception_score_std": float(is_std), "is_splits": used, "n_samples": len(sample_files),
            "n_real": len(real_files)}
