"""Builders for the ddpm tests: tiny networks and reference-format checkpoint lists."""
from __future__ import annotations

from pathlib import Path

import torch

from sfd_fast.ddpm.model import DDPMArch, DDPMUNet

TINY = dict(image_size=16, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.1)


def tiny_arch(num_classes: int = 10) -> DDPMArch:
    return DDPMArch(num_classes=num_classes, **TINY)


def tiny_state(seed: int, num_classes: int = 10) -> dict:
    torch.manual_seed(seed)
    return DDPMUNet(tiny_arch(num_classes)).state_dict()


def prefixed(state: dict) -> dict:
    """A DistributedDataParallel-style state dict."""
    return {f"module.{k}": v for k, v in state.items()}


def adam_state(state: dict) -> dict:
    """An optimizer state dict shaped like torch.optim.Adam's (ints, floats, tensors, lists)."""
    return {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
            "param_groups": [{"lr": 1e-5, "betas": (0.0, 0.999), "eps": 1e-8, "weight_decay": 0,
                              "amsgrad": False, "params": list(range(len(state)))}]}


def base_list(model: dict, ema: dict, step: int = 800000) -> list:
    """[model_state, optimizer_state, step, ema_shadow] (reference base DDPM training)."""
    return [model, adam_state(model), step, ema]


def sfd_list(fake: dict, gen: dict, ema: dict, step: int = 4999) -> list:
    """[sg_state, sg_opt, g_state, g_opt, step, g_ema_shadow] (reference train_sfd)."""
    return [fake, adam_state(fake), gen, adam_state(gen), step, ema]


def save(obj, path: Path) -> Path:
    torch.save(obj, str(path))
    return Path(path)


def same_weights(net: torch.nn.Module, state: dict) -> bool:
    own = net.state_dict()
    return set(own) == set(state) and all(torch.equal(own[k], state[k]) for k in own)
