"""UA evaluation with the reference classifier format (torchvision ResNet-34 names, no torchvision)."""
import json
import math

import pytest
import torch
from PIL import Image

from sfd_fast.ddpm.evaluate import ResNet34, load_classifier, main, preprocess, unlearning_accuracy


def test_resnet34_has_torchvision_layout():
    net = ResNet34(10)
    sd = net.state_dict()
    # torchvision resnet34: 218 state-dict entries; 21,797,672 parameters with the 1000-way fc,
    # so 21,797,672 - 513,000 + 5,130 with a 10-way fc
    assert len(sd) == 218
    assert sum(p.numel() for p in net.parameters()) == 21_289_802
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert "layer3.5.bn2.num_batches_tracked" in sd and sd["fc.weight"].shape == (10, 512)
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def constant_classifier(path, cls: int):
    """fc weight 0, bias 10 on `cls`: every image is classified as `cls` with known probabilities."""
    net = ResNet34(10)
    sd = net.state_dict()
    sd["fc.weight"].zero_()
    sd["fc.bias"].zero_()
    sd["fc.bias"][cls] = 10.0
    torch.save(sd, str(path))
    return path


def folder(tmp_path, counts: dict):
    d = tmp_path / "samples"
    d.mkdir()
    for c, n in counts.items():
        for i in range(n):
            Image.new("RGB", (32, 32), (10 * c, 20, 30 + i)).save(d / f"{c:03d}_{i:05d}.png")
    return d


def test_ua_denominator_is_the_forgotten_class(tmp_path):
    images = folder(tmp_path, {0: 4, 1: 3, 2: 3})
    clf = load_classifier(constant_classifier(tmp_path / "c0.pth", 0))
    r = unlearning_accuracy(images, clf, forget_class=0, batch_size=3)
    assert r["n_images"] == 4
    assert r["accuracy_forgotten"] == 1.0 and r["ua"] == 0.0  # the reference's bug would give 0.4
    # softmax of logits (10, 0 x 9): closed form, float32 rounding only
    p = math.exp(10) / (math.exp(10) + 9)
    q = 1 / (math.exp(10) + 9)
    assert r["mean_prob_forgotten"] == pytest.approx(p, rel=1e-5)
    assert r["mean_entropy"] == pytest.approx(-(p * math.log(p) + 9 * q * math.log(q)), rel=1e-4)
    r1 = unlearning_accuracy(images, load_classifier(constant_classifier(tmp_path / "c1.pth", 1)), 0)
    assert r1["ua"] == 1.0


def test_preprocess_matches_the_reference_transform(tmp_path):
    img = Image.new("RGB", (32, 32), (255, 0, 128))
    img.save(tmp_path / "000_00000.png")
    x = preprocess([tmp_path / "000_00000.png"])
    assert x.shape == (1, 3, 224, 224)
    # (v/255 - 0.5)/0.5 in float32: values of magnitude ~1 are rounded before the subtraction, so
    # the absolute error is a few 1e-8; 1e-6 is far below one uint8 step (2/255)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), rtol=0, atol=1e-6)


def test_cli_writes_eval_json_and_refuses_bad_input(tmp_path):
    images = folder(tmp_path, {0: 2, 3: 1})
    ck = constant_classifier(tmp_path / "c.pth", 3)
    assert main(["--images", str(images), "--classifier", str(ck), "--forget-class", "0"]) == 0
    assert json.loads((images / "eval.json").read_text())["ua"] == 1.0
    with pytest.raises(SystemExit, match="forgotten class 5"):
        main(["--images", str(images), "--classifier", str(ck), "--forget-class", "5", "--out", str(tmp_path / "x.json")])
    sd = torch.load(str(ck), weights_only=True)
    sd["fc.weight"] = torch.zeros(1000, 512)
    torch.save(sd, str(tmp_path / "bad.pth"))
    with pytest.raises(SystemExit, match="'fc.weight' has shape \\(1000, 512\\)"):
        main(["--images", str(images), "--classifier", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
