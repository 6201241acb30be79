"""Sampling and export for ddpm runs, in the formats the reference tools read.

    sfd-fast sample --run D --classes 0,...,9 --n-per-class N --out-dir DIR
        -> DIR/{cls:03d}_{id:05d}.png (the naming of the reference's sample.py, read by its FID
           evaluator and ua_imagefolder.py), one-step, batched, with a progress bar
    sfd-fast export --format reference-ddpm --run D --out ckpt.pth
        -> the 6-entry list [fake_score, opt, generator, opt, step, ema] of the reference's
           train_sfd, which its sample.py / ua_ddpm.py read
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

REFERENCE_NAME = re.compile(r"^(\d{3})_(\d{5})\.png$")


def run_config(run_dir: Path):
    """The ddpm run's config.json, or a one-line error."""
    from ..config import ConfigError, read_run_config
    try:
        return read_run_config(run_dir, "ddpm")
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def checkpoint_dir(run_dir: Path, checkpoint: str | None = None) -> Path:
    from ..checkpoint import latest_checkpoint
    try:
        return Path(checkpoint) if checkpoint else latest_checkpoint(Path(run_dir))
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None


def generator_weights_file(run_dir: Path, checkpoint: str | None = None, raw: bool = False) -> tuple[Path, Path]:
    """(checkpoint folder, its generator_ema.safetensors, or generator.safetensors when raw or no EMA)."""
    ck = checkpoint_dir(run_dir, checkpoint)
    f = ck / ("generator.safetensors" if raw else "generator_ema.safetensors")
    if not f.is_file():
        f = ck / "generator.safetensors"
    if not f.is_file():
        raise SystemExit(f"error: {f} does not exist; {ck} is not a complete checkpoint")
    return ck, f


