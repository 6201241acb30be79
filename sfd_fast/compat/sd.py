"""Drop-in replacements for SFD:SD/training/sd_util.py (and SiD-LSG's sid_sd_util.py).

    # from training.sd_util import load_sd15, sid_sd_sampler, sid_sd_denoise
    from sfd_fast.compat.sd import load_sd15, sid_sd_sampler, sid_sd_denoise

Same parameter names, defaults, return shapes and dtypes as the reference (spec §6.1); the same
network calls (`unet(x.to(dtype), t, encoder_hidden_states=emb).sample`, so DDP-wrapped UNets
work), the same CFG batch order ([uncond; cond]) and arithmetic. What is faster:
  * text embeddings come from a bounded cache per (tokenizer, text encoder) that is invalidated
    when the encoder's weights change (_text.py); "" and negative prompts are encoded once; the
    unconditional batch is not encoded at all when guidance_scale == 1 (it is unused);
  * x0 = pred_original_sample in closed form on the whole batch (_vp.py), instead of one
    `noise_scheduler.step` per sample (host syncs and a discarded randn draw each);
  * a_t, b_t tables live on the device (no per-call copy of alphas_cumprod).
Deliberate differences (docs/compat.md): negative prompts longer than the tokenizer's limit are
truncated like positive ones (the reference raises); `step()`'s variance noise is not drawn, so
the global RNG advances differently (call `emulate_scheduler_rng(True)` to draw and
discard it as the reference does); the eval sampler computes x0 in float32 (the
reference rounds b_t * eps to the UNet dtype first). `sid_sd_fake_score_loss` is the fake-score
loss with the v-prediction target the reference meant (its code raises for v-prediction).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ._checks import check_latents, check_prompts, check_same_shape, check_timesteps
from ._text import clear_text_cache, text_embeddings  # noqa: F401  (clear_text_cache re-exported)
from . import _vp
from ._vp import tables_for

__all__ = ["load_sd15", "sid_sd_sampler", "sid_sd_denoise", "sid_sd_fake_score_loss", "tokenize_captions",
           "encode_prompt", "upcast_vae", "clear_text_cache", "emulate_scheduler_rng"]


def emulate_scheduler_rng(enabled: bool = True) -> None:
    """Draw and discard the variance noise the reference's `scheduler.step()` calls draw, so that a
    loop using these functions consumes the global RNG exactly as the reference (off by default)."""
    _vp.EMULATE_SCHEDULER_RNG = bool(enabled)


def load_sd15(pretrained_model_name_or_path, pretrained_vae_model_name_or_path, device, weight_dtype,
              revision=None, variant=None, lora_config=None, enable_xformers=False, gradient_checkpointing=False):
    """Load SD1.x as the reference does: returns (unet, vae, noise_scheduler, text_encoder, tokenizer,
    unet_cpu_copy).

    The slow CLIP tokenizer (use_fast=False); DDPMScheduler, or DDIMScheduler with
    set_timesteps(T) for a v-prediction model; unet, text encoder and VAE on `device` in
    `weight_dtype`, text encoder and VAE frozen; `unet_cpu_copy` a host deepcopy in weight_dtype.
    `pretrained_vae_model_name_or_path` and `lora_config` are ignored, as in the reference.
    Differences: a local folder missing a part is reported up front; a local folder is read with
    local_files_only. (SiD-LSG's variant returns the first five values only.)
    """
    import copy

    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from ..sd.loading import _check_pretrained

    src, local = _check_pretrained(str(pretrained_model_name_or_path))
    kw = dict(revision=revision, local_files_only=local)
    tokenizer = AutoTokenizer.from_pretrained(src, subfolder="tokenizer", use_fast=False, **kw)
    noise_scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
    if noise_scheduler.config.prediction_type == "v_prediction":
        noise_scheduler = DDIMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
        noise_scheduler.set_timesteps(noise_scheduler.config.num_train_timesteps)
    text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", variant=variant, **kw)
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae", variant=variant, **kw)
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", variant=variant, **kw)
    vae.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    unet_cpu_copy = copy.deepcopy(unet).to(dtype=weight_dtype)
    unet.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    if enable_xformers:
        from diffusers.utils.import_utils import is_xformers_available
        if not is_xformers_available():
            raise ValueError("enable_xformers=True but xformers is not installed: pip install 'sfd-fast[gpu]' "
                             "(or pass enable_xformers=False to use PyTorch's SDPA attention)")
        unet.enable_xformers_memory_efficient_attention()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet, vae, noise_scheduler, text_encoder, tokenizer, unet_cpu_copy


def tokenize_captions(tokenizer, examples):
    """(B, model_max_length) input ids, padded to max length and truncated (reference helper)."""
    return tokenizer(list(examples), truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompt(text_encoder, input_ids):
    """Last hidden states of `input_ids` (no attention mask, no grad), as the reference helper."""
    return text_encoder(input_ids.to(text_encoder.device), attention_mask=None)[0]


def upcast_vae(vae):
    """VAE to float32 in place; with SDPA/xformers attention the blocks that do not overflow in fp16
    (post_quant_conv, decoder.conv_in, decoder.mid_block) are put back in the original dtype."""
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    dtype = vae.dtype
    vae.to(dtype=torch.float32)
    if isinstance(vae.decoder.mid_block.attentions[0].processor, (AttnProcessor2_0, XFormersAttnProcessor)):
        vae.post_quant_conv.to(dtype)
        vae.decoder.conv_in.to(dtype)
        vae.decoder.mid_block.to(dtype)


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in about [-1, 1] (float32) from x0 latents; an fp16 VAE with force_upcast runs in fp32."""
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        upcast_vae(vae)
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
    images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    if upcast:
        vae.to(dtype=torch.float16)
    return images.to(torch.float32)


def sid_sd_sampler(unet, latents, contexts, init_timesteps, noise_scheduler, text_encoder, tokenizer, resolution,
                   dtype=torch.float16, return_images=False, vae=None, guidance_scale=1, num_steps=1,
                   train_sampler=True, num_steps_eval=1):
    """One-step (or few-step) generator: x0 latents [B,4,h,w] float32, or decoded images
    [B,3,H,W] float32 with return_images=True (needs vae).

    latents: the standard-normal z; contexts: B prompts; init_timesteps: long [B] (all equal; the
    x0 step uses element 0, as the reference). Step i re-noises the current x0 to
    t_i = floor(init_timesteps * (1 - i/n)) with z at i = 0 and fresh randn_like noise after.
    train_sampler=True (n = num_steps) is differentiable w.r.t. the UNet (the caller decides on
    no_grad); train_sampler=False (n = num_steps_eval) runs the UNet under no_grad.
    guidance_scale and resolution are ignored, as in the reference.
    """
    batch = check_latents("latents", latents)
    prompts = check_prompts("contexts", contexts, batch)
    check_timesteps("init_timesteps", init_timesteps, batch)
    if return_images and vae is None:
        raise ValueError("return_images=True needs vae (the AutoencoderKL from load_sd15)")
    steps = num_steps if train_sampler else num_steps_eval
    if int(steps) < 1:
        raise ValueError(f"{'num_steps' if train_sampler else 'num_steps_eval'} must be >= 1; got {steps}")
    tables = tables_for(noise_scheduler, latents.device)
    emb = text_embeddings(text_encoder, tokenizer, prompts, latents.device)
    init_timesteps = init_timesteps.to(latents.device)
    d_x = torch.zeros_like(latents)
    x = latents
    for i in range(steps):
        noise = latents if i == 0 else torch.randn_like(x)
        t_i = (init_timesteps * (1 - i / steps)).to(torch.long)
        x = tables.add_noise(d_x, noise, t_i)
        if train_sampler:
            x = x.to(torch.float32)
        model_in = noise_scheduler.scale_model_input(x, t_i)
        with nullcontext() if train_sampler else torch.no_grad():
            out = unet(model_in.to(dtype), t_i, encoder_hidden_states=emb).sample
        # step() takes the first timestep for the whole batch
        t_step = t_i[:1].expand(batch)
        d_x = tables.x0(x.float(), out.float(), t_step, group_dim=1)
        # step() sees the float32 output in the train path and the UNet's dtype in the eval path
        tables.discard_step_noise(out.float() if train_sampler else out, t_step, per_sample=False)
    d_x = d_x.to(torch.float32)
    return _decode(vae, d_x) if return_images else d_x


def sid_sd_denoise(unet, images, noise, contexts, timesteps, noise_scheduler, text_encoder, tokenizer, resolution,
                   dtype=torch.float16, predict_x0=True, guidance_scale=1, contexts_neg=None):
    """Denoiser at x_t = a_t images + b_t noise: the x0 estimate (predict_x0=True) or the raw
    CFG-combined network output (eps / v), float32 [B,4,h,w]; differentiable w.r.t. `images`.

    images, noise: float [B,4,h,w]; timesteps: long [B] (per sample); contexts: B prompts;
    contexts_neg: B negative prompts or None. With guidance_scale != 1 the UNet runs once on 2B
    rows [uncond; cond] (uncond = contexts_neg, or "" per sample) and out = u + g (c - u).
    """
    batch = check_latents("images", images)
    check_same_shape("noise", noise, "images", images)
    prompts = check_prompts("contexts", contexts, batch)
    check_timesteps("timesteps", timesteps, batch)
    negatives = None if contexts_neg is None else check_prompts("contexts_neg", contexts_neg, batch)
    tables = tables_for(noise_scheduler, images.device)
    timesteps = timesteps.to(images.device)
    cond = text_embeddings(text_encoder, tokenizer, prompts, images.device)
    x_t = tables.add_noise(images, noise, timesteps)
    if guidance_scale == 1:
        model_in = noise_scheduler.scale_model_input(x_t, timesteps)
        out = unet(model_in.to(dtype), timesteps, encoder_hidden_states=cond).sample.to(torch.float32)
    else:
        uncond = text_embeddings(text_encoder, tokenizer, negatives if negatives is not None else [""] * batch,
                                 images.device, pin=negatives is not None)
        t2 = torch.cat([timesteps, timesteps])
        model_in = noise_scheduler.scale_model_input(torch.cat([x_t, x_t]), t2)
        out = unet(model_in.to(dtype), t2, encoder_hidden_states=torch.cat([uncond, cond])).sample.to(torch.float32)
        out_uncond, out_cond = out.chunk(2)
        out = out_uncond + guidance_scale * (out_cond - out_uncond)
    if not predict_x0:
        return out
    # the reference steps each sample alone ([C,H,W]): dynamic thresholding then groups per channel
    x0 = tables.x0(x_t.to(torch.float32), out, timesteps, group_dim=2)
    tables.discard_step_noise(out, timesteps, per_sample=True)
    return x0.to(torch.float32)


def sid_sd_fake_score_loss(model_output, images, noise, timesteps, noise_scheduler):
    """Unreduced fake-score loss [B,4,h,w] for `sid_sd_denoise(..., predict_x0=False)` output.

    epsilon: (out - noise)^2, as the reference. v_prediction: the reference computes the velocity
    target and the SNR weight snr/(snr+1) but then sets `target = None` and raises; this returns what
    it meant, (out - v)^2 * snr/(snr+1) with v = a_t noise - b_t images and snr = a_t^2/b_t^2. That
    weight makes it equal to the epsilon loss of the implied eps-estimate: eps - eps_hat =
    a_t (v - v_hat), and snr/(snr+1) = a_t^2. "sample" prediction: (out - images)^2.
    The caller reduces it (the reference: `.sum() * loss_scaling / batch_gpu_total`).
    """
    batch = check_latents("images", images)
    check_same_shape("noise", noise, "images", images)
    check_same_shape("model_output", model_output, "images", images)
    check_timesteps("timesteps", timesteps, batch)
    tables = tables_for(noise_scheduler, images.device)
    out = model_output.to(torch.float32)
    if tables.prediction == "epsilon":
        return (out - noise.float()) ** 2
    a, b = tables.coefs(timesteps.to(images.device), images)
    if tables.prediction == "v_prediction":
        v = a * noise.float() - b * images.float()
        snr = (a / b) ** 2
        return (out - v) ** 2 * (snr / (snr + 1))
    return (out - images.float()) ** 2
