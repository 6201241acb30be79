"""Stable Diffusion SFD parts for the step benchmark and the baseline-equivalence test.

The fast side is the product path: SFDTrainer.train_step over the SD family's own text task
(sfd_fast.sd.build.make_task -> TextForgetTask) and denoisers; nothing is substituted (issue #10).
Two configurations:

  tiny-sd   the tiny random SD pipeline of `sfd_fast.sd.tiny` (16x16x4 latents, 77x32 text),
            built once into a folder; runs on CPU.
  sd15      diffusers' UNet2DConditionModel with SD1.5's config (859.5 M parameters, 64x64x4
            latents, 77x768 text) and a CLIP-L-shaped text encoder (123 M), random weights; CUDA.

Prompts: remain prompts from configs/prompts/remain_default.txt, forget prompts from
configs/prompts/brad_pitt_train.txt, override = forget prompt with "brad pitt" replaced by
"a middle aged man" (the reference's concept_to_override for its Brad Pitt run, spec §2.2).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sfd_fast.config import Config
from sfd_fast.generator import OneStepGenerator
from sfd_fast.schedules import VPSchedule

ROOT = Path(__file__).resolve().parents[1]
PROMPT_DIR = ROOT / "configs" / "prompts"
CONCEPT, OVERRIDE = "brad pitt", "a middle aged man"

# The reference's SD run (spec §2.2): kappa1 = kappa2 = kappa4 = 4.5, t_init 625, t in [20, 980).
SFD_SD = dict(alpha=1.0, t_init=625, t_min=20, t_max=980, cfg_train_fake=4.5, cfg_eval_fake=4.5,
              cfg_eval_real=4.5, sg_remain_coef=1.0, sg_forget_coef=1.0, g_remain_coef=1.0,
              g_forget_coef=1.0)


def read_prompts(name: str) -> list[str]:
    return [l.strip() for l in (PROMPT_DIR / name).read_text(encoding="utf-8").splitlines() if l.strip()]


def override_of(prompt: str) -> str:
    return re.sub(CONCEPT, OVERRIDE, prompt, flags=re.IGNORECASE)


@dataclass
class SDBench:
    """Frozen pieces shared by the fast step and the baseline (weights are copied per provider)."""
    name: str
    unet: torch.nn.Module             # teacher weights; fake score and generator start as copies
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object                 # diffusers DDPMScheduler (used by the baseline only)
    schedule: VPSchedule              # closed form (used by the fast step)
    latent_shape: tuple
    remain_prompts: list = field(default_factory=lambda: read_prompts("remain_default.txt"))
    forget_prompts: list = field(default_factory=lambda: read_prompts("brad_pitt_train.txt"))

    @property
    def override_prompts(self) -> list[str]:
        return [override_of(p) for p in self.forget_prompts]

    def to(self, device):
        self.unet.to(device)
        self.text_encoder.to(device)
        self.schedule.to(device)
        return self


def build_tiny(folder) -> SDBench:
    """The tiny random SD pipeline written by `build_tiny_sd` (see tiny_sd.py)."""
    from diffusers import DDPMScheduler

    from sfd_fast.sd.loading import load_stable_diffusion

    c = load_stable_diffusion(str(folder), device="cpu")
    scheduler = DDPMScheduler.from_config(c.scheduler_config)
    return SDBench("tiny-sd", c.unet, c.text_encoder, c.tokenizer, scheduler,
                   VPSchedule(c.schedule.alphas_cumprod, c.schedule.prediction),
                   (4, c.latent_size, c.latent_size))


def build_sd15(seed: int = 0, device: str = "cpu") -> SDBench:
    """SD1.5-architecture UNet and CLIP-L-shaped text encoder with random weights (no download).
    device="cuda": the ~1 B parameters are created and initialised on the GPU (seconds instead of
    the tens of seconds a CPU init takes on the device's 16 cores; the draws differ from CPU's)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sfd_fast.sd.loading import schedule_from_config
    from sfd_fast.sd.tiny import BOS, EOS, SD15_SCHEDULER, build_tiny_tokenizer

    tokenizer, vocab, _ = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
            bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
            hidden_act="quick_gelu"))
    from diffusers.models.attention_processor import AttnProcessor2_0
    unet.set_attn_processor(AttnProcessor2_0())
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    scheduler = DDPMScheduler(prediction_type="epsilon", **SD15_SCHEDULER)
    cfg = dict(scheduler.config)
    return SDBench("sd15", unet, text_encoder, tokenizer, scheduler, schedule_from_config(cfg), (4, 64, 64))


def sd_config(batch: int, precision: str, compile_: bool = False, kernels: str = "auto",
              device: str = "cpu", seed: int = 0, grad_accum: int = 1) -> Config:
    """The trainer config of the SD benchmark: reference SD hyper-parameters, fp32 master weights."""
    cfg = Config()
    for k, v in SFD_SD.items():
        setattr(cfg.sfd, k, v)
    cfg.run.seed, cfg.run.device = seed, device
    cfg.train.batch_size, cfg.train.grad_accum, cfg.train.progress = batch, grad_accum, False
    cfg.train.ema.halflife_kimg = 0.0
    cfg.optim.fake_score.lr, cfg.optim.generator.lr = 3e-6, 1e-6
    cfg.engine.precision, cfg.engine.compile, cfg.engine.kernels = precision, compile_, kernels
    return cfg


def bench_prompts(cfg: Config) -> Config:
    """The benchmark's prompt sets in `cfg.prompts` (the files the baseline samples from)."""
    pr = cfg.prompts
    pr.remain_file = str(PROMPT_DIR / "remain_default.txt")
    pr.forget_file = str(PROMPT_DIR / "brad_pitt_train.txt")
    pr.concept_to_forget, pr.concept_to_override = CONCEPT, OVERRIDE
    return cfg


def fast_parts(sd: SDBench, cfg: Config, device):
    """RunParts for SFDTrainer, the product's: the text task is `sfd_fast.sd.build.make_task` (the
    real TextForgetTask over a TextEncoderCache of this text encoder: remain captions drawn and
    encoded per draw through the bounded cache, context dropout, override prompts), the denoisers are
    `sfd_fast.sd.loading.sd_denoiser`. Only the UNet weights come from `sd` (random for sd15, so no
    pipeline folder is written); teacher = a frozen copy, fake score and generator = trainable copies."""
    from sfd_fast.sd.build import make_task
    from sfd_fast.sd.loading import sd_denoiser
    from sfd_fast.sd.text import TextEncoderCache
    from sfd_fast.trainer import RunParts

    fake_net = copy.deepcopy(sd.unet).requires_grad_(True)
    gen_net = copy.deepcopy(sd.unet).requires_grad_(True)
    teacher_net = copy.deepcopy(sd.unet)  # own copy: compile works in place, the baseline is eager
    task = make_task(bench_prompts(cfg), TextEncoderCache(sd.text_encoder, sd.tokenizer, device))
    return RunParts(task, sd_denoiser(teacher_net, copy.deepcopy(sd.schedule)),
                    sd_denoiser(fake_net, copy.deepcopy(sd.schedule)),
                    OneStepGenerator(sd_denoiser(gen_net, copy.deepcopy(sd.schedule)), cfg.sfd.t_init),
                    tuple(sd.latent_shape))


def build_fast_trainer(sd: SDBench, cfg: Config, device, run_dir):
    from sfd_fast.trainer import SFDTrainer

    sd.to(device)
    return SFDTrainer(cfg, fast_parts(sd, cfg, device), Path(run_dir), torch.device(device))
