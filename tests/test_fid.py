"""FID / Inception Score of ddpm samples (torchmetrics on our FID Inception; random weights in the
weight file's layout). Few, small images: one 32 px image costs ~6 GFLOP once resized to 299, and
each FID costs an eigen-decomposition of a 2048 x 2048 matrix (~5 s on one core): few FID calls."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sfd_fast.config import ConfigError, load_config
from sfd_fast.ddpm.evaluate import main
from sfd_fast.evaluation.fid import fid_inception_score, image_files, inception_rows
from sfd_fast.evaluation.inception import load_inception

from .inception_helpers import random_arrays, random_inception_state, save_random_inception, write_images


def hide_torchmetrics(monkeypatch):
    """As if the eval extra were not installed: every torchmetrics module fails to import."""
    for name in [k for k in sys.modules if k == "torchmetrics" or k.startswith("torchmetrics.")] + ["torchmetrics"]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_random_inception(tmp_path_factory.mktemp("inception") / "w.pth", seed=0)


@pytest.fixture(scope="module")
def net(weights):
    return load_inception(weights)


def test_fid_with_itself_is_zero_and_grows_with_a_shift(tmp_path, net):
    a = image_files(write_images(tmp_path / "a", random_arrays(4)))
    b = image_files(write_images(tmp_path / "b", random_arrays(4, offset=50)))  # every pixel +50
    same = fid_inception_score(a, a, net, splits=2, progress=False)
    # FID(X, X) is 0 in exact arithmetic; torchmetrics takes sqrt of the eigenvalues of S @ S in float64,
    # and the ~2040 null eigenvalues (4 images, 2048 features) come out as +-eps * ||S||^2, whose square
    # roots add up to at most d * sqrt(eps) * ||S||: twice that (the -2 Tr term) is the bound
    rows = torch.cat(list(inception_rows(net, a, "cpu", 8, False, ""))).double()
    s_norm = torch.linalg.matrix_norm(torch.cov(rows[:, :2048].T), 2).item()
    tol = 2 * 2048 * np.finfo(np.float64).eps ** 0.5 * s_norm
    assert abs(same["fid"]) <= tol, (same["fid"], tol)
    shifted = fid_inception_score(a, b, net, splits=2, progress=False)
    assert shifted["fid"] > 1e4 * tol and shifted["fid"] > 1.0
    assert (shifted["n_samples"], shifted["n_real"], shifted["is_splits"]) == (4, 4, 2)
    # the Inception Score only sees the samples: the same for both calls, and seeded (reproducible)
    assert shifted["inception_score_mean"] == same["inception_score_mean"]
    assert shifted["inception_score_std"] == same["inception_score_std"]


def test_inception_score_of_identical_images_is_one(tmp_path, net):
    one = random_arrays(1, seed=3)[0]
    files = image_files(write_images(tmp_path / "same", [one] * 4))
    r = fid_inception_score(files, files, net, splits=2, progress=False)
    # every row has the same softmax p, so each split's KL(p || mean p) is 0 up to float64 rounding
    assert r["inception_score_mean"] == pytest.approx(1.0, abs=1e-9)
    assert r["inception_score_std"] == pytest.approx(0.0, abs=1e-9)


def test_mixed_sizes_and_grey_images_are_read(tmp_path, net):
    real = tmp_path / "real" / "sub"
    real.mkdir(parents=True)
    Image.fromarray(random_arrays(1, size=32)[0].astype(np.uint8)).save(real / "a.png")
    Image.fromarray(random_arrays(1, size=40, seed=1)[0][:, :, 0].astype(np.uint8), "L").save(real / "b.jpg")
    files = image_files(tmp_path / "real")  # recursive
    assert [f.name for f in files] == ["a.png", "b.jpg"]
    rows = torch.cat(list(inception_rows(net, files, "cpu", 2, False, "")))
    alone = torch.cat(list(inception_rows(net, files[1:], "cpu", 1, False, "")))
    assert rows.shape == (2, 3056)
    # the grey 40 px image gives the same row in a mixed batch as alone: same ops on the same input
    torch.testing.assert_close(rows[1:], alone, rtol=1e-5, atol=1e-5 * alone.abs().max().item())


def _samples(tmp_path):
    """2 images of class 0 (the forgotten one) and 3 each of classes 1 and 2."""
    return write_images(tmp_path / "samples", random_arrays(8, seed=5), classes=[0, 0, 1, 1, 1, 2, 2, 2])


def test_cli_fid_excludes_the_forgotten_class_and_writes_eval_json(tmp_path, weights):
    images = _samples(tmp_path)
    real = write_images(tmp_path / "real", random_arrays(3, seed=9))
    assert main(["--images", str(images), "--fid-real", str(real), "--inception-weights", str(weights),
                 "--is-splits", "2"]) == 0
    ev = json.loads((images / "eval.json").read_text())
    assert (ev["fid_n_samples"], ev["fid_n_real"], ev["fid_classes"], ev["is_splits"]) == (6, 3, [1, 2], 2)
    assert ev["fid"] > 0 and ev["inception_score_mean"] >= 1.0 and "ua" not in ev


def test_cli_bad_fid_inputs_write_nothing(tmp_path, weights, monkeypatch):
    images = _samples(tmp_path)
    real = write_images(tmp_path / "real", random_arrays(2))
    out = tmp_path / "x.json"

    def run(*extra):
        return main(["--images", str(images), "--out", str(out), "--is-splits", "2", *extra])
    ok = ("--fid-real", str(real), "--inception-weights", str(weights))
    with pytest.raises(SystemExit, match="nothing to evaluate"):
        run()
    with pytest.raises(SystemExit, match="--is-splits must be >= 2"):
        run(*ok, "--is-splits", "1")
    with pytest.raises(SystemExit, match="need both --fid-real DIR and --inception-weights"):
        run("--fid-real", str(real))
    with pytest.raises(SystemExit, match="--inception-weights: .*nope.pth does not exist; give torch-fidelity's"):
        run("--fid-real", str(real), "--inception-weights", str(tmp_path / "nope.pth"))
    state = random_inception_state(0)
    state["Mixed_7c.branch_pool.conv.weight"] = torch.zeros(192, 2048, 3, 3)
    torch.save(state, str(tmp_path / "wrong.pth"))
    with pytest.raises(SystemExit, match=r"'Mixed_7c.branch_pool.conv.weight' has shape \(192, 2048, 3, 3\)"):
        run("--fid-real", str(real), "--inception-weights", str(tmp_path / "wrong.pth"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="--fid-real: .*empty holds no image"):
        run("--fid-real", str(tmp_path / "empty"), "--inception-weights", str(weights))
    Image.new("RGB", (8, 8)).save(images / "sample_1.png")
    with pytest.raises(SystemExit, match="'sample_1.png' follows the reference naming"):
        run(*ok)
    (images / "sample_1.png").unlink()
    with pytest.raises(SystemExit, match="6 sample image.*at least 10"):  # 10 IS splits need >= 10 samples
        main(["--images", str(images), "--out", str(out), *ok])
    with pytest.raises(SystemExit, match="8 sample image"):  # --fid-classes 0-2: the forgotten class too
        main(["--images", str(images), "--out", str(out), *ok, "--fid-classes", "0-2"])
    with pytest.raises(SystemExit, match="--fid-classes '1-x': expected comma-separated classes"):
        main(["--images", str(images), "--out", str(out), *ok, "--fid-classes", "1-x"])
    hide_torchmetrics(monkeypatch)
    with pytest.raises(SystemExit, match=r'need torchmetrics.*pip install "sfd-fast\[eval\]"'):
        run(*ok)
    assert not out.exists()


def _tiny_config(tmp_path, **ddpm):
    from .test_ddpm_e2e import _tiny_cfg
    p = _tiny_cfg(tmp_path)
    data = json.loads(p.read_text())
    data["ddpm"].update(ddpm)
    data["eval"] = {"enabled": True, "samples_per_class": 2}
    p.write_text(json.dumps(data))
    return p


def test_config_refuses_incomplete_or_unusable_fid_settings(tmp_path, weights, monkeypatch):
    real = write_images(tmp_path / "real", random_arrays(2))
    with pytest.raises(ConfigError, match="'ddpm.inception_weights' is empty but ddpm.fid_real_dir is set"):
        load_config(_tiny_config(tmp_path, fid_real_dir=str(real)))
    with pytest.raises(ConfigError, match="'ddpm.fid_real_dir' is empty but ddpm.inception_weights is set"):
        load_config(_tiny_config(tmp_path, inception_weights=str(weights)))
    with pytest.raises(ConfigError, match="'ddpm.inception_weights' .*nope.pth does not exist"):
        load_config(_tiny_config(tmp_path, fid_real_dir=str(real), inception_weights=str(tmp_path / "nope.pth")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="'ddpm.fid_real_dir' .*empty holds no image"):
        load_config(_tiny_config(tmp_path, fid_real_dir=str(tmp_path / "empty"), inception_weights=str(weights)))
    hide_torchmetrics(monkeypatch)
    with pytest.raises(ConfigError, match=r'need torchmetrics \(not installed\): pip install "sfd-fast\[eval\]"'):
        load_config(_tiny_config(tmp_path, fid_real_dir=str(real), inception_weights=str(weights)))


def test_run_end_eval_writes_fid_and_is(tmp_path, weights):
    from sfd_fast.train import main as train_main
    real = write_images(tmp_path / "real", random_arrays(3, size=16))
    run = tmp_path / "run"
    train_main(["--config", str(_tiny_config(tmp_path, fid_real_dir=str(real), inception_weights=str(weights))),
                "--run-dir", str(run), "--set", "run.device=cpu", "train.progress=false", "train.total_steps=2"])
    ev = json.loads((run / "eval.json").read_text())
    # no classifier: UA skipped; FID / IS on 2 samples of each of the 9 remaining classes; torchmetrics
    # splits 18 rows with torch.chunk(10): 9 parts of 2, and eval.json reports the 9 used
    assert ev["skipped"] == ["UA: no ddpm.classifier (the reference's train_classifier.py ResNet-34 state dict)"]
    assert (ev["fid_n_samples"], ev["fid_n_real"], ev["fid_classes"], ev["is_splits"]) == (18, 3, list(range(1, 10)), 9)
    assert ev["fid"] > 0 and ev["inception_score_mean"] >= 1.0
    assert not any(p.name.startswith("000_") for p in (run / "eval_samples").iterdir())  # class 0 not sampled
