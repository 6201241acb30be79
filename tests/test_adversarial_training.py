"""train.adversarial: generator-phase forget rows take searched noise within the budget; remain rows
and the fake-score phase only when asked (remain_share, phases "both"); the RNG stream and therefore
replay stay exact."""
import copy
import json

import pytest
import torch
from torch import nn

from sfd_fast.config import load_config
from sfd_fast.digits.build import build_parts as build_digits_parts
from sfd_fast.evaluation.attacks.adversarial import (adversarial_forget_rows, adversarial_rows,
                                                     install_adversarial_noise)
from sfd_fast.trainer import SFDTrainer
from tests.helpers import tiny_digits_config

REL = 1e-5   # float32 norms of 64-vectors


def _trainer(tmp_path, share=0.5, extra=()):
    cfg = load_config(tiny_digits_config(tmp_path), [f"train.adversarial.share={share}", "train.adversarial.steps=3",
                                                      *extra])
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
    cfg, trainer, surrogate = _trainer(tmp_path, extra=["train.adversarial.phases=generator"])
    state = trainer.rng.get_state()
    plain = trainer.backend.draw("generator", 1.0, 1.0)
    plain_fake = trainer.backend.draw("fake_score", 1.0, 1.0)
    install_adversarial_noise(trainer, surrogate, cfg.train.adversarial)
    trainer.rng.set_state(state)
    adv = trainer.backend.draw("generator", 1.0, 1.0)
    adv_fake = trainer.backend.draw("fake_score", 1.0, 1.0)
    assert torch.equal(adv_fake.z, plain_fake.z)                        # same stream, fake phase untouched
    assert torch.equal(adv.z[:8], plain.z[:8]) and torch.equal(adv.z[12:], plain.z[12:])
    assert not torch.equal(adv.z[8:12], plain.z[8:12])
    _assert_within_budget(adv.z[8:12], plain.z[8:12], cfg.train.adversarial.radius)
    for k in ("noise", "t"):
        assert torch.equal(getattr(adv, k), getattr(plain, k))


@pytest.mark.parametrize("extra", [["train.adversarial.phases=generator"],
                                   ["train.adversarial.remain_share=0.5", "train.adversarial.phases=both"]])
def test_adversarial_training_steps_replay_exactly(tmp_path, extra):
    weights = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        cfg, trainer, surrogate = _trainer(tmp_path / str(i), extra=extra)
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


def _assert_within_budget(z, z0, radius):
    n0 = z0.flatten(1).norm(dim=1)
    assert torch.allclose(z.flatten(1).norm(dim=1), n0, rtol=REL)
    assert ((z - z0).flatten(1).norm(dim=1) <= radius * n0 * (1 + REL)).all()


def test_remain_rows_aim_at_the_forgotten_classes():
    forgotten = torch.tensor([0, 7, 0, 7])               # classes of 4 forget rows after 6 remain rows
    rows, targets = adversarial_rows(6, forgotten, 0.5, 0.5)
    assert rows.tolist() == [0, 1, 2, 6, 7]             # ceil(0.5 x 6) remain rows, ceil(0.5 x 4) forget rows
    assert targets.tolist() == [0, 7, 0, 0, 7]          # remain row j -> forget row j mod 4's class
    rows, targets = adversarial_rows(6, forgotten, 0.25, 0.0)
    assert rows.tolist() == [6] and targets.tolist() == [0]
    assert adversarial_rows(6, forgotten[:0], 1.0, 1.0) == (None, None)   # no forget rows: nothing to aim at


@pytest.mark.parametrize("phases", ["generator", "both"])
def test_remain_share_and_phases(tmp_path, phases):
    cfg, trainer, surrogate = _trainer(tmp_path, extra=["train.adversarial.remain_share=0.25",
                                                        f"train.adversarial.phases={phases}"])
    state = trainer.rng.get_state()
    plain = trainer.backend.draw("generator", 1.0, 1.0)
    plain_fake = trainer.backend.draw("fake_score", 1.0, 1.0)
    install_adversarial_noise(trainer, surrogate, cfg.train.adversarial)
    trainer.rng.set_state(state)
    adv = trainer.backend.draw("generator", 1.0, 1.0)
    adv_fake = trainer.backend.draw("fake_score", 1.0, 1.0)
    # 8 remain rows then 8 forget rows: remain rows 0-1 (ceil 0.25 x 8) and forget rows 8-11 are searched
    for new, old in ((adv, plain), (adv_fake, plain_fake)) if phases == "both" else ((adv, plain),):
        searched = [0, 1, 8, 9, 10, 11]
        kept = [i for i in range(16) if i not in searched]
        assert torch.equal(new.z[kept], old.z[kept])
        assert not torch.equal(new.z[[0, 1]], old.z[[0, 1]])
        _assert_within_budget(new.z[searched], old.z[searched], cfg.train.adversarial.radius)
        assert torch.equal(new.cond.generator_cond, old.cond.generator_cond)
    if phases == "generator":
        assert torch.equal(adv_fake.z, plain_fake.z)


def test_both_phases_is_the_default():
    from sfd_fast.evaluation.attacks.config import AdversarialTrainingConfig
    assert AdversarialTrainingConfig().phases == "both"


def test_remain_rows_move_towards_the_forgotten_class(tmp_path):
    """The remain rows' search raises the surrogate's log-probability of the forgotten class."""
    cfg, trainer, surrogate = _trainer(tmp_path, share=1.0, extra=["train.adversarial.remain_share=1.0"])
    state = trainer.rng.get_state()
    plain = trainer.backend.draw("generator", 1.0, 1.0)
    install_adversarial_noise(trainer, surrogate, cfg.train.adversarial)
    trainer.rng.set_state(state)
    adv = trainer.backend.draw("generator", 1.0, 1.0)
    forget = cfg.sfd.forget_class

    def logp(z):
        with torch.no_grad():
            x = trainer.generator(z[:8], plain.cond.generator_cond[:8])
            return torch.log_softmax(surrogate(x), 1)[:, forget]
    assert (logp(adv.z) > logp(plain.z)).all()


def test_retrain_reference_is_the_plain_recipe(tmp_path):
    from sfd_fast.digits.retrain import retrain_config
    cfg = load_config(tiny_digits_config(tmp_path), ["train.adversarial.share=0.5", "train.adversarial.remain_share=0.5"])
    d = retrain_config(cfg, tmp_path / "teacher.safetensors")
    assert d["train"]["adversarial"]["share"] == 0 and d["train"]["adversarial"]["remain_share"] == 0


@pytest.mark.parametrize("setting, key", [("train.adversarial.share=1.5", "train.adversarial.share"),
                                          ("train.adversarial.remain_share=-0.1", "train.adversarial.remain_share"),
                                          ("train.adversarial.phases=fake", "train.adversarial.phases"),
                                          ("train.adversarial.steps=0", "train.adversarial.steps"),
                                          ("train.adversarial.radius=3", "train.adversarial.radius")])
def test_bad_adversarial_settings(tmp_path, setting, key):
    from sfd_fast.errors import UserError
    extra = [] if "share" in setting else ["train.adversarial.share=0.5"]
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(tiny_digits_config(tmp_path), [setting, *extra])
