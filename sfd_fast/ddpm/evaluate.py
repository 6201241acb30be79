"""Evaluation of a ddpm run's samples: UA with the reference's classifier (spec §4.4), FID and IS.

    sfd-fast eval-ddpm --images DIR [--classifier cifar10_resnet34.pth] [--forget-class 0]
                       [--fid-real REAL_DIR --inception-weights weights-inception-2015-12-05-6726825d.pth]
                       [--out eval.json]

UA. The classifier is the reference's train_classifier.py output: a torchvision ResNet-34 state dict
with a 10-way fc. torchvision is not needed: the network below has torchvision's parameter names.
Images: a folder of {cls:03d}_{id:05d}.png (the reference's sample.py or `sfd-fast sample`),
preprocessed as the reference's ua_imagefolder.py (PIL bilinear resize to 224x224, [0, 1], then
normalised to [-1, 1]).
Fixed: the reference divides the forgotten-class counts by the number of ALL images in the folder
(ua_imagefolder.py L218); here every mean is over the forgotten class's images only. UA = 1 - the
fraction of forgotten-class samples that the classifier assigns to the forgotten class.

FID / Inception Score (the `eval` extra: pip install "sfd-fast[eval]"): torchmetrics' metrics on
sfd_fast/evaluation/inception.py, our port of the TF FID Inception that loads torch-fidelity's
weight file (checked against torch-fidelity's network: tests/test_inception.py). Samples: the
folder's images of every class except the forgotten one (the reference README's exclusion of
"000_\\d{5}\\.png"; --fid-classes chooses others); real: every image under REAL_DIR. IS: 10 splits.
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


def fid_inception_score(images_dir, real_dir, weights, classes=None, exclude=(), device="cpu",
                        batch_size: int = 50, splits: int = 10, progress: bool = True,
                        keys=("--fid-real", "--inception-weights")) -> dict:
    """FID of the reference-named samples in images_dir (classes, default all but `exclude`) against
    every image under real_dir, and their Inception Score; eval.json fields. `keys` name the two
    settings in errors. torchmetrics missing -> ImportError with the install hint."""
    from ..evaluation.fid import fid_inception_score as compute, image_files, require_torchmetrics
    from ..evaluation.inception import load_inception
    require_torchmetrics()
    index = reference_folder_index(Path(images_dir))
    chosen = sorted(c for c in index if c not in exclude) if classes is None else list(classes)
    files = [f for c in chosen for f in index.get(c, [])]
    if not files:
        raise ValueError(f"image folder {images_dir} holds no sample of the classes {chosen} for FID / IS")
    real = image_files(real_dir, keys[0])
    net = load_inception(weights, keys[1])
    r = compute(files, real, net, device, batch_size, splits, progress=progress)
    return {"fid": r["fid"], "inception_score_mean": r["inception_score_mean"],
            "inception_score_std": r["inception_score_std"], "is_splits": r["is_splits"], "fid_n_samples": r["n_samples"],
            "fid_n_real": r["n_real"], "fid_classes": chosen, "fid_real_dir": str(real_dir),
            "fid_network": "FID Inception-v3 (TF 2015-12-05 graph; sfd_fast port of torch-fidelity's), torchmetrics"}


FID_SKIPPED = ("FID / Inception Score: no ddpm.fid_real_dir (a folder of real images) and ddpm.inception_weights "
               "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth); set both")


def evaluate_run(cfg, parts, trainer, run_dir: Path) -> dict:
    """End of a ddpm run (rank 0): UA of the EMA generator on the forgotten class, FID / IS of its
    samples of the other classes -> eval.json.

    Samples eval.samples_per_class images per class needed into run_dir/eval_samples (reference
    naming). Without ddpm.classifier (or with no class forgotten) UA is skipped; without
    ddpm.fid_real_dir + ddpm.inception_weights FID / IS are skipped; eval.json says so."""
    import logging
    import sys

    from ..checkpoint import atomic_write_json
    from ..conditions import forget_targets
    from ..evaluation.fid import INSTALL_HINT, torchmetrics_available
    from .sample import sample_to_folder
    log = logging.getLogger("sfd_fast")
    s, d = cfg.sfd, cfg.ddpm
    forgotten = [c for c in forget_targets(s)[0] if c >= 0]
    result: dict = {"step": trainer.step, "skipped": []}
    ua = bool(d.classifier) and s.forget_class >= 0
    if not d.classifier:
        result["skipped"].append("UA: no ddpm.classifier (the reference's train_classifier.py ResNet-34 state dict)")
    elif s.forget_class < 0:
        result["skipped"].append("UA: no class is forgotten (sfd.forget_class -1)")
    fid = bool(d.fid_real_dir and d.inception_weights)  # config validation: both or neither, torchmetrics present
    if not fid:
        result["skipped"].append(FID_SKIPPED + ("" if torchmetrics_available() else f", and {INSTALL_HINT}"))
    fid_classes = [c for c in range(s.num_classes) if c not in forgotten]
    classes = sorted(set(([s.forget_class] if ua else []) + (fid_classes if fid else [])))
    folder = run_dir / "eval_samples"
    if classes:
        shape = (d.in_channels, d.image_size, d.image_size)
        sample_to_folder(trainer.generator_ema, classes, cfg.eval.samples_per_class, folder, shape, progress=False)
    if ua:
        result.update(unlearning_accuracy(folder, load_classifier(d.classifier, s.num_classes), s.forget_class,
                                          trainer.device))
    if fid:
        result.update(fid_inception_score(folder, d.fid_real_dir, d.inception_weights, fid_classes,
                                          device=trainer.device, progress=cfg.train.progress and sys.stderr.isatty(),
                                          keys=("ddpm.fid_real_dir", "ddpm.inception_weights")))
    atomic_write_json(run_dir / "eval.json", result)
    for line in result["skipped"]:
        log.info("eval skipped: %s", line)
    if "ua" in result:
        log.info("eval: UA %.4f over %d samples of class %d", result["ua"], result["n_images"], s.forget_class)
    if "fid" in result:
        log.info("eval: FID %.3f, IS %.3f +- %.3f (%d samples of classes %s, %d real images)", result["fid"],
                 result["inception_score_mean"], result["inception_score_std"], result["fid_n_samples"],
                 fid_classes, result["fid_n_real"])
    return {"eval": result}


def main(argv=None) -> int:
    """sfd-fast eval-ddpm --images DIR [--classifier PATH --forget-class K] [--fid-real DIR --inception-weights PATH]"""
    p = argparse.ArgumentParser(prog="sfd-fast eval-ddpm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of {cls:03d}_{id:05d}.png samples")
    p.add_argument("--classifier", help="UA: reference ResNet-34 state dict (train_classifier.py)")
    p.add_argument("--forget-class", type=int, default=0, help="UA's class; excluded from FID / IS (default 0)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--fid-real", help="FID: folder of real images (searched recursively)")
    p.add_argument("--inception-weights", help="FID / IS: torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    p.add_argument("--fid-classes", help="FID / IS samples: classes such as 1-9 or 1,2,3 (default: all but "
                   "--forget-class)")
    p.add_argument("--is-splits", type=int, default=10)
    p.add_argument("--out", help="JSON file (default: IMAGES/eval.json)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=100)
    a = p.parse_args(argv)
    if not 0 <= a.forget_class < a.num_classes:
        raise SystemExit(f"error: --forget-class {a.forget_class} is not one of the classes 0..{a.num_classes - 1}")
    if not (a.classifier or a.fid_real or a.inception_weights):
        raise SystemExit("error: nothing to evaluate: give --classifier (UA) and/or --fid-real with "
                         "--inception-weights (FID / Inception Score)")
    if bool(a.fid_real) != bool(a.inception_weights):
        raise SystemExit("error: FID / Inception Score need both --fid-real DIR and --inception-weights PATH "
                         "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
    if a.is_splits < 2:
        raise SystemExit(f"error: --is-splits must be >= 2 (the std is over splits), got {a.is_splits}")
    result: dict = {}
    try:  # every input is checked before the long work; nothing is written on an error
        clf = load_classifier(a.classifier, a.num_classes) if a.classifier else None
        if clf is not None:
            result.update(unlearning_accuracy(a.images, clf, a.forget_class, a.device, a.batch_size))
        if a.fid_real:
            from .sample import parse_classes
            classes = parse_classes(a.fid_classes, a.num_classes, "--fid-classes") if a.fid_classes else None
            result.update(fid_inception_score(a.images, a.fid_real, a.inception_weights, classes, (a.forget_class,),
                                              a.device, a.batch_size, a.is_splits, progress=True))
    except (ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    from ..checkpoint import atomic_write_json
    out = Path(a.out) if a.out else Path(a.images) / "eval.json"
    atomic_write_json(out, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
