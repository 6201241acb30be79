"""The embedded digits model: a class-conditional epsilon-prediction MLP for 8x8 images.

Small enough to pretrain as a DDPM teacher on 2 CPU cores in about a minute, and to run SFD
(~18 network-forward equivalents per sample) at thousands of samples per second on a CPU.
Label `num_classes` is the null class used for classifier-free guidance.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden * 2)
        self.fc2 = nn.Linear(hidden * 2, hidden)

    def forward(self, h, emb):
        return h + self.fc2(torch.nn.functional.silu(self.fc1(self.norm(h) + emb)))


class DigitsEpsMLP(nn.Module):
    """eps(x_t, t, label) for x of shape (B, 1, 8, 8)."""

    def __init__(self, num_classes: int = 10, hidden: int = 384, blocks: int = 4, image_size: int = 8):
        super().__init__()
        self.num_classes, self.hidden, self.image_size = num_classes, hidden, image_size
        d = image_size * image_size
        self.inp = nn.Linear(d, hidden)
        self.time = nn.Sequential(nn.Linear(128, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label = nn.Embedding(num_classes + 1, hidden)
        self.blocks = nn.ModuleList([ResidualBlock(hidden) for _ in range(blocks)])
        self.emb_proj = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(blocks)])
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, d)

    def forward(self, x, t, labels):
        b = x.shape[0]
        h = self.inp(x.reshape(b, -1))
        emb = torch.nn.functional.silu(self.time(timestep_embedding(t, 128)) + self.label(labels))
        for block, proj in zip(self.blocks, self.emb_proj):
            h = block(h, proj(emb))
        return self.out(self.out_norm(h)).reshape(x.shape)


class DigitsClassifier(nn.Module):
    """MLP classifier for 8x8 digits in [-1, 1]; `features` is the penultimate layer (for FD)."""

    def __init__(self, hidden: int = 256, feat: int = 64, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.SiLU(), nn.Dropout(0.1),
                                  nn.Linear(hidden, feat), nn.SiLU())
        self.head = nn.Linear(feat, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))
