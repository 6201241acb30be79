"""train.adversarial: generator-phase forget rows take searched noise within the budget, remain rows
and the fake-score phase are untouched, the RNG stream and therefore replay stay exact."""
import copy
import json

import pytest
import torch
from torch import nn

from sfd_fast.config import load_config
from sfd_fast.digits.build import build_parts as build_digits_parts
from sfd_fast.evaluation.attacks.adversarial import adversarial_forget_rows, install_adversarial_noise
from sfd_fast.trainer import SFDTrainer
from tests.helpers import tiny_digits_config

REL = 1e-5   # float32 norms of 64-vectors


def _trainer(tmp_path, share=0.5):
    cfg = load_config(tiny_digits_config(tmp_path), [f"train.adversarial.share={share}", "train.adversarial.steps=3"])
    torch.manual_seed(cfg.run.seed)
    trainer = SFDTrainer(cfg, build_digits_parts(cfg), tmp_path / "run", torch.device("cpu"))
    torch.manual_seed(1)
    surrogate = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    return cfg, trainer, surrogate


def test_rows_are_the_first_share_of_the_forget_rows():
    assert adversarial_forget_rows(8, 8, 0.5) == slice(8, 12)
    assert adversarial_forget_rows(8, 8, 0.01) == slice(8, 9)       # any share > 0 searches one row
    assert adversarial_forget_rows(8, 8, 1.0) == slice(8, 16)
    assert adversarial_forget_rows(8, 0, 0.5) == slice(8, 8)


def test_generator_draws_carry_searched_forget_noise_within_budget(tmp_path):
    cfg, trainer, surrogate = _trainer(tmp_path)
    state = trainer.rng.get_state()
    plain = trainer.backend.draw("generator", 1.0, 1.0)
    plain_fake = trainer.backend.draw("fake_score", 1.0, 1.0)
    install_adversarial_noise(trainer, surrogate, cfg.train.adversarial)
    trainer.rng.set_state(state)
    adv = trainer.backend.draw("generator", 1.0, 1.0)
    adv_fake = trainer.backend.draw("fake_score", 1.0, 1.0)
    assert torch.equal(adv_fake.z, plain_fake.z)                        # same stream, fake phase untouched
    assert torch.equal(adv.z[:8], plain.z[:8]) and torch.equal(adv.z[12:], plain.z[12:])
    z0, z = plain.z[8:12], adv.z[8:12]
    n0 = z0.flatten(1).norm(dim=1)
    assert not torch.equal(z, z0)
    assert torch.allclose(z.flatten(1).norm(dim=1), n0, rtol=REL)
    assert ((z - z0).flatten(1).norm(dim=1) <= cfg.train.adversarial.radius * n0 * (1 + REL)).all()
    for k in ("noise", "t"):
        assert torch.equal(getattr(adv, k), getattr(plain, k))


def test_adversarial_training_steps_replay_exactly(tmp_path):
    weights = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        cfg, trainer, surrogate = _trainer(tmp_path / str(i))
        install_adversarial_noise(trainer, copy.deepcopy(surrogate), cfg.train.adversarial)
        for _ in range(2):
            trainer.train_step()
        weights.append([p.detach().clone() for p in trainer.generator.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_adversarial_training_from_the_config(tmp_path):
    from tests.test_attacks_e2e import tiny_auto_config
    from sfd_fast.train import main as train_main
    path = tiny_auto_config(tmp_path, {"enabled": False})
    train_main(["--config", path, "--set", "train.adversarial.share=0.25", "train.adversarial.steps=2",
                "eval.enabled=false"])
    assert list((tmp_path / "runs" / "cache").glob("digits-surrogate-*.safetensors"))
    assert json.loads((tmp_path / "runs" / "tiny" / "config.json").read_text())["train"]["adversarial"]["share"] == 0.25


@pytest.mark.parametrize("setting, key", [("train.adversarial.share=1.5", "train.adversarial.share"),
                                          ("train.adversarial.steps=0", "train.adversarial.steps"),
                                          ("train.adversarial.radius=3", "train.adversarial.radius")])
def test_bad_adversarial_settings(tmp_path, setting, key):
    from sfd_fast.errors import UserError
    extra = [] if "share" in setting else ["train.adversarial.share=0.5"]
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(tiny_digits_config(tmp_path), [setting, *extra])
