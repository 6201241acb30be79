"""Cost of train.adversarial (docs/robustness.md): one digits demo step (128 remain + 128 forget rows,
configs/digits_forget0.json) without and with searched noise: forget rows in the generator phase
(the first option), and remain + forget rows in both phases (remain_share, phases "both").

    pytest bench/bench_adversarial.py --benchmark-json=out.json   # needs the cached demo teacher
                                                                 # (`make demo` once), CPU, 1 thread
"""
from __future__ import annotations

import pytest
import torch


SETTINGS = {
    "off": [],
    "forget25_generator": ["train.adversarial.share=0.25", "train.adversarial.phases=generator"],
    "forget25_both": ["train.adversarial.share=0.25", "train.adversarial.phases=both"],
    "forget25_remain25_both": ["train.adversarial.share=0.25", "train.adversarial.remain_share=0.25",
                               "train.adversarial.phases=both"],
}


def _trainer(sets: list):
    from sfd_fast.config import load_config
    from sfd_fast.digits.build import build_parts
    from sfd_fast.digits.pretrain import teacher_cache_path
    from sfd_fast.digits.surrogate import get_surrogate
    from sfd_fast.evaluation.attacks.adversarial import install_adversarial_noise
    from sfd_fast.trainer import SFDTrainer
    cfg = load_config("configs/digits_forget0.json", sets)
    if not teacher_cache_path(cfg).is_file():
        pytest.skip("no cached digits demo teacher: run `make demo` once")
    torch.manual_seed(0)
    trainer = SFDTrainer(cfg, build_parts(cfg), None, torch.device("cpu"))
    if cfg.train.adversarial.share:
        install_adversarial_noise(trainer, get_surrogate(cfg)[0], cfg.train.adversarial)
    return trainer


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_digits_step_with_adversarial_noise(benchmark, setting):
    torch.set_num_threads(1)
    trainer = _trainer(SETTINGS[setting])
    trainer.train_step()    # warm-up
    a = trainer.cfg.train.adversarial
    benchmark.extra_info.update(setting=setting, share=a.share, remain_share=a.remain_share, phases=a.phases,
                                steps=a.steps, batch=128)
    benchmark.pedantic(trainer.train_step, rounds=40, iterations=1)   # ~0.1 s a step: 40 rounds for a stable median
