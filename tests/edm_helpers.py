"""Tiny EDM networks with random (non-degenerate) weights, shared by the EDM tests."""
from __future__ import annotations

import torch

# tiny versions of the three architectures of EDM's train.py (--arch ddpmpp / ncsnpp / adm)
DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
              decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=16,
              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=9, dropout=0.13)
NCSNPP = dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
              channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=16, channel_mult=[1, 2, 2],
              num_blocks=1, attn_resolutions=[4], augment_dim=9, dropout=0.13)
NCSNPP_SKIP = dict(NCSNPP, encoder_type="skip", decoder_type="skip")
ADM = dict(model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1,
           attn_resolutions=[4], augment_dim=9, dropout=0.1)


def randomize(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Replace every parameter with a seeded draw of a sensible scale (EDM's zero-initialised output
    layers would otherwise make most of the network invisible in its output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


def tiny_vp(arch=DDPMPP, label_dim=10, res=8, seed=0, **extra):
    from sfd_fast.edm import build_network
    torch.manual_seed(seed)
    kw = dict(img_resolution=res, img_channels=3, label_dim=label_dim, use_fp16=False, **arch, **extra)
    return randomize(build_network("training.networks.VPPrecond", **kw), seed), kw


def write_snapshot(path, entries: dict, zip_archive: bool = False):
    """A snapshot in EDM's record form: a pickle of {name: record, ...} (EDM / SiD network-snapshot),
    or, with zip_archive, a torch.save archive of it (SiD's training-state-*.pt)."""
    import types
    from sfd_fast.edm.record_pickle import RecordPickler, dump_records
    if zip_archive:
        torch.save(entries, path, pickle_module=types.SimpleNamespace(Pickler=RecordPickler, __name__="pickle"))
    else:
        with open(path, "wb") as f:
            dump_records(entries, f)
    return path


def easydict(**items):
    """A dnnlib.util.EasyDict as pickled by EDM (a dict subclass rebuilt by NEWOBJ + SETITEMS)."""
    from sfd_fast.edm.unpickle import placeholder
    cls = placeholder("dnnlib.util", "EasyDict")
    obj = cls.__new__(cls)
    obj.update(items)
    return obj
