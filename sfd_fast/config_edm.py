"""The `edm` config section (model.kind "edm"), kept out of config.py to keep that module small."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class EDMConfig:
    """The `edm` section (model.kind "edm"; sfd_fast/edm, docs/edm.md): an EDM / SiD snapshot as teacher.

    snapshot: an EDM or SiD network-snapshot .pkl (read without running its embedded code), a SiD
    training-state .pt, an `sfd-fast export --format edm-safetensors` file, or "random:DIR" (random
    weights of `network`, written once to DIR: CPU smoke runs). entry: the teacher / fake-score entry
    ("ema"; a training state: "fake_score", "G", "G_ema"); generator_entry: the generator's start
    ("" = the teacher's weights; a two-stage start names e.g. "G_ema"). network: for "random:", the
    EDM class and constructor kwargs ({"class_name": "training.networks.VPPrecond", ...}).
    The sigma grid of sfd.t_min / t_max: schedule.num_timesteps points of the Karras ramp
    (sigma_min, sigma_max, rho), SiD's generator-loss sigmas (sfd_fast/edm/denoiser.py)."""
    snapshot: str = ""
    entry: str = "ema"
    generator_entry: str = ""
    network: dict = field(default_factory=dict)
    sigma_init: float = 2.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    train_mode_dropout: bool = True
    dropout: Optional[float] = None   # override the snapshot's dropout (SiD's --dropout; null = the snapshot's)
    precond: str = ""                 # "" = the snapshot's preconditioner; VPPrecond | VEPrecond | EDMPrecond:
                                      # its weights under that one (SiD's sid_train.py always uses EDMPrecond)
    grid_per_class: int = 8
    classifier: str = ""              # end-of-run UA: the reference's ResNet-34 state dict ("" = skip UA)
    fid_real_dir: str = ""            # end-of-run FID / IS ("" = skip; needs the eval extra)
    inception_weights: str = ""
