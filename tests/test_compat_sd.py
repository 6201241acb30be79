"""sfd_fast.compat.sd against the plain reference restatement (tests/test_compat_reference.py).

Tiny SD pipeline (sfd_fast.sd.tiny), fp32, fixed latents / noise / timesteps / prompts, odd batch 3.
Outputs and gradients (w.r.t. the input latents and every UNet parameter) must agree.

Tolerance: float32 rounding only. The compat path runs the same UNet call on the same rows; what
differs is the text-encoder batch (distinct prompts vs the full batch) and the order of a few
elementwise ops, i.e. rounding of O(1e-7) relative per op through a few hundred ops of the tiny
networks, amplified by up to 1/a_t ~ 20 at t = 979 in x0. We allow 1e-5 of each tensor's largest
magnitude (atol) plus 1e-4 relative: ~100x above that rounding, far below any real difference
(a wrong prompt, timestep or guidance changes outputs by O(1) of their scale).
"""
from __future__ import annotations

import pytest
import torch

from sfd_fast.compat import sd as compat
from tests.test_compat_reference import (LONG_PROMPT, reference_fake_score_loss_v, reference_sid_sd_denoise,
                                         reference_sid_sd_sampler)

PROMPTS = ["a photo of a cat", "a red car in the city", "a photo of a cat"]
NEGATIVES = ["blurry", "nsfw, nude", "blurry"]
T = torch.tensor([979, 20, 500])


def assert_close(actual, expected, what):
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * max(scale, 1e-12), msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def parts(request, tmp_path_factory):
    from sfd_fast.sd.tiny import build_tiny_sd

    folder = build_tiny_sd(tmp_path_factory.mktemp(f"tiny_{request.param}"), prediction_type=request.param)
    unet, vae, sched, te, tok, _ = compat.load_sd15(str(folder), None, "cpu", torch.float32)
    assert sched.config.prediction_type == request.param
    return unet, vae, sched, te, tok


def _inputs(seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 4, 16, 16, generator=g), \
        torch.randn(batch, 4, 16, 16, generator=g)


def _run_with_grads(fn, unet, images, weight):
    """Output, d(sum(out * weight))/d images, and the UNet parameter gradients."""
    unet.zero_grad(set_to_none=True)
    x = images.clone().requires_grad_(True)
    out = fn(x)
    (out * weight).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("guidance", [1.0, 4.5])
@pytest.mark.parametrize("negatives", [None, NEGATIVES])
@pytest.mark.parametrize("predict_x0", [True, False])
def test_denoise_matches_reference(parts, guidance, negatives, predict_x0):
    unet, _, sched, te, tok = parts
    images, noise, weight = _inputs()
    kw = dict(noise_scheduler=sched, text_encoder=te, tokenizer=tok, resolution=128, dtype=torch.float32,
              predict_x0=predict_x0, guidance_scale=guidance, contexts_neg=negatives)
    ref = _run_with_grads(lambda x: reference_sid_sd_denoise(unet, x, noise, PROMPTS, T, **kw), unet, images, weight)
    new = _run_with_grads(lambda x: compat.sid_sd_denoise(unet, x, noise, PROMPTS, T, **kw), unet, images, weight)
    assert new[0].dtype == torch.float32 and new[0].shape == images.shape
    for a, b, what in zip(new, ref, ("output", "grad images", "grad unet")):
        assert_close(a, b, what)
    assert ref[1].abs().max() > 0 and ref[2].abs().max() > 0  # the gradients compared are not trivially zero


