"""The `ddpm` config section: the reference class-conditional DDPM network and where it comes from."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DDPMConfig:
    """Network = a reference YAML's `model:` section; weights = a reference checkpoint (spec §4.1).

    checkpoint: a reference `ckpt.pth` (4-entry base DDPM list, or a 6-entry SFD/SiD list for the
    two-stage start), or "random:DIR" for random weights written once to DIR (CPU smoke runs).
    init_from_ema: the reference's distill.init_from_ema (take the EMA entry as the start).
    train_mode_dropout: dropout active in the fake score's and the generator's own updates, as the
    reference's train-mode networks (see sfd_fast/ddpm/model.py); false = dropout never used."""
    checkpoint: str = ""
    init_from_ema: bool = True
    image_size: int = 32
    in_channels: int = 3
    ch: int = 128
    ch_mult: list = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 2
    attn_resolutions: list = field(default_factory=lambda: [16])
    dropout: float = 0.1
    resamp_with_conv: bool = True
    train_mode_dropout: bool = True
    grid_per_class: int = 8           # snapshot grid: images per class row
    classifier: str = ""              # end-of-run UA: the reference's ResNet-34 state dict ("" = skip UA)

    def arch(self, num_classes: int):
        """The network hyper-parameters (a model.DDPMArch) for `num_classes` classes."""
        from .model import DDPMArch
        return DDPMArch(image_size=self.image_size, num_classes=num_classes, in_channels=self.in_channels,
                        out_ch=self.in_channels, ch=self.ch, ch_mult=list(self.ch_mult),
                        num_res_blocks=self.num_res_blocks, attn_resolutions=list(self.attn_resolutions),
                        dropout=self.dropout, resamp_with_conv=self.resamp_with_conv)
