"""import-config: reference DDPM YAMLs (+ train.py flags) and SD train.py flags -> sfd-fast configs."""
import json
from pathlib import Path

import pytest

from sfd_fast.config import ConfigError, load_config
from sfd_fast.ddpm.import_config import ImportError_, convert, main

ROOT = Path(__file__).resolve().parent.parent
YAMLS = ROOT / "tests" / "data" / "reference_ddpm"
SHIPPED = [("cifar10_sfd.yml", "cifar10_forget0.json", "checkpoints/cifar10_ddpm/ckpt.pth"),
           ("cifar10_sfd_2stage.yml", "cifar10_forget0_2stage.json", "checkpoints/cifar10_sid/ckpt-49999.pth"),
           ("stl10_sfd.yml", "stl10_forget0.json", "checkpoints/stl10_ddpm/ckpt.pth")]
# the reference README's flags for each (stage 1 of the two-stage setting: no class forgotten)
FLAGS = {"cifar10_sid.yml": ["--label_to_forget", "-1", "--mode", "sfd", "--sample_type", "one_step",
                             "--cond_scale", "0"]}


@pytest.mark.parametrize("yml,shipped,ckpt", SHIPPED + [("cifar10_sid.yml", "cifar10_sid_stage1.json",
                                                          "checkpoints/cifar10_ddpm/ckpt.pth")])
def test_import_of_each_reference_yaml_equals_the_shipped_config(yml, shipped, ckpt):
    flags = ["--init_ckpt", ckpt] + FLAGS.get(yml, ["--label_to_forget", "0"]) + ["--seed", "1234"]
    assert convert(str(YAMLS / yml), flags) == json.loads((ROOT / "configs" / shipped).read_text())


def test_stage1_config_distils_all_classes():
    c = json.loads((ROOT / "configs" / "cifar10_sid_stage1.json").read_text())
    s = c["sfd"]
    assert (s["forget_class"], s["sg_forget_coef"], s["g_forget_coef"]) == (-1, 0.0, 0.0)
    assert (c["optim"]["fake_score"]["lr"], c["optim"]["generator"]["lr"]) == (3e-5, 1e-5)


@pytest.mark.parametrize("yml,shipped,ckpt", SHIPPED)
def test_shipped_configs_hold_the_reference_values(yml, shipped, ckpt):
    """Spec §2.1, stated independently of the importer."""
    c = json.loads((ROOT / "configs" / shipped).read_text())
    stl = yml.startswith("stl10")
    assert c["train"]["batch_size"] == (64 if stl else 128)
    assert c["optim"]["fake_score"]["lr"] == (1e-5 if yml == "cifar10_sfd.yml" else 3e-5)
    assert c["optim"]["generator"]["lr"] == 1e-5
    for role in ("fake_score", "generator"):
        assert c["optim"][role]["betas"] == [0.0, 0.999] and c["optim"][role]["grad_clip_value"] == 1.0
    s = c["sfd"]
    assert (s["alpha"], s["t_init"], s["t_min"], s["t_max"]) == (1.2, 440, 38, 712)
    assert (s["sg_forget_coef"], s["g_forget_coef"], s["sg_remain_coef"]) == (0.01, 0.01, 1.0)
    assert (s["forget_class"], s["override"], s["override_class"]) == (0, "fixed", 1)
    assert c["train"]["ema"]["decay"] == 0.9999
    d = c["ddpm"]
    assert d["ch"] == 128 and d["ch_mult"] == ([1, 2, 2, 2, 4] if stl else [1, 2, 2, 2])
    assert d["image_size"] == (64 if stl else 32) and d["attn_resolutions"] == [16] and d["dropout"] == 0.1
    assert d["init_from_ema"] is True and d["train_mode_dropout"] is True
    assert d["checkpoint"] == ckpt
    assert c["eval"]["samples_per_class"] == (1300 if stl else 5000)  # the reference's UA sample counts


def test_shipped_config_validates_once_the_checkpoint_exists(tmp_path):
    """The shipped config, pointed at a checkpoint that does not fit, stops with the key named."""
    from .ddpm_helpers import base_list, save, tiny_state
    s = tiny_state(0)
    ck = save(base_list(s, s), tmp_path / "ckpt.pth")
    with pytest.raises(ConfigError, match="ddpm.checkpoint.*does not fit the ddpm network"):
        load_config(ROOT / "configs" / "cifar10_forget0.json", [f"ddpm.checkpoint={ck}"])
    with pytest.raises(ConfigError, match="'ddpm.checkpoint' = .*does not exist"):
        load_config(ROOT / "configs" / "cifar10_forget0.json")


