"""The digits surrogate of the attacks: a small CNN (another architecture than the judge, an MLP)
trained with another seed on the judge's split, cached under <run.root>/cache/; and the noise attack
run at each evaluation during training (eval.attacks.during)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..checkpoint import atomic_write_text, save_safetensors_atomic
from ..conditions import forget_targets
from .data import load_digits_tensors, train_test_split
from .pretrain import _bar, _key

log = logging.getLogger("sfd_fast")


class DigitsSurrogateCNN(nn.Module):
    """A small CNN for 8x8 digits: a different architecture from the judge (an MLP)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten())
        self.head = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def surrogate_seed(cfg) -> int:
    """The "auto" surrogate's training seed: run.seed + eval.attacks.surrogate_seed_offset."""
    return cfg.run.seed + cfg.eval.attacks.surrogate_seed_offset


def surrogate_cache_path(cfg) -> Path:
    key = _key({"epochs": cfg.pretrain.classifier_epochs, "seed": surrogate_seed(cfg),
                "arch": "cnn16-32", "v": 1})
    return Path(cfg.run.root) / "cache" / f"digits-surrogate-{key}.safetensors"


def train_surrogate(cfg, out: Path) -> float:
    """The surrogate on the same 75% split as the judge (its own seed); returns held-out accuracy."""
    seed = surrogate_seed(cfg)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = load_digits_tensors()
    tr, te = train_test_split(x.shape[0], 0.25, seed=cfg.run.seed)
    net = DigitsSurrogateCNN()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-3)
    epochs = max(1, cfg.pretrain.classifier_epochs // 3)   # a CNN converges in fewer epochs
    bar = _bar(epochs, "digits surrogate")
    for _ in range(epochs):
        perm = tr[torch.randperm(tr.shape[0], generator=g)]
        for i in range(0, perm.shape[0], 128):
            b = perm[i:i + 128]
            xb = x[b] + 0.05 * torch.randn(x[b].shape, generator=g)
            loss = nn.functional.cross_entropy(net(xb), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.update(1)
    bar.close()
    with torch.no_grad():
        acc = (net(x[te]).argmax(1) == y[te]).float().mean().item()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(net.state_dict(), out, metadata={"heldout_accuracy": f"{acc:.6f}"})
    atomic_write_text(out.with_suffix(".json"), json.dumps({"heldout_accuracy": acc}))
    log.info("digits surrogate (CNN) held-out accuracy %.4f", acc)
    return acc


def get_surrogate(cfg) -> tuple[nn.Module, dict]:
    """The surrogate classifier: eval.attacks.surrogate "auto" (trained once, cached) or a file."""
    choice = cfg.eval.attacks.surrogate
    path = surrogate_cache_path(cfg) if choice == "auto" else Path(choice)
    if choice == "auto" and not path.is_file():
        train_surrogate(cfg, path)
    net = DigitsSurrogateCNN(cfg.sfd.num_classes)
    try:
        net.load_state_dict(load_file(str(path)))
    except Exception as e:
        raise ValueError(f"eval.attacks.surrogate {path}: cannot load as the digits surrogate CNN ({e}); "
                         "use 'auto'") from None
    meta_file = path.with_suffix(".json")
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return net.eval().requires_grad_(False), {"path": str(path), **meta}


def make_attack_during(cfg, judge: nn.Module, device):
    """eval.attacks.during: -> callable(generator) -> {"attack_noise/<f>": rate on label f,
    "attack_noise_override/<f>": rate on its override label (the reference that never was f)},
    the noise attack with the eval.attacks budget on eval.during_samples_per_class noises."""
    from ..evaluation.attacks.classes import AttackParts, noise_attack
    forget, overrides = forget_targets(cfg.sfd)
    acfg = cfg.eval.attacks
    parts = AttackParts(generator=None, references={}, judge=judge, surrogate=get_surrogate(cfg)[0].to(device),
                        sample_shape=(1, 8, 8), num_classes=cfg.sfd.num_classes, forget=forget, overrides=overrides)
    n = cfg.eval.during_samples_per_class

    def attack(gen) -> dict:
        out = {}
        for i, f in enumerate(forget):
            out[f"attack_noise/{f}"] = noise_attack(parts, gen, f, f, acfg.noise, n, acfg.seed)["rate"]
            if i < len(overrides):
                out[f"attack_noise_override/{f}"] = noise_attack(parts, gen, overrides[i], f, acfg.noise, n,
                                                                 acfg.seed)["rate"]
        return out
    return attack
