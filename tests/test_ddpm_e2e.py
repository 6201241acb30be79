"""The tiny ddpm path end to end: import a reference YAML, train, export in the reference format,
sample PNGs with the reference naming; and the family's bad-input errors."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sfd_fast.config import ConfigError, load_config
from sfd_fast.ddpm import load_reference_checkpoint
from sfd_fast.cli import main as cli_main
from sfd_fast.ddpm.sample import reference_folder_index


# the `sfd-fast` command table: import-config, and sample/export dispatched on the run's model.kind
def import_main(argv):
    return cli_main(["import-config", *argv])


def sample_main(argv):
    return cli_main(["sample", *argv])


def export_main(argv):
    return cli_main(["export", *argv])

from .ddpm_helpers import base_list, same_weights, save, tiny_arch, tiny_state

ROOT = Path(__file__).resolve().parent.parent


def tiny_yaml(tmp_path) -> Path:
    """A reference-format YAML of the tiny network (the CIFAR-10 SFD values otherwise)."""
    text = (ROOT / "tests" / "data" / "reference_ddpm" / "cifar10_sfd.yml").read_text()
    for old, new in (("image_size: 32", "image_size: 16"), ("ch: 128", "ch: 32"), ("ch_mult: [1, 2, 2, 2]", "ch_mult: [1, 2]"),
                     ("num_res_blocks: 2", "num_res_blocks: 1"), ("attn_resolutions: [16]", "attn_resolutions: [8]"),
                     ("batch_size: 128\n    n_iters: 50000\n    snapshot_freq: 5000",
                      "batch_size: 4\n    n_iters: 3\n    snapshot_freq: 3"), ("log_freq: 50", "log_freq: 3")):
        assert old in text, old
        text = text.replace(old, new)
    p = tmp_path / "tiny_sfd.yml"
    p.write_text(text)
    return p


def test_tiny_reference_path_end_to_end(tmp_path):
    from sfd_fast.train import main as train_main
    ckpt = save(base_list(tiny_state(1), tiny_state(2)), tmp_path / "ckpt.pth")  # a reference base DDPM
    cfg_path = tmp_path / "tiny.json"
    assert import_main(["--out", str(cfg_path), str(tiny_yaml(tmp_path)), "--init_ckpt", str(ckpt),
                        "--label_to_forget", "0", "--seed", "7"]) == 0
    run = tmp_path / "run"
    from .test_ddpm_evaluate import constant_classifier
    clf = constant_classifier(tmp_path / "clf.pth", 1)  # classifies everything as class 1
    train_main(["--config", str(cfg_path), "--run-dir", str(run), "--set", "run.device=cpu", "train.progress=false",
                f"ddpm.classifier={clf}", "eval.samples_per_class=3"])
    ev = json.loads((run / "eval.json").read_text())  # end-of-run UA on the forgotten class 0
    assert (ev["ua"], ev["n_images"], ev["forget_class"], ev["step"]) == (1.0, 3, 0, 3)
    assert sorted(p.name for p in (run / "eval_samples").iterdir())[-1] == "000_00002.png"
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["step"] == 3 and all(v == v for v in (stats[-1]["fake_score_loss/remain"],
                                                           stats[-1]["generator_loss/forget"]))
    ck = run / "checkpoints" / "step-00000003"
    gen = load_file(str(ck / "generator.safetensors"))
    assert not same_weights(load_reference_checkpoint(ckpt, "ema", arch=tiny_arch()), gen)  # it trained

    out = tmp_path / "export" / "ckpt-2.pth"
    assert export_main(["--format", "reference-ddpm", "--run", str(run), "--out", str(out)]) == 0
    states = torch.load(str(out), weights_only=True)
    assert len(states) == 6 and states[4] == 2  # the reference's 0-based step index
    for entry, f in (("generator", "generator"), ("fake_score", "fake_score"), ("ema", "generator_ema")):
        assert same_weights(load_reference_checkpoint(out, entry, arch=tiny_arch()), load_file(str(ck / f"{f}.safetensors")))
    with pytest.raises(SystemExit, match="exists"):
        export_main(["--format", "reference-ddpm", "--run", str(run), "--out", str(out)])

    samples = tmp_path / "samples"
    assert sample_main(["--run", str(run), "--classes", "0,...,9", "--n-per-class", "3", "--out-dir", str(samples),
                        "--batch-size", "2", "--device", "cpu"]) == 0
    index = reference_folder_index(samples)
    assert sorted(index) == list(range(10)) and all(len(v) == 3 for v in index.values())
    assert Image.open(index[4][2]).size == (16, 16) and index[4][2].name == "004_00002.png"
    # the noise of class c depends on (seed, c) only: another batch size gives the same images
    again = tmp_path / "again"
    sample_main(["--run", str(run), "--classes", "4", "--n-per-class", "3", "--out-dir", str(again),
                 "--batch-size", "3", "--device", "cpu"])
    assert (again / "004_00002.png").read_bytes() == (samples / "004_00002.png").read_bytes()
    with pytest.raises(SystemExit, match="class 10 is not one of the model's classes"):
        sample_main(["--run", str(run), "--classes", "9,10", "--n-per-class", "1", "--out-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def _tiny_cfg(tmp_path, **sfd):
    s = tiny_state(0)
    ck = save(base_list(s, s), tmp_path / "ckpt.pth")
    data = json.loads((ROOT / "configs" / "ddpm_tiny.json").read_text())
    data["ddpm"]["checkpoint"] = str(ck)
    data["sfd"].update(sfd)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(data))
    return p


@pytest.mark.parametrize("sfd,key", [({"forget_class": 10}, "sfd.forget_class"),
                                     ({"override_class": -1}, "sfd.override_class"),
                                     ({"override_class": 0}, "sfd.override_class")])
def test_classes_outside_the_model_are_refused(tmp_path, sfd, key):
    with pytest.raises(ConfigError, match=key):
        load_config(_tiny_cfg(tmp_path, **sfd))


def test_tiny_config_loads_and_wrong_arch_stops_before_the_run(tmp_path):
    from sfd_fast.train import main as train_main
    assert load_config(_tiny_cfg(tmp_path)).ddpm.ch == 32
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match="first shape mismatch"):
        train_main(["--config", str(_tiny_cfg(tmp_path)), "--run-dir", str(run), "--set", "ddpm.ch=64"])
    assert not run.exists()  # nothing written


def test_image_folder_without_reference_naming(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "000_00001.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "airplane_1.png")
    with pytest.raises(ValueError, match="'airplane_1.png' follows the reference naming"):
        reference_folder_index(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image"):
        reference_folder_index(empty)


def test_random_weights_are_built_once(tmp_path):
    from sfd_fast.ddpm.build import build_parts
    cfg = load_config(ROOT / "configs" / "ddpm_tiny.json", [f"ddpm.checkpoint=random:{tmp_path}"])
    parts = build_parts(cfg)
    (made,) = list(tmp_path.glob("ddpm_random_*.pth"))
    stamp = made.stat().st_mtime_ns
    again = build_parts(cfg)
    assert made.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert same_weights(again.teacher.net, parts.teacher.net.state_dict())
    assert parts.generator.net.update_dropout and parts.fake_score.net.update_dropout
    assert not parts.teacher.net.update_dropout
    assert parts.sample_shape == (3, 16, 16)


def test_two_stage_teacher_is_the_stage1_fake_score(tmp_path):
    """Stage 1 (SiD over all classes, reference --label_to_forget -1), export, then SFD from the
    6-entry list: teacher = fake score = stage-1 fake score, generator = stage-1 EMA (spec §1a)."""
    from sfd_fast.ddpm.build import build_parts
    from sfd_fast.train import main as train_main
    ckpt = save(base_list(tiny_state(1), tiny_state(2)), tmp_path / "ckpt.pth")
    yml = tiny_yaml(tmp_path)
    yml.write_text(yml.read_text().replace("forget_coef: 0.01", "forget_coef: 0.0"))
    stage1 = tmp_path / "stage1.json"
    import_main(["--out", str(stage1), str(yml), "--init_ckpt", str(ckpt), "--label_to_forget", "-1"])
    run1 = tmp_path / "run1"
    train_main(["--config", str(stage1), "--run-dir", str(run1), "--set", "run.device=cpu", "train.total_steps=2",
                "train.progress=false"])
    assert json.loads((run1 / "eval.json").read_text())["skipped"][0].startswith("UA: no ddpm.classifier")
    exported = tmp_path / "ckpt-1.pth"
    export_main(["--format", "reference-ddpm", "--run", str(run1), "--out", str(exported)])
    cfg = load_config(ROOT / "configs" / "ddpm_tiny.json", [f"ddpm.checkpoint={exported}"])
    parts = build_parts(cfg)
    ck = run1 / "checkpoints" / "step-00000002"
    fake1 = load_file(str(ck / "fake_score.safetensors"))
    assert same_weights(parts.teacher.net, fake1) and same_weights(parts.fake_score.net, fake1)
    assert same_weights(parts.generator.net, load_file(str(ck / "generator_ema.safetensors")))


def test_all_classes_task_draws_every_class():
    from sfd_fast.ddpm.build import AllClassesTask
    c = AllClassesTask(10).draw(2000, 0, torch.Generator().manual_seed(0), "cpu", "generator")
    # 2000 uniform draws over 10 classes: P(some class never drawn) < 10 * 0.9^2000, negligible
    assert sorted(c.generator_cond.unique().tolist()) == list(range(10)) and not c.is_forget.any()


def test_missing_classifier_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="'ddpm.classifier' = .*does not exist"):
        load_config(_tiny_cfg(tmp_path), [f"ddpm.classifier={tmp_path / 'nope.pth'}"])
