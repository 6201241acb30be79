"""The reference class-conditional DDPM UNet (SFD:DDPM/models/diffusion.py `Conditional_Model`).

Written from the reference's facts (module names, shapes, order of operations), not its code.
Every parameter has the reference's name, so a reference state dict loads with no renaming:

    temb.dense.{0,1}            time-embedding MLP (ch -> 4ch -> 4ch)
    classes_emb.weight          (num_classes, ch) class table; null_classes_emb (ch,) the null class
    cemb.dense.{0,1}            class-embedding MLP (ch -> 4ch -> 4ch)
    conv_in, down.{i}.block.{j}, down.{i}.attn.{j}, down.{i}.downsample.conv,
    mid.block_1, mid.attn_1, mid.block_2,
    up.{i}.block.{j}, up.{i}.attn.{j}, up.{i}.upsample.conv, norm_out, conv_out
    ResnetBlock: norm1, conv1, temb_cemb_proj (Linear on cat[temb, cemb]), norm2, conv2, nin_shortcut
    AttnBlock:   norm, q, k, v, proj_out (1x1 convs)

`forward(x, t, y)` returns the epsilon prediction; label `num_classes` selects the null class
(classifier-free guidance's unconditional row). There is no class dropout inside the network.

Differences that do not change the function:
  * attention uses F.scaled_dot_product_attention (same softmax(q k^T / sqrt(c)) v; it avoids
    materialising the transposed (HW, HW) weight twice);
  * the reference mixes the null embedding in as keep*cemb + (1-keep)*null, which with keep=1 is
    exactly cemb; here the null rows are selected with torch.where;
  * the reference's ResnetBlock sizes temb_cemb_proj as (4ch + 512): it only runs at ch = 128,
    where that is 8ch. Here it is 8ch for every ch, so small test widths (ch 32) work.

Dropout (p = `dropout`, after norm2 + swish, as the reference). `update_dropout = True` makes a
network use dropout whenever its *own weights are being trained* (grad mode on and its weights
require grad), even in eval mode. That reproduces the reference's train/eval toggles under the
sfd-fast trainer, which keeps every network in eval mode: the fake score drops out in its own
update only, the generator in its update only (not when it makes samples for the fake score,
which run under no_grad), and the teacher never (its weights are frozen). In the generator update
the fake score is called with detached weights (denoisers.FrozenView), so it does not drop out
there either, again as the reference (sg_model.eval()).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DDPMNetConfig


@dataclass
class DDPMArch(DDPMNetConfig):
    """The network hyper-parameters of a reference YAML's `model:` section (+ image size, classes)."""
    num_classes: int = 10
    out_ch: int = 3

    @classmethod
    def for_image_size(cls, image_size: int = 32, num_classes: int = 10) -> "DDPMArch":
        """The reference configs: CIFAR-10 (32 px, ch_mult 1,2,2,2) and STL-10 (64 px, 1,2,2,2,4)."""
        if image_size == 32:
            return cls(image_size=32, num_classes=num_classes)
        if image_size == 64:
            return cls(image_size=64, num_classes=num_classes, ch_mult=[1, 2, 2, 2, 4])
        raise ValueError(f"image_size {image_size}: the reference ships configs for 32 (CIFAR-10) and 64 "
                         "(STL-10) only; pass arch=DDPMArch(...) for another network")


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [sin | cos] with frequencies 10000^(-k/(dim/2 - 1)), in float32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(10000) / (half - 1)))
    arg = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float):
        super().__init__()
        self.in_channels, self.out_channels, self.p = in_channels, out_channels, dropout
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_cemb_proj = nn.Linear(emb_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, emb_act, drop: bool):
        # emb_act = swish(cat[temb, cemb]), computed once per forward for all blocks
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_cemb_proj(emb_act)[:, :, None, None]
        h = F.silu(self.norm2(h))
        if drop and self.p > 0:
            h = F.dropout(h, self.p, training=True)
        h = self.conv2(h)
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        # (B, 1, HW, C) single-head attention with scale 1/sqrt(C), as the reference
        q, k, v = (m(h).reshape(b, 1, c, hgt * wid).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        if self.with_conv:  # asymmetric (right/bottom) zero padding, then a stride-2 conv
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2, 2)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


def _level(blocks: list, attns: list, resample: nn.Module | None, name: str) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    if resample is not None:
        setattr(level, name, resample)
    return level


