"""Cost of train.adversarial (docs/robustness.md): one digits demo step (128 remain + 128 forget rows,
configs/digits_forget0.json) without and with a share of searched forget-row noise.

    pytest bench/bench_adversarial.py --benchmark-json=out.json   # needs the cached demo teacher
                                                                 # (`make demo` once), CPU, 1 thread
"""
from __future__ import annotations

import pytest
import torch


def _trainer(share: float):
    from sfd_fast.config import load_config
    from sfd_fast.digits.build import build_parts
    from sfd_fast.digits.pretrain import teacher_cache_path
    from sfd_fast.digits.surrogate import get_surrogate
    from sfd_fast.evaluation.attacks.adversarial import install_adversarial_noise
    from sfd_fast.trainer import SFDTrainer
    cfg = load_config("configs/digits_forget0.json", [f"train.adversarial.share={share}"] if share else [])
    if not teacher_cache_path(cfg).is_file():
        pytest.skip("no cached digits demo teacher: run `make demo` once")
    torch.manual_seed(0)
    trainer = SFDTrainer(cfg, build_parts(cfg), None, torch.device("cpu"))
    if share:
        install_adversarial_noise(trainer, get_surrogate(cfg)[0], cfg.train.adversarial)
    return trainer


@pytest.mark.parametrize("share", [0.0, 0.25])
def test_digits_step_with_adversarial_noise(benchmark, share):
    torch.set_num_threads(1)
    trainer = _trainer(share)
    trainer.train_step()    # warm-up
    benchmark.extra_info.update(share=share, steps=trainer.cfg.train.adversarial.steps, batch=128)
    benchmark.pedantic(trainer.train_step, rounds=8, iterations=1)
