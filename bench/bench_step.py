"""SFD step throughput: the fast step (SFDTrainer.train_step) vs the reference-structured baseline
(baseline_step.py), measured in the same process on the same device (PERFORMANCE.md).

    pytest bench/bench_step.py --benchmark-json=out.json    # CPU: tiny-sd, ~2-3 min on 2 cores
    bench/gpu_check.sh RESULTS_DIR                          # CUDA: sd15 (SD1.5 architecture)

Configurations
  tiny-sd  the tiny random SD pipeline (tiny_sd.py), batch 2 remain + 2 forget (the reference SD
           run's per-GPU batch, spec §2.2), guidance 4.5 in all three places, fp32, CPU, 1 thread
           (the CPU machine is shared; 1 thread gives stable numbers).
  sd15     SD1.5-architecture UNet + CLIP-L-shaped text encoder, random weights, batch 8 remain +
           8 forget per iteration (fast: 2 accumulation rounds of 4 + 4; baseline: the reference's
           batch_gpu 8 in one round, cudnn.benchmark on), guidance 4.5 x3, bf16 autocast with fp32
           master weights of the trained nets, CUDA.

The fast side is the product: SFDTrainer.train_step with the SD family's TextForgetTask (remain
captions drawn and encoded through the bounded cache every draw), see sd_parts.fast_parts.
Compile cases (CUDA): "-fast-compile" = engine.compile with engine.compile_regions (each network's
repeated blocks, one graph per distinct block and shape: the cold compile that fits the device
check's budget, docs/gpu_check.md), "-fast-compile-phase" = engine.compile_phase (each whole phase
one graph).

extra_info of every case: provider (fast / baseline), config, compile, batch, samples_per_s
(SFD samples = remain + forget per iteration, at the median step time), step_s, peak_mem_bytes,
flops_per_step and flops_source; on CUDA also tflops, mfu (against a bf16 matmul measured in this
process), peak_bf16_tflops, peak_reserved_bytes and device.
FLOPs: counted once per configuration with FlopCounterMode on one eager fast step (the model work
of an SFD iteration, the same for both providers: the baseline's extra text-encoder passes are not
counted as useful work); the PERFORMANCE.md table (18F per SFD sample) is recorded next to it.
"""
from __future__ import annotations

import functools
import gc
import time

import pytest
import torch

import measure
import rehearsal
import sd_parts
from baseline_step import BaselineSFD

CONFIGS = {
    # micro: the fast step's rows per branch per micro-batch; baseline_micro: the baseline's batch_gpu
    "tiny-sd": dict(device="cpu", batch=2, micro=2, baseline_micro=2, precision="fp32", rounds=(8, 5),
                    threads=1),
    # fast: micro-batch 4 + 4 (2 accumulation rounds): its generator update holds G (8 rows), fake
    # score and teacher (16 rows each, CFG) at once; activations measured on CPU at 64x64 latents are
    # 1.4-1.7 GiB per row (issue #10), so 8 + 8 in one round may not fit 80 GB. The baseline runs as
    # the reference does on one GPU: batch_gpu 8 in one round (its passes are 8 rows each), with
    # cudnn.benchmark on (spec §2.2, §2.3).
    "sd15": dict(device="cuda", batch=8, micro=4, baseline_micro=8, precision="bf16", rounds=(10, 3),
                 threads=None),
}
if rehearsal.active():
    # bench/gpu_check.sh --rehearse: the sd15 cases on CPU with the tiny pipeline, same code paths
    # (bf16 autocast, 2 accumulation rounds in the fast step, one round in the baseline), 2 rounds.
    CONFIGS["sd15"] = dict(device="cpu", batch=2, micro=1, baseline_micro=2, precision="bf16", rounds=(2, 2),
                           threads=None)
_FLOPS: dict[str, int] = {}


