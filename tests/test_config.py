"""Bad input stops before training with a message that names the key/file and what to do."""
import json

import pytest

from sfd_fast import train
from sfd_fast.config import ConfigError, load_config

from .helpers import tiny_digits_config


def _write(tmp_path, data):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(data))
    return p


def test_shipped_digits_config_loads():
    cfg = load_config("configs/digits_forget0.json")
    assert cfg.sfd.forget_class == 0 and cfg.sfd.override_class == 1
    assert cfg.optim.generator.betas == [0.0, 0.999]


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, {"train": {"batch_sise": 4}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "train.batch_sise" in str(e.value) and str(p) in str(e.value)


def test_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size' must be int"):
        load_config(_write(tmp_path, {"train": {"batch_size": "eight"}}))


@pytest.mark.parametrize("overrides,needle", [
    (["sfd.forget_class=10"], "sfd.forget_class"),
    (["sfd.forget_class=-1"], "sfd.forget_class"),
    (["sfd.override_class=0"], "equals sfd.forget_class"),
    (["model.teacher=/nonexistent/teacher.safetensors"], "model.teacher"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.batch_size=-4"], "train.batch_size"),
    (["optim.generator.lr=0"], "optim.generator.lr"),
    (["optim.fake_score.lr=-1e-4"], "optim.fake_score.lr"),
    (["train.grad_accum=3"], "must divide"),
    (["sfd.t_min=800"], "t_min"),
])
def test_bad_values_stop_before_training(tmp_path, overrides, needle):
    cfg_path = tiny_digits_config(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(cfg_path), "--set", *overrides])
    assert needle in str(e.value)
    assert not (tmp_path / "runs" / "tiny").exists()  # nothing written


def test_set_overrides_parse_json(tmp_path):
    cfg = load_config(tiny_digits_config(tmp_path), ["train.total_steps=11", "run.name=abc",
                                                     "optim.generator.betas=[0.5, 0.9]"])
    assert cfg.train.total_steps == 11 and cfg.run.name == "abc" and cfg.optim.generator.betas == [0.5, 0.9]


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.json")


def test_existing_run_dir_refused(tmp_path):
    cfg_path = tiny_digits_config(tmp_path)
    train.main(["--config", str(cfg_path), "--set", "train.total_steps=1"])
    with pytest.raises(SystemExit, match="--resume"):
        train.main(["--config", str(cfg_path)])