def _yaml_with(tmp_path, old, new):
    text = (YAMLS / "cifar10_sfd.yml").read_text()
    assert old in text
    p = tmp_path / "cfg.yml"
    p.write_text(text.replace(old, new))
    return str(p)


@pytest.mark.parametrize("old,new,named", [
    ("use_clf: false", "use_clf: true", "distill.use_clf"),
    ("init_from_ema: true", "init_from_ema: true\n    mystery_knob: 3", "distill.mystery_knob"),
    ("rescaled: true", "rescaled: false", "data.rescaled"),
    ("type: sid", "type: simple", "model.type"),
    ("beta_schedule: linear", "beta_schedule: quad", "diffusion.beta_schedule"),
    ('optimizer: Adam\n    lr: 1.0e-5', 'optimizer: SGD\n    lr: 1.0e-5', "optimizer"),
    ("label_to_override: 1\n    pseudo_label_type: rand", "label_to_override: null\n    pseudo_label_type: amax",
     "pseudo_label_type"),
])
def test_unsupported_yaml_options_are_named(tmp_path, old, new, named):
    with pytest.raises(ImportError_, match=named):
        convert(_yaml_with(tmp_path, old, new), [])


def test_rand_pseudo_labels_without_override_become_random_override(tmp_path):
    c = convert(_yaml_with(tmp_path, "label_to_override: 1", "label_to_override: null"), ["--label_to_forget", "3"])
    assert c["sfd"]["override"] == "random" and c["sfd"]["forget_class"] == 3


def test_unknown_and_unsupported_flags_stop_without_writing(tmp_path):
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit, match="--reuse_ema"):
        main(["--out", str(out), str(YAMLS / "cifar10_sfd.yml"), "--reuse_ema", "1", "--seed", "1"])
    with pytest.raises(SystemExit, match="label_to_forget -1"):
        main(["--out", str(out), str(YAMLS / "cifar10_sfd.yml"), "--label_to_forget", "-1"])
    with pytest.raises(SystemExit, match="--num_steps 2"):
        main(["--out", str(out), "sd-train", "--data_prompt_text", "p", "--num_steps", "2"])
    with pytest.raises(SystemExit, match="--foo"):
        main(["--out", str(out), "sd-train", "--data_prompt_text", "p", "--foo", "1"])
    assert not out.exists()


RUN_SFD_SH = ["--outdir", "out", "--data", "/data/x", "--batch", "8", "--batch-gpu", "2", "--lr", "3e-6",
              "--glr", "1e-6", "--cfg_train_fake", "4.5", "--cfg_eval_fake", "4.5", "--cfg_eval_real", "4.5",
              "--optimizer", "adam", "--resolution", "512", "--alpha", "1", "--init_timestep", "625",
              "--fp16", "1", "--sd_model", "runwayml/stable-diffusion-v1-5", "--tick", "1", "--snap", "5",
              "--dump", "5", "--duration", "1", "--ema", "0.0", "--from_distill_ema", "g.pkl",
              "--data_prompt_text", "/data/datasets/aesthetics_6_plus",
              "--forget_data_prompt_text", "prompts/brad_pitt_prompts.txt",
              "--concept_to_forget", "brad pitt", "--concept_to_override", "a middle aged man",
              "--sg_remain_coef", "1", "--sg_forget_coef", "1", "--g_remain_coef", "1", "--g_forget_coef", "1"]


def test_sd_train_flags(tmp_path):
    out = tmp_path / "sd.json"
    assert main(["--out", str(out), "sd-train", *RUN_SFD_SH]) == 0
    c = json.loads(out.read_text())
    assert c["model"] == {"kind": "stable_diffusion", "pretrained": "runwayml/stable-diffusion-v1-5",
                          "generator_init": "g.pkl", "trust_pickle": False}
    assert c["train"]["batch_size"] == 8 and c["train"]["grad_accum"] == 4
    assert c["train"]["total_steps"] == 125000  # 1 Mimg / 8 (spec §2.2)
    assert c["train"]["log_every"] == 125 and c["train"]["checkpoint_every"] == 625
    assert c["train"]["ema"]["halflife_kimg"] == 0.0
    assert (c["optim"]["fake_score"]["lr"], c["optim"]["generator"]["lr"]) == (3e-6, 1e-6)
    s = c["sfd"]
    assert (s["t_init"], s["t_min"], s["t_max"], s["alpha"]) == (625, 20, 980, 1.0)
    assert (s["cfg_train_fake"], s["cfg_eval_fake"], s["cfg_eval_real"]) == (4.5, 4.5, 4.5)
    assert c["engine"]["precision"] == "bf16"
    p = c["prompts"]
    assert (p["concept_to_forget"], p["concept_to_override"]) == ("brad pitt", "a middle aged man")
    assert p["use_neg"] == [False, False, True]