@pytest.mark.parametrize("train_sampler,steps", [(True, 1), (False, 1), (False, 2)])
def test_sampler_matches_reference(parts, train_sampler, steps):
    unet, _, sched, te, tok = parts
    latents, _, weight = _inputs(1)
    init_t = torch.full((3,), 625)
    kw = dict(noise_scheduler=sched, text_encoder=te, tokenizer=tok, resolution=128, dtype=torch.float32,
              train_sampler=train_sampler, num_steps=steps, num_steps_eval=steps)

    def run(fn):
        torch.manual_seed(7)  # the fresh noise of step 2 (DDIM draws none in step(); compared for eps below)
        return _run_with_grads(lambda z: fn(unet, z, PROMPTS, init_t, **kw), unet, latents, weight) \
            if train_sampler else (fn(unet, latents, PROMPTS, init_t, **kw),)

    ref, new = run(reference_sid_sd_sampler), run(compat.sid_sd_sampler)
    if steps > 1 and sched.config.prediction_type == "epsilon":
        # DDPMScheduler.step draws variance noise before step 2's randn_like: the streams differ
        # (documented); with the emulation switch on they are the same.
        compat.emulate_scheduler_rng(True)
        try:
            new = run(compat.sid_sd_sampler)
        finally:
            compat.emulate_scheduler_rng(False)
    for a, b, what in zip(new, ref, ("output", "grad latents", "grad unet")):
        assert_close(a, b, what)


def test_sampler_decodes_images(parts):
    unet, vae, sched, te, tok = parts
    z = _inputs(2, batch=1)[0]
    with torch.no_grad():
        x0 = compat.sid_sd_sampler(unet, z, PROMPTS[:1], torch.tensor([625]), sched, te, tok, 128, torch.float32)
        images = compat.sid_sd_sampler(unet, z, PROMPTS[:1], torch.tensor([625]), sched, te, tok, 128, torch.float32,
                                       return_images=True, vae=vae)
        expected = vae.decode(x0 / vae.config.scaling_factor).sample
    assert images.shape == (1, 3, 128, 128) and images.dtype == torch.float32
    assert_close(images, expected, "decoded images")


