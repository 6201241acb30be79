"""The two EDM backbones, F(x, c_noise, class_labels, augment_labels): SongUNet (DDPM++ / NCSN++) and
DhariwalUNet (ADM), with EDM's module names (`map_*`, `enc[...]`, `dec[...]`, `out_*`) and key order.

The encoder and decoder are ModuleDicts keyed "{res}x{res}_{role}" exactly as EDM's, so the state
dict keys are EDM's; the forward walks them in insertion order and dispatches on the role in the key
name (the `aux` entries of SongUNet's skip/residual encoder and skip decoder).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock


def _drop_labels(net: nn.Module, labels: torch.Tensor, batch: int) -> torch.Tensor:
    """Classifier-free-guidance label dropout (train mode only): whole label rows zeroed with p."""
    if net.training and net.label_dropout:
        keep = torch.rand([batch, 1], device=labels.device) >= net.label_dropout
        return labels * keep.to(labels.dtype)
    return labels


def _encoder_blocks(enc, r: str, c: int, cout: int, num_blocks: int, attention: bool, blk: dict,
                    skip_channels: list) -> int:
    """num_blocks UNetBlocks "{r}_block{i}" (c -> cout), each output a skip connection."""
    for i in range(num_blocks):
        enc[f"{r}_block{i}"] = UNetBlock(c, cout, attention=attention, **blk)
        c = cout
        skip_channels.append(c)
    return c


def _decoder_level(dec, r: str, top: bool, c: int, cout: int, num_blocks: int, blk: dict, skip_channels: list,
                   attention_of) -> int:
    """One decoder resolution: "in0" (attention) + "in1" at the lowest, else "up"; then num_blocks + 1
    blocks each taking one skip connection (concatenated), attention where attention_of(i)."""
    if top:
        dec[f"{r}_in0"] = UNetBlock(c, c, attention=True, **blk)
        dec[f"{r}_in1"] = UNetBlock(c, c, **blk)
    else:
        dec[f"{r}_up"] = UNetBlock(c, c, up=True, **blk)
    for i in range(num_blocks + 1):
        cin, c = c + skip_channels.pop(), cout
        dec[f"{r}_block{i}"] = UNetBlock(cin, c, attention=attention_of(i), **blk)
    return c


class SongUNet(nn.Module):
    """DDPM++ (positional embedding, standard encoder, filter [1,1]) and NCSN++ (fourier embedding,
    residual encoder, filter [1,3,3,1]) of Song et al. as EDM restates them."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=(16,), dropout=0.10, label_dropout=0, embedding_type="positional",
                 channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
                 resample_filter=(1, 1)):
        for name, value, allowed in (("embedding_type", embedding_type, ("fourier", "positional")),
                                     ("encoder_type", encoder_type, ("standard", "skip", "residual")),
                                     ("decoder_type", decoder_type, ("standard", "skip"))):
            if value not in allowed:
                raise ValueError(f"SongUNet: {name} {value!r} is not one of {allowed}")
        super().__init__()
        self.label_dropout = label_dropout
        emb_ch, noise_ch = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        blk = dict(emb_channels=emb_ch, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                   resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                   init=init, init_zero=init_zero, init_attn=init_attn)
        self.map_noise = (PositionalEmbedding(noise_ch, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_ch))
        self.map_label = Linear(label_dim, noise_ch, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_ch, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_ch, emb_ch, **init)
        self.map_layer1 = Linear(emb_ch, emb_ch, **init)

        self.enc = nn.ModuleDict()
        c, c_aux, skip_channels = in_channels, in_channels, []
        for level, mult in enumerate(channel_mult):
            r = f"{img_resolution >> level}x{img_resolution >> level}"
            if level == 0:
                self.enc[f"{r}_conv"] = Conv2d(c, model_channels, 3, **init)
                c = model_channels
            else:
                self.enc[f"{r}_down"] = UNetBlock(c, c, down=True, **blk)
                if encoder_type == "skip":
                    self.enc[f"{r}_aux_down"] = Conv2d(c_aux, c_aux, 0, down=True, resample_filter=resample_filter)
                    self.enc[f"{r}_aux_skip"] = Conv2d(c_aux, c, 1, **init)
                elif encoder_type == "residual":
                    self.enc[f"{r}_aux_residual"] = Conv2d(c_aux, c, 3, down=True, resample_filter=resample_filter,
                                                           fused_resample=True, **init)
                    c_aux = c
            skip_channels.append(c)
            attn = (img_resolution >> level) in attn_resolutions
            c = _encoder_blocks(self.enc, r, c, model_channels * mult, num_blocks, attn, blk, skip_channels)

        self.dec = nn.ModuleDict()
        last = len(channel_mult) - 1
        for level in range(last, -1, -1):
            res, mult = img_resolution >> level, channel_mult[level]
            r = f"{res}x{res}"
            c = _decoder_level(self.dec, r, level == last, c, model_channels * mult, num_blocks, blk, skip_channels,
                               lambda i, res=res: i == num_blocks and res in attn_resolutions)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < last:
                    self.dec[f"{r}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                     resample_filter=resample_filter)
                self.dec[f"{r}_aux_norm"] = GroupNorm(c, eps=1e-6)
                self.dec[f"{r}_aux_conv"] = Conv2d(c, out_channels, 3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        e = self.map_noise(noise_labels)
        e = torch.cat(e.chunk(2, dim=1)[::-1], dim=1)      # [sin, cos]: Song et al.'s order
        if self.map_label is not None:
            labels = _drop_labels(self, class_labels, x.shape[0])
            e = e + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            e = e + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(e))))

        skips, aux = [], x
        for name, block in self.enc.items():
            if "_aux_down" in name:
                aux = block(aux)
            elif "_aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "_aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        out = h = None
        for name, block in self.dec.items():
            if "_aux_up" in name:
                out = block(out)
            elif "_aux_norm" in name:
                h = block(x)
            elif "_aux_conv" in name:
                h = block(F.silu(h))
                out = h if out is None else h + out
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out


class DhariwalUNet(nn.Module):
    """ADM (Dhariwal & Nichol) as EDM restates it: adaptive-scale blocks, heads of 64 channels."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_ch = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        blk = dict(emb_channels=emb_ch, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_ch, **init)
        self.map_layer1 = Linear(emb_ch, emb_ch, **init)
        self.map_label = (Linear(label_dim, emb_ch, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.enc = nn.ModuleDict()
        c, skip_channels = in_channels, []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            r = f"{res}x{res}"
            if level == 0:
                self.enc[f"{r}_conv"] = Conv2d(c, model_channels * mult, 3, **init)
                c = model_channels * mult
            else:
                self.enc[f"{r}_down"] = UNetBlock(c, c, down=True, **blk)
            skip_channels.append(c)
            c = _encoder_blocks(self.enc, r, c, model_channels * mult, num_blocks, res in attn_resolutions, blk,
                                skip_channels)

        self.dec = nn.ModuleDict()
        last = len(channel_mult) - 1
        for level in range(last, -1, -1):
            res, mult = img_resolution >> level, channel_mult[level]
            r = f"{res}x{res}"
            c = _decoder_level(self.dec, r, level == last, c, model_channels * mult, num_blocks, blk, skip_channels,
                               lambda i, res=res: res in attn_resolutions)
        self.out_norm = GroupNorm(c)
        self.out_conv = Conv2d(c, out_channels, 3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        e = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            e = e + self.map_augment(augment_labels)
        e = self.map_layer1(F.silu(self.map_layer0(e)))
        if self.map_label is not None:
            e = e + self.map_label(_drop_labels(self, class_labels, x.shape[0]))
        emb = F.silu(e)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
