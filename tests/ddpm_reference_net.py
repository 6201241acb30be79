"""A plain transcription of the reference Conditional_Model's computation, for tests only.

Written for this repository from the facts of SFD:DDPM/models/diffusion.py (module names, shapes,
order of ops), in the reference's literal style: x*sigmoid(x) swish, explicit bmm attention with
the (HW, HW) weight matrix, the keep-mask mix of the class and null embeddings, and the
temb_cemb_proj input size 4ch + 512 (so it only runs at ch = 128, like the reference).
It shares NO code with sfd_fast.ddpm.model, so agreement is a real check of the fast network.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def swish(x):
    return x * torch.sigmoid(x)


def gn(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class RefRes(nn.Module):
    def __init__(self, cin, cout, temb_ch, p):
        super().__init__()
        self.cin, self.cout = cin, cout
        self.norm1, self.conv1 = gn(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.temb_cemb_proj = nn.Linear(temb_ch + 512, cout)
        self.norm2, self.dropout, self.conv2 = gn(cout), nn.Dropout(p), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0)

    def forward(self, x, temb, cemb):
        h = self.conv1(swish(self.norm1(x)))
        h = h + self.temb_cemb_proj(swish(torch.cat([temb, cemb], dim=-1)))[:, :, None, None]
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return (self.nin_shortcut(x) if self.cin != self.cout else x) + h


class RefAttn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = gn(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        w_ = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w)) * (int(c) ** -0.5)
        w_ = torch.softmax(w_, dim=2).permute(0, 2, 1)
        out = torch.bmm(v.reshape(b, c, h * w), w_).reshape(b, c, h, w)
        return x + self.proj_out(out)


class RefDown(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(nn.functional.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class RefUp(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class RefConditionalModel(nn.Module):
    def __init__(self, ch=128, ch_mult=(1, 2, 2, 2), nrb=2, attn_res=(16,), p=0.1, res=32, n_classes=10):
        super().__init__()
        self.ch, self.nres, self.nrb, self.res = ch, len(ch_mult), nrb, res
        t4 = ch * 4
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, t4), nn.Linear(t4, t4)])
        self.classes_emb = nn.Embedding(n_classes, ch)
        self.null_classes_emb = nn.Parameter(torch.randn(ch))
        self.cemb = nn.Module()
        self.cemb.dense = nn.ModuleList([nn.Linear(ch, t4), nn.Linear(t4, t4)])
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        cur, in_mult = res, (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i in range(self.nres):
            blk, att = nn.ModuleList(), nn.ModuleList()
            bin_, bout = ch * in_mult[i], ch * ch_mult[i]
            for _ in range(nrb):
                blk.append(RefRes(bin_, bout, t4, p))
                bin_ = bout
                if cur in attn_res:
                    att.append(RefAttn(bin_))
            d = nn.Module()
            d.block, d.attn = blk, att
            if i != self.nres - 1:
                d.downsample = RefDown(bin_)
                cur //= 2
            self.down.append(d)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = RefRes(bin_, bin_, t4, p), RefAttn(bin_), RefRes(bin_, bin_, t4, p)
        self.up = nn.ModuleList()
        for i in reversed(range(self.nres)):
            blk, att = nn.ModuleList(), nn.ModuleList()
            bout, skip = ch * ch_mult[i], ch * ch_mult[i]
            for j in range(nrb + 1):
                if j == nrb:
                    skip = ch * in_mult[i]
                blk.append(RefRes(bin_ + skip, bout, t4, p))
                bin_ = bout
                if cur in attn_res:
                    att.append(RefAttn(bin_))
            u = nn.Module()
            u.block, u.attn = blk, att
            if i != 0:
                u.upsample = RefUp(bin_)
                cur *= 2
            self.up.insert(0, u)
        self.norm_out, self.conv_out = gn(bin_), nn.Conv2d(bin_, 3, 3, 1, 1)

    def forward(self, x, t, c, drop_mask=None):
        half = self.ch // 2
        e = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
        e = t.float()[:, None] * e[None, :]
        temb = self.temb.dense[1](swish(self.temb.dense[0](torch.cat([torch.sin(e), torch.cos(e)], 1))))
        cemb = self.classes_emb(c)
        keep = torch.ones((x.shape[0], 1), dtype=torch.bool) if drop_mask is None else ~drop_mask[:, None]
        cemb = keep.float() * cemb + (~keep).float() * self.null_classes_emb[None].expand(x.shape[0], -1)
        cemb = self.cemb.dense[1](swish(self.cemb.dense[0](cemb)))
        hs = [self.conv_in(x)]
        for i in range(self.nres):
            for j in range(self.nrb):
                h = self.down[i].block[j](hs[-1], temb, cemb)
                if len(self.down[i].attn) > 0:
                    h = self.down[i].attn[j](h)
                hs.append(h)
            if i != self.nres - 1:
                hs.append(self.down[i].downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb, cemb)), temb, cemb)
        for i in reversed(range(self.nres)):
            for j in range(self.nrb + 1):
                h = self.up[i].block[j](torch.cat([h, hs.pop()], dim=1), temb, cemb)
                if len(self.up[i].attn) > 0:
                    h = self.up[i].attn[j](h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))
