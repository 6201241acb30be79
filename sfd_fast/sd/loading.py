"""Stable Diffusion components for SFD (reference: SFD:SD/training/sd_util.py `load_sd15`).

`load_stable_diffusion(pretrained)` returns an `SDComponents` with the UNet (the teacher / the
template for fake score and generator), the frozen CLIP text encoder + tokenizer, the frozen VAE and
a closed-form `VPSchedule` built from the scheduler config. No `DDPMScheduler.step` is ever called
in training: x0 comes from `VPSchedule.x0_from_output` (no host syncs, no discarded randn draws).

Scheduler options that make diffusers' `step()` modify x0 (`clip_sample`, `thresholding`) are
refused: the closed-form x0 does not clamp, so such a checkpoint would silently train against a
different teacher than the one it samples with.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..denoisers import TextUNetDenoiser
from ..schedules import BETA_SCHEDULES, VPSchedule

# Subfolders a diffusers Stable Diffusion folder must have for SFD.
REQUIRED_PARTS = ("model_index.json", "unet", "text_encoder", "tokenizer", "vae", "scheduler")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ATTENTION = ("sdpa", "eager", "xformers")


@dataclass
class SDComponents:
    """Everything SFD needs from a Stable Diffusion checkpoint.

    unet: UNet2DConditionModel in eval mode with requires_grad False (the teacher role); callers
        deepcopy it for the fake score / generator and re-enable gradients there.
    text_encoder, vae: frozen (eval, requires_grad False).
    schedule: VPSchedule (a_t, b_t tables on `device`, prediction type from the scheduler config).
    scheduler_config: the raw scheduler config dict (for export / diffusers samplers).
    vae_scaling_factor: latents = vae.encode(x).latent_dist * factor (SD1.5: 0.18215).
    vae_scale_factor: pixel / latent side ratio (8 for SD).
    """

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module
    schedule: VPSchedule
    scheduler_config: dict
    vae_scaling_factor: float
    vae_scale_factor: int = 8
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def prediction(self) -> str:
        return self.schedule.prediction

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def latent_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def text_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)


def _check_pretrained(pretrained: str) -> tuple[str, bool]:
    """-> (path or hub id, is_local). Raises with what is missing and what to do."""
    p = Path(pretrained).expanduser()
    if p.is_dir():
        missing = [part for part in REQUIRED_PARTS if not (p / part).exists()]
        if missing:
            raise FileNotFoundError(
                f"Stable Diffusion folder {str(p)!r} is missing {', '.join(missing)}. Expected a "
                f"diffusers pipeline folder (as written by StableDiffusionPipeline.save_pretrained) "
                f"with {', '.join(REQUIRED_PARTS)}; download the full model (e.g. "
                f"`huggingface-cli download runwayml/stable-diffusion-v1-5 --local-dir DIR`) or "
                f"build a test one with `python -m sfd_fast.sd.tiny DIR`.")
        return str(p), True
    if p.exists():
        raise ValueError(f"pretrained={str(p)!r} is a file, not a diffusers Stable Diffusion folder.")
    if _HUB_ID.match(pretrained) and not pretrained.startswith((".", "/", "~")):
        return pretrained, False
    raise FileNotFoundError(
        f"pretrained={pretrained!r} is neither an existing local folder nor a Hugging Face hub id "
        f"of the form 'org/name'. Pass the path of a diffusers Stable Diffusion folder (with "
        f"{', '.join(REQUIRED_PARTS)}) or a hub id such as 'runwayml/stable-diffusion-v1-5'.")


def _load_scheduler_config(src: str, local: bool) -> dict:
    if local:
        f = Path(src) / "scheduler" / "scheduler_config.json"
        if not f.is_file():
            raise FileNotFoundError(f"{str(f)!r} not found: the scheduler folder of {src!r} has no config.")
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{str(f)!r} is not a valid scheduler config ({e}); restore it from the model's "
                             "original files") from None
    from diffusers import DDPMScheduler
    return dict(DDPMScheduler.load_config(src, subfolder="scheduler"))


def schedule_from_config(cfg: dict, source: str = "") -> VPSchedule:
    """Closed-form VPSchedule from a diffusers scheduler config; refuses x0-clamping options.

    linear / scaled_linear betas are rebuilt in float64 (`VPSchedule.from_betas`); `trained_betas`
    are used as given; other schedules (squaredcos_cap_v2, sigmoid, rescale_betas_zero_snr) take
    diffusers' own alphas_cumprod so they match by construction.
    """
    where = f" (scheduler config of {source!r})" if source else ""
    for key in ("clip_sample", "thresholding"):
        if cfg.get(key, False):
            raise ValueError(
                f"scheduler option {key}=true{where} is not supported: diffusers' step() would clamp "
                f"the x0 estimate, but sfd_fast computes x0 in closed form without clamping, so the "
                f"teacher would differ from what the checkpoint samples with. Set {key} to false in "
                f"scheduler/scheduler_config.json if the model was trained without it (SD1.x/2.x "
                f"ship clip_sample=false).")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {prediction!r}{where}")
    T = int(cfg.get("num_train_timesteps", 1000))
    kind = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None:
        betas = torch.as_tensor(cfg["trained_betas"], dtype=torch.float64)
        return VPSchedule(torch.cumprod(1.0 - betas, dim=0), prediction)
    if kind in BETA_SCHEDULES and not cfg.get("rescale_betas_zero_snr", False):
        return VPSchedule.from_betas(kind, float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02)),
                                     T, prediction)
    from diffusers import DDPMScheduler
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "rescale_betas_zero_snr")
    ref = DDPMScheduler(**{k: cfg[k] for k in keys if k in cfg})
    # Zero-SNR rescaling makes a_{T-1} ~ 0 (diffusers clamps it to 2**-24): eps-prediction x0 is
    # ill-conditioned there; such models are v-prediction in practice.
    return VPSchedule(ref.alphas_cumprod.double(), prediction)


def _set_attention(unet, attention: str) -> None:
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    elif attention == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0
        unet.set_attn_processor(AttnProcessor2_0())
    else:
        from diffusers.models.attention_processor import AttnProcessor
        unet.set_attn_processor(AttnProcessor())


def load_stable_diffusion(pretrained: str, device="cpu", dtype: torch.dtype = torch.float32,
                          attention: str = "sdpa", variant: str | None = None) -> SDComponents:
    """Load a diffusers Stable Diffusion folder (or hub id) into `SDComponents` on `device`.

    pretrained: local diffusers folder (loaded with local_files_only=True) or a hub id "org/name".
    dtype: dtype of unet, text encoder and VAE (the reference's `weight_dtype`; fp16 with --fp16).
    attention: "sdpa" (torch scaled_dot_product_attention), "eager" (plain matmul) or "xformers";
        None leaves the UNet's processors as diffusers builds them (training runs: engine/plan.py decides).
    variant: diffusers weight variant, e.g. "fp16" (the reference loads it with --fp16).
    """
    if attention is not None and attention not in ATTENTION:
        raise ValueError(f"attention={attention!r}; expected one of {ATTENTION}")
    src, local = _check_pretrained(str(pretrained))
    try:
        return _load_components(src, local, device, dtype, variant, attention)
    except OSError as e:   # offline / unknown hub id, an empty or broken component folder
        where = f"the hub id {src!r} (no network or no such model?)" if not local else f"the folder {src!r}"
        raise FileNotFoundError(f"model.pretrained: cannot load Stable Diffusion from {where}: "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. Point "
                                "model.pretrained at a complete local diffusers folder") from None


def _load_components(src: str, local: bool, device, dtype, variant, attention) -> "SDComponents":
    scheduler_config = _load_scheduler_config(src, local)
    schedule = schedule_from_config(scheduler_config, src).to(device)

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from diffusers.utils import is_accelerate_available

    kw = dict(local_files_only=local)
    # diffusers defaults to low_cpu_mem_usage=True and warns when accelerate is missing.
    dkw = dict(kw, low_cpu_mem_usage=is_accelerate_available())
    tokenizer = AutoTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
    # transformers 5 uses `dtype=` (torch_dtype is deprecated there); diffusers still uses torch_dtype.
    text_encoder = CLIPTextModel.from_pretrained(
        src, subfolder="text_encoder", dtype=dtype, variant=variant,
        attn_implementation="sdpa" if attention != "eager" else "eager", **kw)
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype, variant=variant, **dkw)
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype, variant=variant, **dkw)
    if attention is not None:          # None: as diffusers built it (training: the acceleration plan sets it)
        _set_attention(unet, attention)

    for m in (unet, text_encoder, vae):
        m.to(device).eval().requires_grad_(False)

    n = len(vae.config.block_out_channels)
    return SDComponents(
        unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, schedule=schedule,
        scheduler_config=scheduler_config,
        vae_scaling_factor=float(getattr(vae.config, "scaling_factor", 0.18215)),
        vae_scale_factor=2 ** (n - 1), source=src,
    )


def sd_denoiser(unet, schedule: VPSchedule) -> TextUNetDenoiser:
    """The SFD denoiser protocol around a UNet2DConditionModel (cond = text embeddings (B,77,D))."""
    return TextUNetDenoiser(unet, schedule)
