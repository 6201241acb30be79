"""Test helpers for the FID Inception: random weights in the weight file's layout, image folders,
and torch-fidelity's network loaded from its source without its package __init__ (which imports
torchvision, unusable beside a CPU torch here)."""
import importlib
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sfd_fast.evaluation.inception import expected_keys

TORCH_FIDELITY = "torch-fidelity==0.4.0"


def random_inception_state(seed: int) -> dict:
    """Weights in the layout of weights-inception-2015-12-05-6726825d.pth (no BN counters), scaled so
    activations neither vanish nor explode through the 94 conv layers: He-normal convolutions,
    BatchNorm affine and running statistics near identity (running_var > 0)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in expected_keys().items():
        if k.endswith("conv.weight"):
            v = torch.randn(shape, generator=g) * (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
        elif k.endswith("bn.weight"):
            v = 1 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith("running_var"):
            v = 0.5 + torch.rand(shape, generator=g)
        elif k == "fc.weight":
            v = torch.randn(shape, generator=g) / shape[1] ** 0.5
        else:  # bn.bias, running_mean, fc.bias
            v = 0.1 * torch.randn(shape, generator=g)
        out[k] = v
    return out


def save_random_inception(path: Path, seed: int = 0) -> Path:
    torch.save(random_inception_state(seed), str(path))
    return path


def write_images(folder: Path, arrays, classes=None) -> Path:
    """uint8 HxWx3 arrays -> {cls:03d}_{id:05d}.png (the reference naming), class 0 unless given."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        c = 0 if classes is None else classes[i]
        Image.fromarray(np.asarray(a, dtype=np.uint8)).save(folder / f"{c:03d}_{i:05d}.png")
    return folder


def random_arrays(n: int, size: int = 32, seed: int = 0, offset: int = 0):
    rng = np.random.default_rng(seed)
    return [np.clip(rng.integers(0, 200, (size, size, 3)) + offset, 0, 255) for _ in range(n)]


def torch_fidelity_source(cache_dir: Path) -> Path | None:
    """The torch_fidelity package folder: an installed one, else `pip download --no-deps` of its wheel
    into cache_dir (once; CI has the package registry). None when neither works (offline)."""
    spec = importlib.util.find_spec("torch_fidelity")  # finds the folder without running its __init__
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    target = cache_dir / "src" / "torch_fidelity"
    if (target / "feature_extractor_inceptionv3.py").is_file():
        return target
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", TORCH_FIDELITY, "-d",
                        str(cache_dir)], capture_output=True, text=True, timeout=300)
    wheels = sorted(cache_dir.glob("torch_fidelity-*.whl"))
    if r.returncode != 0 or not wheels:
        return None
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(cache_dir / "src")
    return target if (target / "feature_extractor_inceptionv3.py").is_file() else None


def torch_fidelity_inception_class(src: Path):
    """torch-fidelity's FeatureExtractorInceptionV3 class, imported from `src` through a stub
    `torch_fidelity` package (no __init__: it would import torchvision); sys.modules is restored."""
    saved = {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    stub = types.ModuleType("torch_fidelity")
    stub.__path__ = [str(src)]
    try:
        sys.modules["torch_fidelity"] = stub
        module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        return module.FeatureExtractorInceptionV3
    finally:
        for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]
        sys.modules.update(saved)
