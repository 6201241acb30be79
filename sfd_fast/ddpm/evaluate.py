"""Unlearning accuracy (UA) of a ddpm run's samples with the reference's classifier (spec §4.4).

    sfd-fast eval-ddpm --images DIR --classifier cifar10_resnet34.pth --forget-class 0 [--out eval.json]

The classifier is the reference's train_classifier.py output: a torchvision ResNet-34 state dict
with a 10-way fc. torchvision is not needed: the network below has torchvision's parameter names.
Images: a folder of {cls:03d}_{id:05d}.png (the reference's sample.py or `sfd-fast sample`),
preprocessed as the reference's ua_imagefolder.py (PIL bilinear resize to 224x224, [0, 1], then
normalised to [-1, 1]).

Fixed: the reference divides the forgotten-class counts by the number of ALL images in the folder
(ua_imagefolder.py L218); here every mean is over the forgotten class's images only. UA = 1 - the
fraction of forgotten-class samples that the classifier assigns to the forgotten class.
FID / Inception Score are not built in (see docs/ddpm.md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .sample import reference_folder_index


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNet34(nn.Module):
    """ResNet-34 (BasicBlock x 3, 4, 6, 3) with torchvision's parameter names."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (cout, n) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (j == 0 and i > 1) else 1) for j in range(n)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def load_classifier(path, num_classes: int = 10) -> ResNet34:
    """The reference classifier state dict (weights_only load), strictly, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"classifier {path} does not exist; give the reference train_classifier.py output "
                         "(e.g. cifar10_resnet34.pth)")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user error
        raise ValueError(f"classifier {path}: not a state dict readable with weights_only=True ({e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"classifier {path}: expected a ResNet-34 state dict, got {type(state).__name__}")
    net = ResNet34(num_classes)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        first = (f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'" if unexpected
                 else f"'{shapes[0]}' has shape {tuple(state[shapes[0]].shape)}, expected {tuple(own[shapes[0]].shape)}")
        raise ValueError(f"classifier {path} is not a {num_classes}-class torchvision ResNet-34 state dict: {first}")
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


def preprocess(files: list[Path]) -> torch.Tensor:
    """As the reference: PIL bilinear resize to 224x224 (uint8), ToTensor, Normalize(0.5, 0.5)."""
    from PIL import Image
    arrays = [np.asarray(Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR)) for f in files]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5


def unlearning_accuracy(images_dir, classifier, forget_class: int, device="cpu", batch_size: int = 100) -> dict:
    """UA, mean entropy and mean p(forget) over the forgotten class's images (see the module docstring)."""
    index = reference_folder_index(Path(images_dir))
    files = index.get(forget_class)
    if not files:
        raise ValueError(f"image folder {images_dir} holds no image of the forgotten class {forget_class} "
                         f"({forget_class:03d}_*.png)")
    net = classifier.to(device)
    hits = entropy = prob = 0.0
    for start in range(0, len(files), batch_size):
        with torch.no_grad():
            logits = net(preprocess(files[start:start + batch_size]).to(device)).float()
        logp = torch.log_softmax(logits, dim=-1)
        p = logp.exp()
        hits += (logits.argmax(-1) == forget_class).sum().item()
        entropy += -(p * logp).sum(-1).sum().item()
        prob += p[:, forget_class].sum().item()
    n = len(files)
    acc = hits / n
    return {"forget_class": forget_class, "n_images": n, "accuracy_forgotten": acc, "ua": 1.0 - acc,
            "mean_entropy": entropy / n, "mean_prob_forgotten": prob / n,
            "denominator": "images of the forgotten class (the reference divides by all images; fixed)"}


def evaluate_run(cfg, parts, trainer, run_dir: Path) -> dict:
    """End of a ddpm run (rank 0): UA of the EMA generator on the forgotten class -> eval.json.

    Samples eval.samples_per_class images of the forgotten class into run_dir/eval_samples (reference
    naming). Without ddpm.classifier (or with no class forgotten) UA is skipped and eval.json says so."""
    import logging

    from ..checkpoint import atomic_write_text
    from .sample import sample_to_folder
    log = logging.getLogger("sfd_fast")
    s, d = cfg.sfd, cfg.ddpm
    result: dict = {"step": trainer.step, "skipped": []}
    if not d.classifier:
        result["skipped"].append("UA: no ddpm.classifier (the reference's train_classifier.py ResNet-34 state dict)")
    elif s.forget_class < 0:
        result["skipped"].append("UA: no class is forgotten (sfd.forget_class -1)")
    else:
        folder = run_dir / "eval_samples"
        shape = (d.in_channels, d.image_size, d.image_size)
        sample_to_folder(trainer.generator_ema, [s.forget_class], cfg.eval.samples_per_class, folder, shape,
                         progress=False)
        result.update(unlearning_accuracy(folder, load_classifier(d.classifier, s.num_classes), s.forget_class,
                                          trainer.device))
    result["skipped"].append("FID / Inception Score: not built in (run the reference evaluator on "
                             "`sfd-fast sample` output)")
    atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=1))
    for line in result["skipped"]:
        log.info("eval skipped: %s", line)
    if "ua" in result:
        log.info("eval: UA %.4f over %d samples of class %d", result["ua"], result["n_images"], s.forget_class)
    return {"eval": result}


def main(argv=None) -> int:
    """sfd-fast eval-ddpm --images DIR --classifier PATH --forget-class K [--out FILE]"""
    p = argparse.ArgumentParser(prog="sfd-fast eval-ddpm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of {cls:03d}_{id:05d}.png samples")
    p.add_argument("--classifier", required=True, help="reference ResNet-34 state dict (train_classifier.py)")
    p.add_argument("--forget-class", type=int, default=0)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--out", help="JSON file (default: IMAGES/eval.json)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=100)
    a = p.parse_args(argv)
    if not 0 <= a.forget_class < a.num_classes:
        raise SystemExit(f"error: --forget-class {a.forget_class} is not one of the classes 0..{a.num_classes - 1}")
    try:
        clf = load_classifier(a.classifier, a.num_classes)
        result = unlearning_accuracy(a.images, clf, a.forget_class, a.device, a.batch_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    from ..checkpoint import atomic_write_text
    out = Path(a.out) if a.out else Path(a.images) / "eval.json"
    atomic_write_text(out, json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
