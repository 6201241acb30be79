"""Plain restatements of the reference SD functions (SFD:SD/training/sd_util.py, spec §1b/§6.1),
written from the spec: tokenizer and text encoder on every call, the unconditional batch always
encoded (no truncation on it, as in the reference), diffusers' add_noise and one
`noise_scheduler.step` per sample. The compat tests compare against these; bench/bench_compat.py
times `reference_sid_sd_denoise` as the reference-structured baseline.

The tests in this file pin down the restatement's own reference behaviours that the compat
functions deliberately change (documented in docs/compat.md).
"""
from __future__ import annotations

import pytest
import torch


def _encode(text_encoder, tokenizer, prompts, device, truncation=True, max_length=None):
    ids = tokenizer(prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                    truncation=truncation, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids.to(device))[0]


def reference_sid_sd_sampler(unet, latents, contexts, init_timesteps, noise_scheduler, text_encoder, tokenizer,
                             resolution, dtype=torch.float16, train_sampler=True, num_steps=1, num_steps_eval=1):
    """sid_sd_sampler's latent path (return_images=False)."""
    emb = _encode(text_encoder, tokenizer, contexts, latents.device)
    d_x = torch.zeros_like(latents)
    steps = num_steps if train_sampler else num_steps_eval
    for i in range(steps):
        noise = latents if i == 0 else torch.randn_like(latents)
        t_i = (init_timesteps * (1 - i / steps)).to(torch.long)
        latents = noise_scheduler.add_noise(d_x, noise, t_i)
        if train_sampler:
            latents = latents.to(torch.float32)
            pred = unet(latents.to(dtype), t_i, encoder_hidden_states=emb).sample.to(torch.float32)
        else:
            with torch.no_grad():
                pred = unet(latents.to(dtype), t_i, encoder_hidden_states=emb).sample
        d_x = noise_scheduler.step(pred, t_i[0], latents, return_dict=True).pred_original_sample
    return d_x.to(torch.float32)


def reference_sid_sd_denoise(unet, images, noise, contexts, timesteps, noise_scheduler, text_encoder, tokenizer,
                             resolution, dtype=torch.float16, predict_x0=True, guidance_scale=1, contexts_neg=None,
                             truncate_negatives=False):
    """sid_sd_denoise. truncate_negatives=True: the fixed behaviour (the reference does not truncate
    the unconditional batch, so a negative prompt over the tokenizer's limit raises there)."""
    batch = len(contexts)
    cond = _encode(text_encoder, tokenizer, contexts, images.device)
    uncond = _encode(text_encoder, tokenizer, [""] * batch if contexts_neg is None else contexts_neg,
                     images.device, truncation=truncate_negatives, max_length=cond.shape[1])
    x_t = noise_scheduler.add_noise(images, noise, timesteps)
    if guidance_scale == 1:
        pred = unet(x_t.to(dtype), timesteps, encoder_hidden_states=cond).sample.to(torch.float32)
    else:
        t2 = torch.cat([timesteps, timesteps])
        pred = unet(torch.cat([x_t, x_t]).to(dtype), t2,
                    encoder_hidden_states=torch.cat([uncond, cond])).sample.to(torch.float32)
        pred_uncond, pred_cond = pred.chunk(2)
        pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
    if not predict_x0:
        return pred
    x_t = x_t.to(torch.float32)
    rows = [noise_scheduler.step(p, t, z, return_dict=True).pred_original_sample.to(torch.float32)
            for p, t, z in zip(pred, timesteps, x_t)]
    return torch.stack(rows)


def reference_fake_score_loss_v(noise_pred, images, noise, timesteps, noise_scheduler):
    """What the reference's v-prediction fake-score branch computes before `target = None` breaks it:
    (out - get_velocity)^2 * snr / (snr + 1), snr = alpha_bar / (1 - alpha_bar)."""
    target = noise_scheduler.get_velocity(images, noise, timesteps)
    ac = noise_scheduler.alphas_cumprod.to(images.device)[timesteps]
    snr = (ac / (1 - ac)).view(-1, 1, 1, 1)
    return (noise_pred - target) ** 2 * snr / (snr + 1)


LONG_PROMPT = " ".join(["red cat"] * 60)  # 120 words: well over CLIP's 77 tokens


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    from sfd_fast.compat.sd import load_sd15
    from sfd_fast.sd.tiny import build_tiny_sd

    folder = build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_ref"))
    return load_sd15(str(folder), None, "cpu", torch.float32)


def test_reference_raises_on_long_negative_prompt(tiny_parts):
    """The behaviour compat fixes: the reference tokenizes negatives without truncation, and CLIP's
    77 position embeddings cannot take the longer sequence."""
    unet, _, sched, te, tok, _ = tiny_parts
    x = torch.zeros(1, 4, 16, 16)
    with pytest.raises(Exception):
        reference_sid_sd_denoise(unet, x, x, ["a cat"], torch.tensor([500]), sched, te, tok, 128,
                                 dtype=torch.float32, guidance_scale=4.5, contexts_neg=[LONG_PROMPT])

