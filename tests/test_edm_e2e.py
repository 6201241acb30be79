"""The tiny edm path end to end (configs/edm_tiny.json: train with end-of-run UA, grid, sample,
export to safetensors and to the EDM record form) and the family's bad-input errors."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sfd_fast.cli import main as cli_main
from sfd_fast.config import ConfigError, load_config
from sfd_fast.ddpm.sample import reference_folder_index
from sfd_fast.edm import load_snapshot
from sfd_fast.edm.record_pickle import records_of

from .edm_helpers import write_snapshot

ROOT = Path(__file__).resolve().parent.parent
OUR_SOURCE = "from sfd_fast.edm.layers import *\nfrom sfd_fast.edm.unets import *\nfrom sfd_fast.edm.precond import *\n"


def test_edm_tiny_end_to_end(tmp_path):
    from sfd_fast.train import main as train_main

    from .test_ddpm_evaluate import constant_classifier
    clf = constant_classifier(tmp_path / "clf.pth", 1)    # classifies everything as class 1
    run = tmp_path / "run"
    train_main(["--config", str(ROOT / "configs" / "edm_tiny.json"), "--run-dir", str(run), "--set",
                f"edm.snapshot=random:{tmp_path / 'cache'}", "train.progress=false", "train.total_steps=2",
                "train.checkpoint_every=2", "train.sample_every=2", "train.log_every=1", "eval.enabled=true",
                f"edm.classifier={clf}", "eval.samples_per_class=2"])
    ev = json.loads((run / "eval.json").read_text())           # end-of-run UA on the forgotten class 0
    assert (ev["ua"], ev["n_images"], ev["forget_class"], ev["step"]) == (1.0, 2, 0, 2)
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    last = [s for s in stats if "fake_score_loss/remain" in s][-1]
    assert last["step"] == 2 and all(v == v for v in (last["fake_score_loss/remain"], last["generator_loss/forget"]))
    grid = Image.open(run / "samples" / "step-00000002.png")     # 10 class rows x edm.grid_per_class (2)
    assert grid.size == (2 * 16, 10 * 16)
    ck = run / "checkpoints" / "step-00000002"
    teacher = load_snapshot(next((tmp_path / "cache").glob("edm_random_*.safetensors")))
    gen = load_file(str(ck / "generator.safetensors"))
    assert set(gen) == set(teacher.state_dict())                # EDM's parameter names, one to one
    assert any(not torch.equal(gen[k], v) for k, v in teacher.state_dict().items())   # it trained

    # export: safetensors (read back by load_snapshot) and the record form with a template's source
    st = tmp_path / "g.safetensors"
    cli_main(["export", "--run", str(run), "--format", "edm-safetensors", "--out", str(st)])
    ema = load_file(str(ck / "generator_ema.safetensors"))
    assert all(torch.equal(v, ema[k]) for k, v in load_snapshot(st).state_dict().items())
    template = write_snapshot(tmp_path / "teacher.pkl", {"ema": records_of(teacher, OUR_SOURCE, {})})
    pkl = tmp_path / "network-snapshot.pkl"
    with pytest.raises(SystemExit, match="needs --template"):
        cli_main(["export", "--run", str(run), "--format", "edm-snapshot", "--out", str(pkl)])
    cli_main(["export", "--run", str(run), "--format", "edm-snapshot", "--template", str(template), "--out", str(pkl)])
    assert all(torch.equal(v, ema[k]) for k, v in load_snapshot(pkl).state_dict().items())
    assert b"sfd_fast" not in pkl.read_bytes().replace(OUR_SOURCE.encode(), b"")   # no code of ours referenced
    with pytest.raises(SystemExit, match="exists"):
        cli_main(["export", "--run", str(run), "--format", "edm-safetensors", "--out", str(st)])

    samples = tmp_path / "samples"
    cli_main(["sample", "--run", str(run), "--classes", "0-9", "--n-per-class", "2", "--out-dir", str(samples),
              "--batch-size", "3", "--device", "cpu"])
    index = reference_folder_index(samples)
    assert sorted(index) == list(range(10)) and all(len(v) == 2 for v in index.values())
    assert Image.open(index[4][1]).size == (16, 16)
    heun = tmp_path / "heun"
    cli_main(["sample", "--run", str(run), "--classes", "3", "--n-per-class", "1", "--out-dir", str(heun),
              "--heun-steps", "3", "--device", "cpu"])
    assert (heun / "003_00000.png").is_file()


def _tiny(tmp_path, **edm):
    data = json.loads((ROOT / "configs" / "edm_tiny.json").read_text())
    data["edm"]["snapshot"] = f"random:{tmp_path}"
    data["edm"].update(edm)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(data))
    return p


@pytest.mark.parametrize("override,key", [({"sfd.forget_class": 10}, "sfd.forget_class"),
                                          ({"sfd.override_class": 0}, "sfd.override_class"),
                                          ({"sfd.num_classes": 5}, "sfd.num_classes"),
                                          ({"edm.sigma_init": -1}, "edm.sigma_init"),
                                          ({"edm.dropout": 1.5}, "edm.dropout"),
                                          ({"edm.network.bogus": 1}, "edm.network"),
                                          ({"edm.snapshot": "missing.pkl"}, "edm.snapshot"),
                                          ({"edm.snapshot": ""}, "edm.snapshot")])
def test_bad_edm_configs_are_refused(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(_tiny(tmp_path), [f"{k}={json.dumps(v)}" for k, v in override.items()])


def test_unknown_snapshot_class_stops_before_the_run(tmp_path):
    from sfd_fast.train import main as train_main
    net = load_snapshot_from_tiny(tmp_path)
    rec = records_of(net, "open('pwned', 'w')", {})
    rec.meta["class_name"] = rec.class_name = "StyleGAN2"
    snap = write_snapshot(tmp_path / "s.pkl", {"ema": rec})
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        train_main(["--config", str(_tiny(tmp_path)), "--run-dir", str(run), "--set", f"edm.snapshot={snap}"])
    assert not run.exists() and not (ROOT / "pwned").exists()
    with pytest.raises(ConfigError, match="network class 'StyleGAN2' is not supported"):
        load_config(_tiny(tmp_path), [f"edm.snapshot={snap}"])


def load_snapshot_from_tiny(tmp_path):
    from sfd_fast.edm.build import resolve_snapshot
    return load_snapshot(resolve_snapshot(load_config(_tiny(tmp_path))))


def test_import_sid_edm_command(tmp_path):
    out = tmp_path / "imported.json"
    flags = ["--edm_model", "cifar10-cond", "--cond", "1", "--alpha", "1.2", "--tmax", "800", "--init_sigma", "2.5",
             "--batch", "256", "--batch-gpu", "16", "--lr", "1e-5", "--glr", "1e-5", "--duration", "20.48",
             "--augment", "0", "--label_to_forget", "0", "--label_to_override", "1", "--seed", "0", "--tick", "10",
             "--snap", "50", "--arch", "ddpmpp", "--fp16", "0", "--ls", "1", "--lsg", "100"]
    cli_main(["import-config", "--out", str(out), "sid-edm", *flags])
    d = json.loads(out.read_text())
    shipped = json.loads((ROOT / "configs" / "cifar10_edm_forget0.json").read_text())
    for section in ("sfd", "optim", "train", "schedule", "model", "engine"):
        assert d[section] == shipped[section], section      # the shipped config is this import
    assert d["edm"]["snapshot"] == "edm-cifar10-32x32-cond-vp.pkl" and d["edm"]["sigma_init"] == 2.5
    assert (d["train"]["batch_size"], d["train"]["total_steps"], d["train"]["grad_accum"]) == (256, 80000, 16)
    assert d["train"]["ema"]["halflife_kimg"] == 500 and d["edm"]["dropout"] == 0.13
    assert (d["sfd"]["t_min"], d["sfd"]["t_max"], d["sfd"]["alpha"]) == (0, 800, 1.2)
    assert d["optim"]["generator"]["betas"] == [0.0, 0.999]
    for bad, msg in ((["--augment", "0.12"], "--augment 0.12"), (["--cond", "0"], "--cond 0"),
                     (["--resume", "x.pt"], "--resume"), (["--bogus", "1"], "--bogus")):
        with pytest.raises(SystemExit, match=msg):
            cli_main(["import-config", "--force", "--out", str(out), "sid-edm", *flags, *bad])


def test_precond_override(tmp_path):
    """edm.precond re-wraps the snapshot's backbone weights (SiD's sid_train.py builds EDMPrecond and
    copies the snapshot's weights into it by name)."""
    from sfd_fast.edm.build import build_parts, run_network
    cfg = load_config(_tiny(tmp_path, precond="EDMPrecond"))
    parts = build_parts(cfg)
    snap = load_snapshot_from_tiny(tmp_path)
    for den in (parts.teacher, parts.fake_score, parts.generator.denoiser):
        assert type(den.net).__name__ == "EDMPrecond" and den.net.sigma_data == 0.5
        assert all(torch.equal(v, snap.state_dict()[k]) for k, v in den.net.state_dict().items())
    name, kwargs = run_network(cfg)
    assert name == "training.networks.EDMPrecond" and "beta_d" not in kwargs and kwargs["model_channels"] == 16
    x, s = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0])
    with torch.no_grad():        # EDM's c_in / c_noise, not VP's: a different function of the same weights
        assert not torch.allclose(parts.teacher.net(x, s, torch.eye(10)[:2]), snap(x, s, torch.eye(10)[:2]))
    with pytest.raises(ConfigError, match="edm.precond"):
        load_config(_tiny(tmp_path, precond="iDDPMPrecond"))
