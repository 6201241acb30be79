"""Building blocks of the EDM networks (NVlabs/edm training/networks.py), under EDM's parameter names.

Every module keeps the attribute names of its EDM counterpart (weight, bias, resample_filter, norm0,
conv0, affine, ...) so that a state dict maps one to one onto an EDM snapshot's. The initialisers
follow EDM's four modes (fan-in/fan-out scaled uniform or normal), so a freshly built network has
the same weight statistics as EDM's (not the same draws: the order of RNG calls is not part of the
contract; weights always come from a snapshot or from a seeded random start).

Numerics: layers cast their fp32 parameters to the input's dtype per call (EDM's mixed precision:
fp32 master weights, fp16 compute under `use_fp16`). Attention runs through
scaled_dot_product_attention on (batch*heads, HW, C) views; EDM computes softmax(q^T k / sqrt(C)) in
fp32 by hand. Both give the same result within fp32 rounding (tests/test_edm_model.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def draw_init(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A tensor of `shape` drawn as EDM's weight_init `mode` (uniform: +-sqrt(3 var); normal: var)."""
    if mode not in INIT_MODES:
        raise ValueError(f"init_mode {mode!r} is not one of {INIT_MODES}")
    var = 2.0 / (fan_in + fan_out) if mode.startswith("xavier") else 1.0 / max(fan_in, 1)
    if mode.endswith("uniform"):
        return (torch.rand(*shape) * 2 - 1) * math.sqrt(3 * var)
    return torch.randn(*shape) * math.sqrt(var)


class Linear(nn.Module):
    """y = x W^T + b with W (out, in): EDM's Linear (parameters `weight`, `bias`)."""

    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal", init_weight=1,
                 init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(draw_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(draw_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), b)


def _filter_2d(taps) -> torch.Tensor:
    """The separable resampling filter (1, 1, k, k): outer(f, f) / sum(f)^2 (a normalised blur)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square())[None, None]


class Conv2d(nn.Module):
    """EDM's Conv2d: an optional k x k convolution (kernel 0 = none) with an optional 2x up- or
    down-sampling by the filter `resample_filter` (a depthwise stride-2 (transposed) convolution).
    `fused_resample` changes the order (down: conv then blur; up: blur-transpose then conv, with the
    padding moved), as EDM does; the buffer `resample_filter` exists only when resampling."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=(1, 1), fused_resample=False, init_mode="kaiming_normal", init_weight=1,
                 init_bias=0):
        if up and down:
            raise ValueError("Conv2d: up and down cannot both be set")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = self.bias = None        # kernel 0: a pure resampling layer, no weights
        if kernel:
            self.weight = nn.Parameter(draw_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
            if bias:
                self.bias = nn.Parameter(draw_init([out_channels], **fans) * init_bias)
        self.register_buffer("resample_filter", _filter_2d(resample_filter) if (up or down) else None)

    def _blur(self, x, channels: int, transposed: bool, padding: int):
        f = self.resample_filter.to(x.dtype)
        if transposed:   # zero-insertion upsampling: gain 4 keeps the mean
            return F.conv_transpose2d(x, (f * 4).expand(channels, 1, -1, -1), stride=2, padding=padding,
                                      groups=channels)
        return F.conv2d(x, f.expand(channels, 1, -1, -1), stride=2, padding=padding, groups=channels)

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        wp = 0 if w is None else w.shape[-1] // 2
        fp = 0 if self.resample_filter is None else (self.resample_filter.shape[-1] - 1) // 2
        if self.fused_resample and w is not None and self.up:
            x = F.conv2d(self._blur(x, self.in_channels, True, wp + fp), w)
        elif self.fused_resample and w is not None and self.down:
            x = self._blur(F.conv2d(x, w, padding=wp + fp), self.out_channels, False, 0)
        else:
            if self.up:
                x = self._blur(x, self.in_channels, True, fp)
            if self.down:
                x = self._blur(x, self.in_channels, False, fp)
            if w is not None:
                x = F.conv2d(x, w, padding=wp)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).view(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """GroupNorm with at most 32 groups and at least 4 channels per group (EDM's rule)."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1:
            raise ValueError(f"GroupNorm: {num_channels} channels give no group of {min_channels_per_group}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def attention(q, k, v):
    """Single-head attention over pixels for (N, C, L) q, k, v: out[:, :, i] = sum_j softmax_j(q_i . k_j
    / sqrt(C)) v_j. SDPA on (N, L, C) views, computed in fp32 (EDM keeps the softmax in fp32)."""
    dtype = q.dtype
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2))
    return out.transpose(1, 2).to(dtype)


class UNetBlock(nn.Module):
    """EDM's UNetBlock: GN-SiLU-conv, embedding (additive, or scale/shift when adaptive_scale), GN-SiLU-
    dropout-conv, residual (projected when channels change or resampling), scaled by skip_scale; then
    optional self-attention (norm2, qkv, proj) with its own residual and skip_scale."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5,
                 resample_filter=(1, 1), resample_proj=False, adaptive_scale=True, init=None,
                 init_zero=None, init_attn=None):
        super().__init__()
        init = {} if init is None else init
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        heads = (num_heads if num_heads is not None else out_channels // channels_per_head) if attention else 0
        self.num_heads = heads
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, float(skip_scale), adaptive_scale
        rs = dict(resample_filter=resample_filter)
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, **rs, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            k = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, k, up=up, down=down, **rs, **init)
        if heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        e = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = e.chunk(2, dim=1)
            h = F.silu(self.norm1(h) * (scale + 1) + shift)
        else:
            h = F.silu(self.norm1(h + e))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads:
            n, c = h.shape[:2]
            # EDM's head split: channels (3C) reshaped to (heads, C/heads, 3) -> q, k, v per head
            qkv = self.qkv(self.norm2(h)).reshape(n * self.num_heads, c // self.num_heads, 3, -1)
            q, k, v = qkv.unbind(2)
            a = attention(q, k, v).reshape(h.shape)
            h = (self.proj(a) + h) * self.skip_scale
        return h


class PositionalEmbedding(nn.Module):
    """[cos(x f_i), sin(x f_i)] with f_i = max_positions^(-i / (C/2 - endpoint)), i < C/2 (no weights)."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        i = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = (1.0 / self.max_positions) ** (i / (half - (1 if self.endpoint else 0)))
        arg = x[:, None] * freqs.to(x.dtype)[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """[cos(2 pi x f), sin(2 pi x f)] with random frequencies f ~ N(0, scale^2) (buffer `freqs`)."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        arg = x[:, None] * (2 * math.pi * self.freqs).to(x.dtype)[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)
