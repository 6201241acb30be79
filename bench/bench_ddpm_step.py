"""ddpm family: the fast SFD step (SFDTrainer.train_step) vs the reference-structured step
(ddpm_baseline_step.py), CIFAR-10 size (32 px, ch 128, ch_mult 1,2,2,2, attention at 16, dropout
0.1 active as in the reference), random weights, fp32, measured in the same process.

    pytest bench/bench_ddpm_step.py --benchmark-json=out.json

Configurations
  cifar-cpu   batch 2 remain + 2 forget, 1 thread (the full batch of 128 takes minutes per step
              on a 2-core CPU; the step's structure, not the batch, is what is compared)
  tiny-cpu    a tiny DDPM (16 px, ch 32, ch_mult 1,2, one res block, attention at 8), batch 4 + 4,
              1 thread: the step's overheads weigh more than on the CIFAR network
  cifar-cuda  batch 128 remain + 128 forget (the reference's batch), skipped without CUDA; the `ddpm`
              stage of bench/gpu_check.sh (under --rehearse: the tiny DDPM on CPU, batch 2 + 2)
extra_info: provider, config, batch, sfd_samples_per_step, step_s, samples_per_s, peak memory.
"""
from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

import measure
import rehearsal
from ddpm_baseline_step import BaselineDDPMSFD

ROOT = Path(__file__).resolve().parent.parent
TINY_NET = ["ddpm.image_size=16", "ddpm.ch=32", "ddpm.ch_mult=[1,2]", "ddpm.num_res_blocks=1",
            "ddpm.attn_resolutions=[8]"]
CONFIGS = {
    "cifar-cpu": dict(device="cpu", batch=2, rounds=(5, 5), threads=1, net=[]),
    "tiny-cpu": dict(device="cpu", batch=4, rounds=(10, 10), threads=1, net=TINY_NET),
    "cifar-cuda": dict(device="cuda", batch=128, rounds=(10, 5), threads=None, net=[]),
}
if rehearsal.active():  # gpu_check.sh --rehearse: the cifar-cuda cases with the tiny DDPM on CPU
    CONFIGS["cifar-cuda"] = dict(device="cpu", batch=2, rounds=(2, 2), threads=None, net=TINY_NET)


def _cases():
    for config, spec in CONFIGS.items():
        marks = rehearsal.cuda_skip_marks(pytest, "the cifar-cuda ddpm step") if config == "cifar-cuda" else []
        for provider in ("fast", "baseline"):
            yield pytest.param(config, provider, marks=marks, id=f"{config}-{provider}")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ddpm_cache")


def fast_trainer(batch: int, device: str, cache: Path, run_dir: Path, net=()):
    from sfd_fast.config import load_config
    from sfd_fast.ddpm.build import build_parts
    from sfd_fast.trainer import SFDTrainer
    cfg = load_config(ROOT / "configs" / "cifar10_forget0.json",
                      [f"ddpm.checkpoint=random:{cache}", f"train.batch_size={batch}", f"run.device={device}",
                       "train.progress=false", *net])
    return SFDTrainer(cfg, build_parts(cfg), run_dir, torch.device(device))


@pytest.mark.parametrize("config,provider", list(_cases()))
def test_ddpm_sfd_step(benchmark, config, provider, cache_dir, tmp_path):
    spec = CONFIGS[config]
    device, B = spec["device"], spec["batch"]
    before = torch.get_num_threads()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    try:
        trainer = fast_trainer(B, device, cache_dir / config, tmp_path, spec["net"])
        if provider == "fast":
            step = trainer.train_step
        else:  # the same starting network, its own copies
            runner = BaselineDDPMSFD(trainer.teacher.net, B, device, trainer.parts.sample_shape)
            step = runner.train_step
            del trainer
        step()  # warm-up
        measure.sync(device)
        measure.reset_peak_memory(device)

        def target():
            step()
            measure.sync(device)

        rounds = spec["rounds"][0] if provider == "fast" else spec["rounds"][1]
        benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0)
        info = {"provider": provider, "config": config, "batch": B, "sfd_samples_per_step": 2 * B,
                "precision": "fp32", "rehearsal": config == "cifar-cuda" and rehearsal.active(),
                "network": "tiny" if spec["net"] else "cifar10", "threads": torch.get_num_threads() if device == "cpu" else None,
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
        info.update(measure.peak_memory(device))
        if benchmark.stats is not None:
            median = benchmark.stats.stats.median
            info.update(step_s=median, samples_per_s=2 * B / median)
        benchmark.extra_info.update(info)
    finally:
        torch.set_num_threads(before)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def summary(path: str) -> dict:
    """{config: fast/baseline speed-up} from a --benchmark-json file."""
    runs = json.loads(Path(path).read_text())["benchmarks"]
    med = {(b["extra_info"]["config"], b["extra_info"]["provider"]): b["stats"]["median"] for b in runs}
    return {c: med[(c, "baseline")] / med[(c, "fast")] for c in CONFIGS if (c, "fast") in med and (c, "baseline") in med}
