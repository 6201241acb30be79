"""The 8x8 handwritten digits that ship inside scikit-learn (no download), scaled to [-1, 1]."""
from __future__ import annotations

import numpy as np
import torch


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """(images (1797, 1, 8, 8) float32 in [-1, 1], labels (1797,) long)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)  # 0..16 -> -1..1
    y = torch.from_numpy(d.target.astype(np.int64))
    return x, y


def train_test_split(n: int, test_fraction: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]
