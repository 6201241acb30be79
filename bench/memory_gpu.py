"""Measured peak memory of the 24 GB configuration (stage memory_24gb of bench/gpu_check.sh).

    python bench/memory_gpu.py --json OUT.json [--steps 2] [--tiny]

The configuration (docs/memory.md): configs/sd15_pitt.json with engine.backend=deepspeed at ZeRO
stage 2 in a world of one, engine.optimizer=adam8bit (bitsandbytes), activation checkpointing, bf16,
micro-batch 1 remain + 1 forget (train.batch_size 2 with grad_accum 2: two micro-batches per step).
The weights: an SD1.5-architecture pipeline with random weights (bench/sd_parts.py's UNet and text
encoder, SD's VAE shape) written to a temporary folder and loaded through the product path
(sfd_fast.sd.build.build_parts + SFDTrainer with the DeepSpeed backend), so the peak is what a real run of that configuration
allocates. --tiny: the tiny random pipeline on this machine's device instead (a smoke test on CPU).

The JSON (written after the build and again after every step, atomically, so a time limit still
leaves what was reached): peak allocated and reserved bytes over build + steps (CUDA; on CPU the
process peak RSS), the allocated bytes after the build (static: weights, masters, optimizer state,
buckets), the peak of the steps alone, the step times, the device and the configuration.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for p in (str(ROOT), str(BENCH_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

CONFIG = ROOT / "configs" / "sd15_pitt.json"
OVERRIDES = ["engine.backend=deepspeed", "engine.zero_stage=2", "engine.optimizer=adam8bit",
             "engine.activation_checkpointing=true", "engine.precision=bf16", "train.batch_size=2",
             "train.micro_batch=1", "train.progress=false", "eval.enabled=false"]
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, sample_size=512, scaling_factor=0.18215)


def write_sd15_random(folder: Path) -> Path:
    """An SD1.5-architecture diffusers pipeline folder with random weights (no download)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    import sd_parts

    sd = sd_parts.build_sd15()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        vae = AutoencoderKL(**SD_VAE)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                   scheduler=sd.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.bfloat16)  # half the bytes to write and read; the loader casts to the dtype it uses
    pipe.save_pretrained(folder)
    return folder


def _memory(device) -> dict:
    import measure

    return measure.peak_memory(device)


def _write(path: Path, result: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)


def measure_config(out: Path, steps: int, tiny: bool, work: Path, extra=()) -> dict:
    from sfd_fast.config import load_config
    from sfd_fast.engine import preflight
    from sfd_fast.engine.distributed import init_distributed
    from sfd_fast.sd.build import build_parts
    from sfd_fast.trainer import SFDTrainer

    pretrained = f"tiny:{work / 'tiny_sd'}" if tiny else str(write_sd15_random(work / "sd15_random"))
    device_name = "cpu" if tiny else "cuda"
    # tiny: 128 px (16x16 latents, as the step benchmark's tiny SD): at the config's 512 px the tiny UNet
    # attends over 64x64 = 4096 latent tokens, and CPU bf16 attention backward made a step 80-110 s
    size = ["prompts.resolution=128"] if tiny else []
    cfg = load_config(str(CONFIG), OVERRIDES + size + [f"model.pretrained={pretrained}", f"run.device={device_name}",
                                                       f"run.root={work / 'runs'}", *extra])
    preflight(cfg)  # deepspeed / bitsandbytes missing: a clear error before anything is built
    device = init_distributed(cfg)
    result = {"configuration": "ZeRO-2 (world 1) + 8-bit Adam + activation checkpointing, bf16, "
                               "micro-batch 1 remain + 1 forget, 2 micro-batches per step",
              "overrides": OVERRIDES + size + list(extra), "weights": "tiny random pipeline" if tiny else "SD1.5 architecture, random",
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "steps": 0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_dir = work / "runs" / "memory"
    run_dir.mkdir(parents=True)
    trainer = SFDTrainer(cfg, build_parts(cfg), run_dir, device)  # engine.backend=deepspeed: two ZeRO engines
    if device.type == "cuda":
        torch.cuda.synchronize()
        result["after_build_allocated_bytes"] = int(torch.cuda.memory_allocated())
        result["build_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    result["build_s"] = time.perf_counter() - t0
    _write(out, result)
    step_times = []
    for i in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
        mem = _memory(device)
        result.update(steps=i + 1, step_s=step_times)
        if device.type == "cuda":
            result.update(peak_allocated_bytes=mem["peak_mem_bytes"], peak_reserved_bytes=mem["peak_reserved_bytes"],
                          device_total_bytes=int(torch.cuda.get_device_properties(device).total_memory))
        else:
            result.update(peak_rss_bytes=mem["peak_mem_bytes"])
        _write(out, result)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="result file (rewritten after the build and every step)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="the tiny random pipeline on CPU (smoke test)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    a = p.parse_args(argv)
    import rehearsal
    if rehearsal.active():   # gpu_check.sh --rehearse: the same configuration on the tiny pipeline
        a.tiny = True
    if not a.tiny and not torch.cuda.is_available():
        print("memory_gpu: no CUDA device; the 24 GB configuration is measured on a GPU (--tiny runs the "
              "tiny pipeline on CPU)", file=sys.stderr)
        return 2
    out = Path(a.json).resolve()
    with tempfile.TemporaryDirectory(prefix="memory_gpu_") as work:
        r = measure_config(out, a.steps, a.tiny, Path(work), a.set)
    peak = r.get("peak_allocated_bytes") or r.get("peak_rss_bytes")
    if r["steps"] < a.steps:
        print(f"memory_gpu: only {r['steps']} of {a.steps} steps ran", file=sys.stderr)
        return 1
    print(f"memory_gpu: {r['steps']} steps on {r['device']}, peak {peak / 2**30:.2f} GiB -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