class DDPMUNet(nn.Module):
    """Class-conditional DDPM UNet with the reference's parameter names (see the module docstring)."""

    def __init__(self, arch: DDPMArch):
        super().__init__()
        self.arch = arch
        ch, mult, nrb = arch.ch, tuple(arch.ch_mult), arch.num_res_blocks
        emb_ch = 4 * ch
        self.num_classes, self.resolution = arch.num_classes, arch.image_size
        self.update_dropout = False
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, emb_ch), nn.Linear(emb_ch, emb_ch)])
        self.classes_emb = nn.Embedding(arch.num_classes, ch)
        self.null_classes_emb = nn.Parameter(torch.randn(ch))
        self.cemb = nn.Module()
        self.cemb.dense = nn.ModuleList([nn.Linear(ch, emb_ch), nn.Linear(emb_ch, emb_ch)])
        self.conv_in = nn.Conv2d(arch.in_channels, ch, 3, padding=1)

        def block(cin, cout):
            return ResnetBlock(cin, cout, 2 * emb_ch, arch.dropout)

        res, in_mult = arch.image_size, (1,) + mult
        self.down = nn.ModuleList()
        c = ch
        for i, m in enumerate(mult):
            blocks, attns = [], []
            for j in range(nrb):
                blocks.append(block(ch * in_mult[i] if j == 0 else ch * m, ch * m))
                if res in arch.attn_resolutions:
                    attns.append(AttnBlock(ch * m))
            c = ch * m
            last = i == len(mult) - 1
            self.down.append(_level(blocks, attns, None if last else Downsample(c, arch.resamp_with_conv),
                                    "downsample"))
            res = res if last else res // 2
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = block(c, c), AttnBlock(c), block(c, c)
        ups = []
        for i in reversed(range(len(mult))):
            blocks, attns = [], []
            for j in range(nrb + 1):
                skip = ch * (in_mult[i] if j == nrb else mult[i])
                blocks.append(block(c + skip, ch * mult[i]))
                c = ch * mult[i]
                if res in arch.attn_resolutions:
                    attns.append(AttnBlock(c))
            ups.insert(0, _level(blocks, attns, Upsample(c, arch.resamp_with_conv) if i else None, "upsample"))
            res = res * 2 if i else res
        self.up = nn.ModuleList(ups)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, arch.out_ch, 3, padding=1)

    def dropout_active(self) -> bool:
        """Train mode, or (update_dropout and this network's own weights are being trained)."""
        if self.training:
            return True
        return self.update_dropout and torch.is_grad_enabled() and self.conv_in.weight.requires_grad

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            raise ValueError(f"DDPMUNet is built for {self.resolution}x{self.resolution} inputs, got "
                             f"{tuple(x.shape[2:])}")
        drop = self.dropout_active()
        dense_t, dense_c = self.temb.dense, self.cemb.dense
        temb = dense_t[1](F.silu(dense_t[0](timestep_embedding(t, self.arch.ch))))
        is_null = y == self.num_classes
        cemb = self.classes_emb(torch.where(is_null, torch.zeros_like(y), y))
        cemb = torch.where(is_null[:, None], self.null_classes_emb.to(cemb.dtype)[None], cemb)
        cemb = dense_c[1](F.silu(dense_c[0](cemb)))
        emb_act = F.silu(torch.cat([temb, cemb], dim=-1))

        hs = [self.conv_in(x)]
        for i, level in enumerate(self.down):
            for j, blk in enumerate(level.block):
                h = blk(hs[-1], emb_act, drop)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if i != len(self.down) - 1:
                hs.append(level.downsample(hs[-1]))
        h = self.mid.block_1(hs[-1], emb_act, drop)
        h = self.mid.block_2(self.mid.attn_1(h), emb_act, drop)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, blk in enumerate(level.block):
                h = blk(torch.cat([h, hs.pop()], dim=1), emb_act, drop)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def arch_of(d, num_classes: int) -> "DDPMArch":
    """The network hyper-parameters of the `ddpm` config section `d` for `num_classes` classes."""
    net = {f.name: copy.deepcopy(getattr(d, f.name)) for f in dataclasses.fields(DDPMNetConfig)}
    return DDPMArch(**net, num_classes=num_classes, out_ch=d.in_channels)