def _cases():
    for config, spec in CONFIGS.items():
        marks = rehearsal.cuda_skip_marks(pytest, "the sd15 step benchmark") if config == "sd15" else []
        yield pytest.param(config, "fast", None, marks=marks, id=f"{config}-fast")
        yield pytest.param(config, "baseline", None, marks=marks, id=f"{config}-baseline")
        # compile last (its graph builds are the slowest part under gpu_check's time limit); on the
        # CPU tiny config inductor's build (~30 s per graph on 2 cores) exceeds the suite budget.
        # "compile": each network (engine.compile); "compile-phase": each whole phase as one graph
        # (engine.compile_phase), the design's fusion, to measure against the per-network form.
        if config == "sd15":
            yield pytest.param(config, "fast", "networks", marks=marks, id=f"{config}-fast-compile")
            yield pytest.param(config, "fast", "phase", marks=marks, id=f"{config}-fast-compile-phase")


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    yield lambda n: torch.set_num_threads(n) if n else None
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def _sd15():
    """Built once per session (random init of ~1 B parameters takes a while); every provider
    deep-copies its own networks from it, so nothing is shared between cases but the frozen text
    encoder."""
    return sd_parts.build_sd15(device="cuda")


def _build_sd(config, tiny_sd_dir):
    if config == "tiny-sd" or rehearsal.active():
        return sd_parts.build_tiny(tiny_sd_dir)
    return _sd15()


@pytest.mark.parametrize("config,provider,compile_", list(_cases()))
def test_sfd_step(benchmark, config, provider, compile_, tiny_sd_dir, tmp_path, threads):
    spec = CONFIGS[config]
    device, B = spec["device"], spec["batch"]
    threads(spec["threads"])
    sd = _build_sd(config, tiny_sd_dir).to(device)
    if provider == "fast":
        cfg = sd_parts.sd_config(B, spec["precision"], compile_=compile_ == "networks", device=device,
                                 grad_accum=B // spec["micro"])
        cfg.engine.compile_phase = compile_ == "phase"
        cfg.engine.compile_regions = compile_ == "networks"
        runner = sd_parts.build_fast_trainer(sd, cfg, device, tmp_path)
        step = runner.train_step
    else:
        runner = BaselineSFD(sd, B, device, precision=spec["precision"], batch_gpu=spec["baseline_micro"])
        step = runner.train_step

    if config not in _FLOPS and provider == "fast" and not compile_:
        _FLOPS[config] = measure.count_flops(step)  # doubles as the first warm-up step
    warm = 3 if compile_ else 1  # compile: first steps build (and cache) every graph
    t0 = time.perf_counter()
    for _ in range(warm):
        step()
    measure.sync(device)
    warm_s = time.perf_counter() - t0   # with compile: the cold compile of every graph + 3 steps
    measure.reset_peak_memory(device)

    def target():
        step()
        measure.sync(device)

    rounds = spec["rounds"][0] if provider == "fast" else spec["rounds"][1]
    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0)

    samples = 2 * B
    info = {"provider": provider, "config": config, "compile": compile_ is not None,
            "compile_form": {"networks": "regions", "phase": "phase"}.get(compile_), "batch": B,
            "warmup_s": warm_s, "warmup_steps": warm,
            "micro_batch": spec["micro"] if provider == "fast" else spec["baseline_micro"],
            "sfd_samples_per_step": samples, "precision": spec["precision"],
            "threads": torch.get_num_threads() if device == "cpu" else None}
    info.update(measure.peak_memory(device))
    flops = _FLOPS.get(config)
    side = sd.latent_shape[-1]
    real_sd15 = config == "sd15" and not rehearsal.active()
    info["flops_table_per_step"] = measure.table_flops_per_step(samples, side) if real_sd15 else None
    info["rehearsal"] = rehearsal.active()
    if flops is None and real_sd15:
        flops, src = info["flops_table_per_step"], "PERFORMANCE.md table (18F per SFD sample)"
    else:
        src = "FlopCounterMode on one eager fast step"
    info.update(flops_per_step=flops, flops_source=src)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        info.update(step_s=median, samples_per_s=samples / median)
        if device == "cuda":
            peak = measure.peak_bf16_matmul_flops()
            info.update(device=torch.cuda.get_device_name(), peak_bf16_tflops=peak / 1e12,
                        tflops=flops / median / 1e12, mfu=flops / median / peak)
        else:
            info["device"] = "cpu"
    benchmark.extra_info.update(info)
    del runner, step, sd
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