def test_scheduler_rng_emulation_consumes_like_reference(parts):
    unet, _, sched, te, tok = parts
    images, noise, _ = _inputs()
    kw = dict(noise_scheduler=sched, text_encoder=te, tokenizer=tok, resolution=128, dtype=torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():
        reference_sid_sd_denoise(unet, images, noise, PROMPTS, T, **kw)
    after_ref = torch.randn(4)
    torch.manual_seed(3)
    compat.emulate_scheduler_rng(True)
    try:
        with torch.no_grad():
            compat.sid_sd_denoise(unet, images, noise, PROMPTS, T, **kw)
    finally:
        compat.emulate_scheduler_rng(False)
    torch.testing.assert_close(torch.randn(4), after_ref, rtol=0, atol=0)


def test_long_negative_prompt_is_truncated(parts):
    """The fix: a negative prompt over 77 tokens is truncated (the reference raises, see
    test_compat_reference.py), giving what the reference gives for the truncated prompt."""
    unet, _, sched, te, tok = parts
    images, noise, _ = _inputs()
    negs = [LONG_PROMPT, "blurry", LONG_PROMPT]
    kw = dict(noise_scheduler=sched, text_encoder=te, tokenizer=tok, resolution=128, dtype=torch.float32,
              guidance_scale=4.5, contexts_neg=negs)
    with torch.no_grad(), pytest.warns(UserWarning, match="truncated"):
        new = compat.sid_sd_denoise(unet, images, noise, PROMPTS, T, **kw)
    with torch.no_grad():
        ref = reference_sid_sd_denoise(unet, images, noise, PROMPTS, T, truncate_negatives=True, **kw)
    assert_close(new, ref, "long negative")


def test_fake_score_loss(parts):
    unet, _, sched, te, tok = parts
    images, noise, out = _inputs(4)
    loss = compat.sid_sd_fake_score_loss(out, images, noise, T, sched)
    if sched.config.prediction_type == "epsilon":
        expected = (out - noise) ** 2
    else:
        expected = reference_fake_score_loss_v(out, images, noise, T, sched)
        # the weighted v loss is the eps loss of the implied eps estimate
        ac = sched.alphas_cumprod[T].view(-1, 1, 1, 1)
        eps_hat = ac.sqrt() * out + (1 - ac).sqrt() * sched.add_noise(images, noise, T)
        assert_close(loss, (eps_hat - noise) ** 2, "v loss in eps units")
    assert_close(loss, expected, "fake-score loss")


def test_text_cache_follows_encoder_weights(parts):
    """Editing the text encoder in place (as an optimizer or load_state_dict does) must not serve
    stale embeddings; a train-mode encoder is not cached."""
    unet, _, sched, te, tok = parts
    images, noise, _ = _inputs()
    kw = dict(noise_scheduler=sched, text_encoder=te, tokenizer=tok, resolution=128, dtype=torch.float32,
              guidance_scale=4.5)
    saved = {k: v.clone() for k, v in te.state_dict().items()}
    try:
        with torch.no_grad():
            before = compat.sid_sd_denoise(unet, images, noise, PROMPTS, T, **kw)
            for p in te.parameters():
                p.mul_(1.5)
            after = compat.sid_sd_denoise(unet, images, noise, PROMPTS, T, **kw)
            ref_after = reference_sid_sd_denoise(unet, images, noise, PROMPTS, T, **kw)
            te.train()
            train_mode = compat.sid_sd_denoise(unet, images, noise, PROMPTS, T, **kw)
    finally:
        te.eval()
        te.load_state_dict(saved)
    assert (after - before).abs().max() > 1e-3  # the edit matters
    assert_close(after, ref_after, "after in-place edit")
    assert_close(train_mode, ref_after, "train-mode encoder (no dropout configured)")


def test_bad_inputs(parts):
    unet, _, sched, te, tok = parts
    images, noise, _ = _inputs()
    kw = dict(noise_scheduler=sched, text_encoder=te, tokenizer=tok, resolution=128)
    with pytest.raises(ValueError, match="contexts has 2 prompts"):
        compat.sid_sd_denoise(unet, images, noise, PROMPTS[:2], T, **kw)
    with pytest.raises(ValueError, match="contexts must be a list"):
        compat.sid_sd_denoise(unet, images, noise, "a cat", T, **kw)
    with pytest.raises(ValueError, match="contexts_neg has 1 prompts"):
        compat.sid_sd_denoise(unet, images, noise, PROMPTS, T, contexts_neg=["x"], guidance_scale=2.0, **kw)
    with pytest.raises(ValueError, match=r"timesteps must be a tensor of shape \[3\]"):
        compat.sid_sd_denoise(unet, images, noise, PROMPTS, T.view(3, 1), **kw)
    with pytest.raises(ValueError, match="timesteps must hold integer"):
        compat.sid_sd_denoise(unet, images, noise, PROMPTS, T.float(), **kw)
    with pytest.raises(ValueError, match="noise must have the shape"):
        compat.sid_sd_denoise(unet, images, noise[:2], PROMPTS, T, **kw)
    with pytest.raises(ValueError, match=r"init_timesteps must be a tensor of shape \[3\]"):
        compat.sid_sd_sampler(unet, images, PROMPTS, torch.tensor(625), **kw)
    with pytest.raises(ValueError, match="return_images=True needs vae"):
        compat.sid_sd_sampler(unet, images, PROMPTS, torch.full((3,), 625), return_images=True, **kw)


@pytest.mark.parametrize("option", [dict(clip_sample=True, clip_sample_range=0.5),
                                    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)])
def test_x0_clamping_options_as_scheduler_step(parts, option):
    """A scheduler config with clip_sample / thresholding makes step() clamp x0; the closed form
    does the same (thresholding grouped per sample and channel in denoise, per sample in the
    sampler, as the reference's per-sample and batched step() calls group it)."""
    unet, _, sched, te, tok = parts
    sched2 = type(sched).from_config({**sched.config, **option})
    if hasattr(sched, "num_inference_steps") and sched.num_inference_steps:
        sched2.set_timesteps(sched.num_inference_steps)
    images, noise, _ = _inputs(5)
    images = images * 3  # so that clamping changes many elements
    kw = dict(noise_scheduler=sched2, text_encoder=te, tokenizer=tok, resolution=128, dtype=torch.float32)
    with torch.no_grad():
        new = compat.sid_sd_denoise(unet, images, noise, PROMPTS, T, **kw)
        ref = reference_sid_sd_denoise(unet, images, noise, PROMPTS, T, **kw)
        unclamped = compat.sid_sd_denoise(unet, images, noise, PROMPTS, T, **{**kw, "noise_scheduler": sched})
        z_new = compat.sid_sd_sampler(unet, images, PROMPTS, torch.full((3,), 625), **kw)
        z_ref = reference_sid_sd_sampler(unet, images, PROMPTS, torch.full((3,), 625), **kw)
    assert (new - unclamped).abs().max() > 1e-3  # the option is in effect
    assert_close(new, ref, "denoise x0")
    assert_close(z_new, z_ref, "sampler x0")


