"""compat.sd.sid_sd_denoise vs the reference-structured sid_sd_denoise, same process, same inputs.

    pytest bench/bench_compat.py --benchmark-json=out.json      # CPU, ~30 s on 2 cores

Baseline: tests/test_compat_reference.py `reference_sid_sd_denoise` (the structure of SFD:SD
sd_util.py: tokenizer + text encoder on the prompts AND on the uncond/negative batch on every call,
diffusers add_noise, one `noise_scheduler.step` per sample). Fast: `sfd_fast.compat.sd.sid_sd_denoise`.
Both get the components of `load_sd15` (slow CLIP tokenizer, as the reference) on the tiny random
SD pipeline, fp32, CPU, 1 thread, batch 2, guidance 4.5 with negative prompts (the reference
teacher call of the nudity setting), predict_x0=True, under no_grad.

Providers
  baseline        the reference structure (above).
  fast            sfd_fast.compat.sd.sid_sd_denoise.
  unet-floor      the UNet call alone on the same 2B rows, embeddings and timesteps prepared outside
                  the timed region: what any implementation that keeps the reference's network call
                  (same rows, same weights, same dtype) must still pay. baseline / floor is the
                  ceiling of the whole-call speedup; it is reported as `ceiling`.

Configurations
  tiny-sd         the tiny pipeline's UNet: the whole call as a training loop sees it.
  tiny-sd-stub    the UNet replaced by a 1x1 convolution with the same call interface: what the
                  compat layer itself changes (text, add_noise, CFG combination, x0), without the
                  UNet time that both providers share.
extra_info: provider, config, batch, call_s (median); on the fast case speedup = baseline median /
fast median, and on the floor case ceiling = baseline median / floor median, when the baseline ran
earlier in the same session.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sfd_fast.compat import sd as compat
from tests.test_compat_reference import reference_sid_sd_denoise  # bench/conftest.py puts the repo root on sys.path

BATCH = 2
PROMPTS = ["a photo of a cat sitting on a red sofa in the sun", "a portrait of an old man, cinematic lighting"]
NEGATIVES = ["nsfw, nude, naked, blurry, low quality"] * BATCH
_MEDIANS: dict[str, float] = {}


class StubUNet(torch.nn.Module):
    """Same call interface as UNet2DConditionModel, ~no compute: out = conv1x1(x)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x, t, encoder_hidden_states):
        return SimpleNamespace(sample=self.conv(x))


def _unet_call_only(unet, images, noise, timesteps, sched, te, tok):
    """The network call of a guided denoise, everything else prepared once: [uncond; cond] rows of
    x_t, their embeddings and timesteps. Times the UNet as both providers call it (fp32, 2B rows)."""
    cond = compat.encode_prompt(te, compat.tokenize_captions(tok, PROMPTS))
    uncond = compat.encode_prompt(te, compat.tokenize_captions(tok, NEGATIVES))
    x_t = sched.add_noise(images, noise, timesteps)
    emb, t2, model_in = torch.cat([uncond, cond]), torch.cat([timesteps, timesteps]), torch.cat([x_t, x_t])

    def call():
        with torch.no_grad():
            return unet(model_in, t2, encoder_hidden_states=emb).sample
    return call


@pytest.fixture(scope="module")
def parts(tiny_sd_dir):
    unet, _, sched, te, tok, _ = compat.load_sd15(str(tiny_sd_dir), None, "cpu", torch.float32)
    return unet, sched, te, tok


@pytest.mark.parametrize("config", ["tiny-sd", "tiny-sd-stub"])
@pytest.mark.parametrize("provider", ["baseline", "fast", "unet-floor"])  # baseline first: the others report ratios
def test_sid_sd_denoise(benchmark, parts, config, provider):
    unet, sched, te, tok = parts
    if config == "tiny-sd-stub":
        unet = StubUNet()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 4, 16, 16, generator=g)
    noise = torch.randn(BATCH, 4, 16, 16, generator=g)
    timesteps = torch.tensor([250, 750])
    kw = dict(noise_scheduler=sched, text_encoder=te, tokenizer=tok, resolution=128, dtype=torch.float32,
              guidance_scale=4.5, contexts_neg=NEGATIVES)
    if provider == "unet-floor":
        target = _unet_call_only(unet, images, noise, timesteps, sched, te, tok)
    else:
        fn = compat.sid_sd_denoise if provider == "fast" else reference_sid_sd_denoise

        def target():
            with torch.no_grad():
                return fn(unet, images, noise, PROMPTS, timesteps, **kw)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: threads only add overhead on the shared CPU
    try:
        benchmark.pedantic(target, rounds=100, iterations=1, warmup_rounds=5)
    finally:
        torch.set_num_threads(threads)
    info = {"provider": provider, "config": config, "batch": BATCH, "threads": 1, "device": "cpu"}
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        _MEDIANS[f"{config}-{provider}"] = median
        info["call_s"] = median
        base = _MEDIANS.get(f"{config}-baseline")
        if provider == "fast" and base is not None:
            info["speedup"] = base / median
        if provider == "unet-floor" and base is not None:
            info["ceiling"] = base / median
    benchmark.extra_info.update(info)
