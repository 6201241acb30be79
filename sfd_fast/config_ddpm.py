"""The `ddpm` config section (model.kind "ddpm"), kept out of config.py to keep that module small."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DDPMNetConfig:
    """The reference class-conditional DDPM network (a reference YAML's `model:` section + image size);
    ddpm/model.py's DDPMArch adds the class count to it."""
    image_size: int = 32
    in_channels: int = 3
    ch: int = 128
    ch_mult: list = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 2
    attn_resolutions: list = field(default_factory=lambda: [16])
    dropout: float = 0.1
    resamp_with_conv: bool = True


@dataclass
class DDPMConfig(DDPMNetConfig):
    """The `ddpm` section: the network (DDPMNetConfig's keys) and where its weights come from (spec §4.1).

    checkpoint: a reference `ckpt.pth` (4-entry base DDPM list, or a 6-entry SFD/SiD list for the
    two-stage start), or "random:DIR" for random weights written once to DIR (CPU smoke runs).
    init_from_ema: the reference's distill.init_from_ema (take the EMA entry as the start).
    train_mode_dropout: dropout active in the fake score's and the generator's own updates, as the
    reference's train-mode networks (see sfd_fast/ddpm/model.py); false = dropout never used."""
    checkpoint: str = ""
    init_from_ema: bool = True
    train_mode_dropout: bool = True
    grid_per_class: int = 8           # snapshot grid: images per class row
    classifier: str = ""              # end-of-run UA: the reference's ResNet-34 state dict ("" = skip UA)
    fid_real_dir: str = ""            # end-of-run FID / IS: folder of real images ("" = skip; needs the eval extra)
    inception_weights: str = ""       # ... and torch-fidelity's weights-inception-2015-12-05-6726825d.pth
