"""The memory model (engine/memory_model.py) against a MEASURED CPU peak (issue #10: within 15%).

A tiny Stable Diffusion configuration wide enough that weights, Adam state and activations dominate
allocator noise (UNet widths 128/256, latents 8x8, 4 remain + 4 forget rows per micro-batch, CFG 4.5
in all three places, plain backend, EMA off) trains 2 steps under the torch profiler with
profile_memory=True. The profiler's CPU memory events carry `total_allocated`: the bytes allocated
while profiling and still alive (frees of older tensors are not reported); its value at the start of
the session is subtracted (the counter outlives a session). So

    measured peak = bytes of the run's tensors alive when profiling starts (a gc walk: weights,
                    buffers, the text cache; each storage once; storages alive before the parts were
                    built excluded) + max (total_allocated - its start value) over the two steps.

Step 2 is the one that matters: Adam's state exists from the first update on.

Tolerance: the issue's 15%. What the model leaves out is stated in its docstring; here the gap is
one-sided by construction (the model adds the whole gradient of the updated network to every saved
activation, while in the backward the weight gradients grow as the saved activations are released):
measured model/peak 1.08 (fp32) and 1.10 (bf16), on this machine, the same to 0.1% for every seed.
Nothing here depends on one CPU's rounding: the bytes are tensor sizes, fixed by shapes and dtypes.
"""
from __future__ import annotations

import gc
import warnings

import pytest
import torch

from sfd_fast.config import load_config
from sfd_fast.engine import memory_model
from sfd_fast.sd.build import build_parts as build_sd_parts
from sfd_fast.sd.tiny import build_tiny_sd
from sfd_fast.trainer import SFDTrainer
from tests.test_sd_run import sd_config

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 0.15   # the bound on |model / measured - 1|
ROWS = 4           # remain (= forget) rows per micro-batch




@pytest.fixture(scope="module")
def wide_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("mem_peak") / "tiny", sample_size=8, block_out_channels=(128, 256))


def _live_storages() -> dict[int, int]:
    """{address: bytes} of every CPU tensor storage reachable from Python right now."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():   # isinstance() on deprecated torch attributes warns; irrelevant here
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for t in tensors:
        # Only real dense CPU tensors own memory here: FakeTensors and functional wrappers that
        # earlier compile tests left in gc have no data pointer (accessing it raises) and no bytes.
        if t.device.type != "cpu" or t.is_meta or type(t) not in (torch.Tensor, torch.nn.Parameter):
            continue
        try:
            ptr = t.untyped_storage().data_ptr()
        except RuntimeError:
            continue
        if ptr:
            storages[ptr] = t.untyped_storage().nbytes()
    return storages


def _max_total_allocated(prof) -> int:
    """The largest `total_allocated` of the profiler's memory events (bytes allocated since profiling
    began and still alive). experimental_event_tree is a private API: fail with a clear message if
    it changes instead of measuring nothing."""
    try:
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError as e:
        pytest.fail(f"torch.profiler's private event tree API changed ({e}); update _max_total_allocated")
    allocs, stack = [], list(roots)
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        if "Allocation" in str(ev.tag):
            f = ev.extra_fields
            if getattr(f, "total_allocated", None) is None or getattr(f, "alloc_size", None) is None:
                pytest.fail("profiler allocation events no longer carry total_allocated / alloc_size; update the test")
            allocs.append((ev.start_time_ns, f.alloc_size, f.total_allocated))
    assert len(allocs) > 1000, f"only {len(allocs)} allocation events: the profiler did not record memory"
    allocs.sort()
    # the counter is process-wide: it still holds what earlier profiling sessions allocated and did
    # not free; its value at this session's start is the first event's total minus that event's size
    start = allocs[0][2] - allocs[0][1]
    return max(total for _, _, total in allocs) - start


def measure(tmp_path, pretrained, seed: int, precision: str):
    """(model estimate dict, measured peak bytes) for 2 training steps of the wide tiny SD."""
    cfg = load_config(sd_config(tmp_path, pretrained, run={"seed": seed}, engine={"precision": precision},
                                train={"batch_size": ROWS, "grad_accum": 1, "ema": {"halflife_kimg": 0.0}}))
    before = _live_storages()      # whatever earlier tests left in this process is not this run's
    parts = build_sd_parts(cfg)
    est = memory_model.estimate(cfg, parts, torch.device("cpu"))
    trainer = SFDTrainer(cfg, parts, None, torch.device("cpu"))
    base = sum(n for ptr, n in _live_storages().items() if ptr not in before)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step()
        trainer.train_step()
    return est, base + _max_total_allocated(prof)


@pytest.fixture(scope="module")
def measured(wide_sd, tmp_path_factory):
    """Three seeds in fp32 and one in bf16 (frozen networks stored in bf16, autocast's weight casts)."""
    tmp = tmp_path_factory.mktemp("mem_peak_runs")
    return {(seed, prec): measure(tmp, wide_sd, seed, prec) for seed, prec in
            ((0, "fp32"), (1, "fp32"), (2, "fp32"), (0, "bf16"))}


def test_model_is_within_15_percent_of_the_measured_peak(measured):
    for (seed, prec), (est, peak) in measured.items():
        ratio = est["total"] / peak
        print(f"seed {seed} {prec}: model {est['total'] / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB, "
              f"ratio {ratio:.3f} ({memory_model.describe(est)})")
        assert abs(ratio - 1) <= TOLERANCE, (seed, prec, ratio, est)
        # the terms are real: Adam state (8 B per trained parameter) and activations are each a
        # large share of the peak, so the comparison below is not won by the weights alone
        assert est["optimizer"] == 8 * sum(est["trained_parameters"].values())
        assert est["activations"] > 0.2 * peak and est["optimizer"] > 0.2 * peak


def test_dropping_a_term_breaks_the_bound(measured):
    """Not vacuous: the model without its activation term, or without Adam's state, misses the
    measured peak by more than the tolerance (so each term is needed to pass)."""
    for (seed, prec), (est, peak) in measured.items():
        for term in ("activations", "optimizer"):
            assert abs((est["total"] - est[term]) / peak - 1) > TOLERANCE, (seed, prec, term)


def test_bf16_stores_the_frozen_networks_in_bf16(measured):
    """The bf16 model counts the frozen teacher / text encoder / VAE at 2 B per element (they are
    stored so) and the trained networks at 4 B (fp32 masters): weights smaller than in fp32."""
    fp32, bf16 = measured[(0, "fp32")][0]["weights_by_network"], measured[(0, "bf16")][0]["weights_by_network"]
    for name in ("teacher", "text_encoder", "vae"):
        # half, up to integer buffers that keep their dtype (the text encoder's int64 position ids)
        assert abs(2 * bf16[name] - fp32[name]) <= 1e-2 * fp32[name], name
    for name in ("fake_score", "generator"):
        assert bf16[name] == fp32[name], name


def test_estimate_moves_no_random_or_prompt_stream(wide_sd, tmp_path):
    """The probe phases draw from a private generator and restore the text task's RNG state."""
    cfg = load_config(sd_config(tmp_path, wide_sd, train={"batch_size": 2, "grad_accum": 1}))
    parts = build_sd_parts(cfg)
    state = parts.task.rng_state().clone()
    cpu_rng = torch.get_rng_state().clone()
    memory_model.estimate(cfg, parts, torch.device("cpu"))
    assert torch.equal(parts.task.rng_state(), state)
    assert torch.equal(torch.get_rng_state(), cpu_rng)