def load_run_generator(run_dir: Path, device, checkpoint: str | None = None, raw: bool = False):
    """-> (cfg, one-step generator with the run's EMA (or raw) weights, description)."""
    from safetensors.torch import load_file

    from ..denoisers import ClassCondDenoiser
    from ..generator import OneStepGenerator
    from .build import arch_from_config, make_schedule
    from .model import DDPMUNet
    cfg = run_config(run_dir)
    ck, f = generator_weights_file(run_dir, checkpoint, raw)
    net = DDPMUNet(arch_from_config(cfg))
    net.load_state_dict(load_file(str(f)))
    den = ClassCondDenoiser(net, make_schedule(cfg).to(device), cfg.sfd.num_classes)
    return cfg, OneStepGenerator(den, cfg.sfd.t_init).to(device).eval(), f"{ck.name}/{f.name}"


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 HWC, rounding as torchvision's save_image (x*255 + 0.5, clamped)."""
    return ((x.float() + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def sample_to_folder(generator, classes: list[int], n_per_class: int, out_dir: Path, shape: tuple,
                     batch_size: int = 100, seed: int = 0, progress: bool = True) -> int:
    """Write {cls:03d}_{id:05d}.png for every class; the noise of class c comes from seed + c, so an
    image does not depend on the batch size. Returns the number of images written."""
    from PIL import Image
    from tqdm import tqdm
    device = next(generator.parameters()).device
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(classes) * n_per_class, desc="sample", unit="img", disable=not progress)
    written = 0
    for c in classes:
        g = torch.Generator().manual_seed(seed + c)
        z_all = torch.randn((n_per_class, *shape), generator=g)
        for start in range(0, n_per_class, batch_size):
            z = z_all[start:start + batch_size].to(device)
            with torch.no_grad():
                x = generator(z, torch.full((z.shape[0],), c, dtype=torch.long, device=device))
            for i, img in enumerate(to_uint8(x).numpy()):
                Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(out_dir / f"{c:03d}_{start + i:05d}.png")
            written += z.shape[0]
            bar.update(z.shape[0])
    bar.close()
    return written


def reference_folder_index(folder: Path) -> dict[int, list[Path]]:
    """{class: [files]} of a folder of {cls:03d}_{id:05d}.png images; any other PNG is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist")
    index: dict[int, list[Path]] = {}
    bad = []
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            continue
        m = REFERENCE_NAME.match(f.name)
        if m is None:
            bad.append(f.name)
        else:
            index.setdefault(int(m.group(1)), []).append(f)
    if bad or not index:
        raise ValueError(f"image folder {folder}: {'image ' + repr(bad[0]) if bad else 'no image'} follows the "
                         "reference naming {cls:03d}_{id:05d}.png (e.g. 000_00012.png), as written by the "
                         "reference sample.py or `sfd-fast sample`" + (f" ({len(bad)} such files)" if bad else ""))
    return index


def parse_classes(text: str, num_classes: int, option: str = "--classes") -> list[int]:
    """'0,1,2' or '0-9' -> class list, each in [0, num_classes); errors name `option`."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if part in ("...", ""):
            continue
        lo, _, hi = part.partition("-")
        try:
            rng = range(int(lo), int(hi) + 1) if hi else [int(lo)]
        except ValueError:
            raise SystemExit(f"error: {option} {text!r}: expected comma-separated classes or ranges like 0-9")
        out.extend(rng)
    if "..." in text and len(out) >= 2:  # '0,...,9' as written in the docs: the full range
        out = list(range(out[0], out[-1] + 1))
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad or not out:
        raise SystemExit(f"error: {option} {text!r}: class {bad[0] if bad else '(none)'} is not one of the "
                         f"model's classes 0..{num_classes - 1}")
    return out


def class_sample_parser(description: str) -> argparse.ArgumentParser:
    """The options `sfd-fast sample` has for every class-conditional family (ddpm, edm)."""
    p = argparse.ArgumentParser(prog="sfd-fast sample", description=description)
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--classes", default="0-9", help="e.g. 0,...,9 or 1-9 or 0,2,5 (default 0-9)")
    p.add_argument("--n-per-class", type=int, required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="the raw generator instead of its EMA")
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's latest)")
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true", help="write into a folder that already holds images")
    return p


def checked_sample_args(p: argparse.ArgumentParser, a, num_classes: int) -> tuple[list[int], Path]:
    """(classes, output folder) of parsed class_sample_parser options, or a one-line error."""
    if a.n_per_class < 1 or a.batch_size < 1:
        p.error("--n-per-class and --batch-size must be >= 1")
    classes = parse_classes(a.classes, num_classes)
    out = Path(a.out_dir)
    if out.is_dir() and any(out.glob("*.png")) and not a.force:
        raise SystemExit(f"error: {out} already holds PNG images; pass --force or use an empty folder")
    return classes, out


def main(argv=None) -> int:
    """sfd-fast sample for ddpm runs (see the module docstring)."""
    p = class_sample_parser("One-step class samples of a ddpm run, named {cls:03d}_{id:05d}.png as the "
                            "reference's sample.py.")
    a = p.parse_args(argv)
    cfg = run_config(Path(a.run))
    classes, out = checked_sample_args(p, a, cfg.sfd.num_classes)
    from ..engine import resolve_device
    device = resolve_device(a.device)
    cfg, generator, desc = load_run_generator(Path(a.run), device, a.checkpoint, a.raw)
    shape = (cfg.ddpm.in_channels, cfg.ddpm.image_size, cfg.ddpm.image_size)
    n = sample_to_folder(generator, classes, a.n_per_class, out, shape, a.batch_size, a.seed)
    print(f"{out}: {n} images ({len(classes)} classes x {a.n_per_class}), generator {desc}")
    return 0


def export_reference(run_dir, out_path, checkpoint: str | None = None) -> Path:
    """Write the run's checkpoint as the reference's 6-entry SFD list (atomically)."""
    from safetensors.torch import load_file

    from .checkpoints import save_reference_list
    run_config(Path(run_dir))
    ck = checkpoint_dir(Path(run_dir), checkpoint)
    state = json.loads((ck / "trainer_state.json").read_text())

    def weights(name):
        f = ck / f"{name}.safetensors"
        return load_file(str(f)) if f.is_file() else None
    gen, fake = weights("generator"), weights("fake_score")
    if gen is None or fake is None:
        raise SystemExit(f"error: {ck} lacks generator/fake_score weights; not a complete checkpoint")
    # the reference's step entry is the 0-based loop index of the step just taken
    save_reference_list(out_path, fake, gen, weights("generator_ema"), max(int(state["step"]) - 1, 0))
    return Path(out_path)


def export_main(argv=None) -> int:
    """sfd-fast export --format reference-ddpm --run D --out FILE"""
    p = argparse.ArgumentParser(prog="sfd-fast export")
    p.add_argument("--format", required=True, choices=["reference-ddpm"])
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    if Path(a.out).exists() and not a.force:
        raise SystemExit(f"error: {a.out} exists; pass --force to replace it")
    out = export_reference(a.run, a.out, a.checkpoint)
    print(f"wrote {out} (reference SFD list: fake_score, opt, generator, opt, step, ema)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
