"""A plain restatement of EDM's network forward (NVlabs/edm training/networks.py), for tests only.

Written for this repository from the architecture facts of EDM's code: a *functional* walk over a
state dict `p` (EDM's key names) and the constructor kwargs, in EDM's literal order of operations:
einsum attention with an explicit fp32 softmax over (N*heads, C, HW) tensors, explicit depthwise
filter convolutions for resampling, the sin/cos swap, and the preconditioner formulas
(VP: c_noise = (M-1) * t(sigma); VE: ln(sigma/2); EDM: ln(sigma)/4).
It shares NO code with sfd_fast.edm (no modules, only torch.nn.functional), so agreement checks both
the forward arithmetic and that the parameter names and shapes mean what EDM's mean.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SONG = dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4,
            num_blocks=4, attn_resolutions=[16], embedding_type="positional", channel_mult_noise=1,
            encoder_type="standard", decoder_type="standard", resample_filter=[1, 1])
DHARIWAL = dict(label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4,
                num_blocks=3, attn_resolutions=[32, 16, 8])


def groupnorm(p, key, x, eps):
    c = x.shape[1]
    return F.group_norm(x, min(32, c // 4), p[key + ".weight"], p[key + ".bias"], eps)


def conv(p, key, x, up=False, down=False, fused=False):
    w, b = p.get(key + ".weight"), p.get(key + ".bias")
    f = p.get(key + ".resample_filter")
    wpad = w.shape[-1] // 2 if w is not None else 0
    fpad = (f.shape[-1] - 1) // 2 if f is not None else 0
    if fused and up and w is not None:
        cin = x.shape[1]
        x = F.conv_transpose2d(x, f.mul(4).tile([cin, 1, 1, 1]), groups=cin, stride=2, padding=wpad + fpad)
        x = F.conv2d(x, w)
    elif fused and down and w is not None:
        x = F.conv2d(x, w, padding=wpad + fpad)
        cout = x.shape[1]
        x = F.conv2d(x, f.tile([cout, 1, 1, 1]), groups=cout, stride=2)
    else:
        cin = x.shape[1]
        if up:
            x = F.conv_transpose2d(x, f.mul(4).tile([cin, 1, 1, 1]), groups=cin, stride=2, padding=fpad)
        if down:
            x = F.conv2d(x, f.tile([cin, 1, 1, 1]), groups=cin, stride=2, padding=fpad)
        if w is not None:
            x = F.conv2d(x, w, padding=wpad)
    if b is not None:
        x = x + b.reshape(1, -1, 1, 1)
    return x


def linear(p, key, x):
    y = x @ p[key + ".weight"].t()
    return y + p[key + ".bias"] if key + ".bias" in p else y


def block(p, key, x, emb, *, up=False, down=False, heads=0, skip_scale=1.0, eps=1e-5, adaptive=True):
    orig = x
    x = conv(p, key + ".conv0", F.silu(groupnorm(p, key + ".norm0", x, eps)), up=up, down=down)
    params = linear(p, key + ".affine", emb).unsqueeze(2).unsqueeze(3)
    if adaptive:
        scale, shift = params.chunk(2, dim=1)
        x = F.silu(torch.addcmul(shift, groupnorm(p, key + ".norm1", x, eps), scale + 1))
    else:
        x = F.silu(groupnorm(p, key + ".norm1", x + params, eps))
    x = conv(p, key + ".conv1", x)                 # dropout: eval mode
    skip = conv(p, key + ".skip", orig, up=up, down=down) if (key + ".skip.weight") in p or \
        (key + ".skip.resample_filter") in p else orig
    x = (x + skip) * skip_scale
    if heads:
        qkv = conv(p, key + ".qkv", groupnorm(p, key + ".norm2", x, eps))
        q, k, v = qkv.reshape(x.shape[0] * heads, x.shape[1] // heads, 3, -1).unbind(2)
        w = torch.einsum("ncq,nck->nqk", q.to(torch.float32), (k / np.sqrt(k.shape[1])).to(torch.float32))
        w = w.softmax(dim=2).to(q.dtype)
        a = torch.einsum("nqk,nck->ncq", w, v)
        x = (conv(p, key + ".proj", a.reshape(*x.shape)) + x) * skip_scale
    return x


def _block_keys(p, prefix):
    names = []
    for k in p:
        if k.startswith(prefix):
            n = k[len(prefix):].split(".")[0]
            if n not in names:
                names.append(n)
    return names


def song_unet(p, kw, x, noise_labels, class_labels, augment_labels=None):
    kw = {**SONG, **kw}
    mc = kw["model_channels"]
    half = mc * kw["channel_mult_noise"] // 2
    if kw["embedding_type"] == "positional":
        freqs = torch.arange(half, dtype=torch.float32) / (half - 1)
        freqs = (1 / 10000) ** freqs
    else:
        freqs = 2 * np.pi * p["model.map_noise.freqs"]
    e = noise_labels.ger(freqs)
    e = torch.cat([e.cos(), e.sin()], dim=1)
    e = e.reshape(e.shape[0], 2, -1).flip(1).reshape(*e.shape)
    if kw["label_dim"]:
        e = e + linear(p, "model.map_label", class_labels * np.sqrt(kw["label_dim"]))
    if kw["augment_dim"] and augment_labels is not None:
        e = e + linear(p, "model.map_augment", augment_labels)
    emb = F.silu(linear(p, "model.map_layer1", F.silu(linear(p, "model.map_layer0", e))))
    bk = dict(skip_scale=np.sqrt(0.5), eps=1e-6, adaptive=False)
    skips, aux = [], x
    for name in _block_keys(p, "model.enc."):
        key = "model.enc." + name
        if "aux_down" in name:
            aux = conv(p, key, aux, down=True)
        elif "aux_skip" in name:
            x = skips[-1] = x + conv(p, key, aux)
        elif "aux_residual" in name:
            x = skips[-1] = aux = (x + conv(p, key, aux, down=True, fused=True)) / np.sqrt(2)
        elif name.endswith("_conv"):
            x = conv(p, key, x)
            skips.append(x)
        else:
            heads = 1 if key + ".qkv.weight" in p else 0
            x = block(p, key, x, emb, down=name.endswith("_down"), heads=heads, **bk)
            skips.append(x)
    aux = tmp = None
    for name in _block_keys(p, "model.dec."):
        key = "model.dec." + name
        if "aux_up" in name:
            aux = conv(p, key, aux, up=True)
        elif "aux_norm" in name:
            tmp = groupnorm(p, key, x, 1e-6)
        elif "aux_conv" in name:
            tmp = conv(p, key, F.silu(tmp))
            aux = tmp if aux is None else tmp + aux
        else:
            if x.shape[1] != p[key + ".norm0.weight"].shape[0]:
                x = torch.cat([x, skips.pop()], dim=1)
            heads = 1 if key + ".qkv.weight" in p else 0
            x = block(p, key, x, emb, up=name.endswith("_up"), heads=heads, **bk)
    return aux


def dhariwal_unet(p, kw, x, noise_labels, class_labels, augment_labels=None):
    kw = {**DHARIWAL, **kw}
    half = kw["model_channels"] // 2
    freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32) / half)
    e = noise_labels.ger(freqs)
    e = torch.cat([e.cos(), e.sin()], dim=1)
    if kw["augment_dim"] and augment_labels is not None:
        e = e + linear(p, "model.map_augment", augment_labels)
    e = linear(p, "model.map_layer1", F.silu(linear(p, "model.map_layer0", e)))
    if kw["label_dim"]:
        e = e + linear(p, "model.map_label", class_labels)
    emb = F.silu(e)
    skips = []
    for name in _block_keys(p, "model.enc."):
        key = "model.enc." + name
        if name.endswith("_conv"):
            x = conv(p, key, x)
        else:
            heads = p[key + ".qkv.weight"].shape[0] // 3 // 64 if key + ".qkv.weight" in p else 0
            x = block(p, key, x, emb, down=name.endswith("_down"), heads=heads)
        skips.append(x)
    for name in _block_keys(p, "model.dec."):
        key = "model.dec." + name
        if x.shape[1] != p[key + ".norm0.weight"].shape[0]:
            x = torch.cat([x, skips.pop()], dim=1)
        heads = p[key + ".qkv.weight"].shape[0] // 3 // 64 if key + ".qkv.weight" in p else 0
        x = block(p, key, x, emb, up=name.endswith("_up"), heads=heads)
    return conv(p, "model.out_conv", F.silu(groupnorm(p, "model.out_norm", x, 1e-5)))


def precond(kind, p, kw, x, sigma, class_labels=None, augment_labels=None):
    """D(x, sigma) of EDM's VPPrecond / VEPrecond / EDMPrecond, in the dtype of x and p (fp32 as EDM, or
    fp64 as the exact value the tests measure fp32 rounding against)."""
    kw = dict(kw)
    model_type = kw.pop("model_type", "DhariwalUNet" if kind == "EDMPrecond" else "SongUNet")
    net_kw = {k: v for k, v in kw.items() if k not in ("img_resolution", "img_channels", "use_fp16", "beta_d",
                                                      "beta_min", "M", "epsilon_t", "sigma_min", "sigma_max",
                                                      "sigma_data", "dropout", "label_dropout")}
    sigma = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
    if kind == "VPPrecond":
        beta_d, beta_min, m = kw.get("beta_d", 19.9), kw.get("beta_min", 0.1), kw.get("M", 1000)
        c_skip, c_out, c_in = 1, -sigma, 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (m - 1) * ((beta_min ** 2 + 2 * beta_d * (1 + sigma ** 2).log()).sqrt() - beta_min) / beta_d
    elif kind == "VEPrecond":
        c_skip, c_out, c_in, c_noise = 1, sigma, 1, (0.5 * sigma).log()
    else:
        sd = kw.get("sigma_data", 0.5)
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
    net = song_unet if model_type == "SongUNet" else dhariwal_unet
    f = net(p, net_kw, c_in * x, c_noise.flatten(), class_labels, augment_labels)
    return c_skip * x + c_out * f