def test_text_encoded_once_and_not_for_unused_uncond(parts):
    """Repeated calls reuse the cached embeddings; at guidance 1 the unconditional batch is not encoded."""
    from sfd_fast.compat import _text

    unet, _, sched, te, tok = parts
    images, noise, _ = _inputs()
    kw = dict(noise_scheduler=sched, text_encoder=te, tokenizer=tok, resolution=128, dtype=torch.float32)
    fresh = ["a green tree near a lake", "an old house", "a green tree near a lake"]
    with torch.no_grad():
        compat.sid_sd_denoise(unet, images, noise, fresh, T, **kw)
        cache = _text._entry(tok, te).cache
        rows = cache.encoded_rows
        compat.sid_sd_denoise(unet, images, noise, fresh, T, **kw)
        compat.sid_sd_sampler(unet, images, fresh, torch.full((3,), 625), **kw)
        assert cache.encoded_rows == rows  # nothing re-encoded
        compat.sid_sd_denoise(unet, images, noise, fresh, T, guidance_scale=4.5, contexts_neg=NEGATIVES, **kw)
        rows = cache.encoded_rows
        compat.sid_sd_denoise(unet, images, noise, fresh, T, guidance_scale=4.5, contexts_neg=NEGATIVES, **kw)
        assert cache.encoded_rows == rows


def test_batch_one_and_nan_row(parts):
    """Batch 1 matches; a NaN latent row gives NaN in that row only, the others match the reference."""
    unet, _, sched, te, tok = parts
    images, noise, _ = _inputs(6)
    kw = dict(noise_scheduler=sched, text_encoder=te, tokenizer=tok, resolution=128, dtype=torch.float32,
              guidance_scale=4.5)
    with torch.no_grad():
        one = compat.sid_sd_denoise(unet, images[:1], noise[:1], PROMPTS[:1], T[:1], **kw)
        assert_close(one, reference_sid_sd_denoise(unet, images[:1], noise[:1], PROMPTS[:1], T[:1], **kw), "batch 1")
        images[1, 2, 3, 4] = float("nan")
        new = compat.sid_sd_denoise(unet, images, noise, PROMPTS, T, **kw)
        ref = reference_sid_sd_denoise(unet, images, noise, PROMPTS, T, **kw)
    assert torch.isnan(new[1]).any() and torch.isnan(ref[1]).any()
    keep = torch.tensor([True, False, True])
    assert not torch.isnan(new[keep]).any()
    assert_close(new[keep], ref[keep], "rows without NaN")


def test_bench_floor_is_the_same_network_call(parts):
    """bench/bench_compat.py's "unet-floor" case must time the very UNet call sid_sd_denoise makes
    (same rows, embeddings, timesteps), or its `ceiling` would bound nothing: its output, CFG-combined,
    equals the compat raw output (same float32 rounding argument as above)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_compat.py"
    spec = importlib.util.spec_from_file_location("bench_compat_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    unet, _, sched, te, tok = parts
    images, noise, _ = _inputs(7, batch=len(bench.PROMPTS))
    t = torch.tensor([250, 750])
    out = bench._unet_call_only(unet, images, noise, t, sched, te, tok)()
    uncond, cond = out.chunk(2)
    with torch.no_grad():
        want = compat.sid_sd_denoise(unet, images, noise, bench.PROMPTS, t, sched, te, tok, 128, dtype=torch.float32,
                                     predict_x0=False, guidance_scale=4.5, contexts_neg=bench.NEGATIVES)
    assert_close(uncond + 4.5 * (cond - uncond), want, "floor call vs compat call")
