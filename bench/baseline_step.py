"""The reference-structured SFD step for Stable Diffusion (PERFORMANCE.md "The baseline").

A straightforward transcription of the public SFD:SD training loop (spec §1b, sd_util
`sid_sd_sampler` / `sid_sd_denoise`), kept ONLY to measure the fast step against. On purpose it has
every inefficiency of spec §5.1 that is not about precision or distribution:

  * remain and forget run as separate passes (G, fake score and teacher each run twice at B);
  * x0 goes through diffusers' `scheduler.step()`: once per batch in the generator, and one sample
    at a time in the denoiser (host syncs, and a discarded randn per call);
  * the text is tokenized and re-encoded on every sampler / denoiser call, the empty prompt too,
    even when it is not needed;
  * a host sync for every loss (.item()) and every NaN check (nan_mask.any(),
    (~nan_mask).sum().item(), boolean-mask indexing);
  * `torch.cuda.empty_cache()` (on CUDA) and `gc.collect()` twice per iteration;
  * `.train()/.eval()/.requires_grad_()` toggles over all parameters as the reference does;
  * per-parameter nan_to_num loops; plain (non-fused) Adam; no compile.

Precision is NOT part of the baseline: it runs under the same autocast as the fast step (bf16 with
fp32 master weights on CUDA, fp32 on CPU), so the measured ratio is about structure, not dtype.
The reference's pure-fp16 weights (spec §5.1 item 3) are a numerical bug, not a speed baseline.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import random
from dataclasses import dataclass

import torch

from sd_parts import SDBench, override_of  # noqa: E402  (bench/ is on sys.path under pytest)


@dataclass
class BranchDraws:
    """Explicit random inputs of one branch (remain or forget) of one phase."""
    contexts: list            # prompts for G and the fake score
    teacher_contexts: list    # prompts for the teacher (override prompts on the forget branch)
    z: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor


class BaselineSFD:
    """Reference-structured SFD step on an `SDBench` (its own copies of the three UNets)."""

    def __init__(self, sd: SDBench, batch: int, device, precision: str = "fp32", seed: int = 0,
                 batch_gpu: int | None = None,
                 alpha: float = 1.0, t_init: int = 625, t_min: int = 20, t_max: int = 980,
                 guidance=(4.5, 4.5, 4.5), coefs=(1.0, 1.0, 1.0, 1.0), lrs=(3e-6, 1e-6)):
        self.sd, self.B, self.device = sd, batch, torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True   # the reference's training_loop sets it (spec §2.3)
        # the reference's accumulation: R rounds of batch_gpu rows, losses over batch_gpu_total
        self.batch_gpu = batch_gpu or batch
        if batch % self.batch_gpu:
            raise ValueError(f"batch {batch} is not a multiple of batch_gpu {self.batch_gpu}")
        self.rounds = batch // self.batch_gpu
        self.alpha, self.t_init, self.t_min, self.t_max = alpha, t_init, t_min, t_max
        self.k1, self.k2, self.k4 = guidance
        self.sg_r, self.sg_f, self.g_r, self.g_f = coefs
        self.loss_scaling = self.loss_scaling_G = 1.0
        self.batch_gpu_total = batch
        self.precision = precision
        sd.text_encoder.to(self.device)
        self.teacher = copy.deepcopy(sd.unet).to(self.device).eval().requires_grad_(False)
        self.fake_score = copy.deepcopy(sd.unet).to(self.device).train().requires_grad_(True)
        self.G = copy.deepcopy(sd.unet).to(self.device).train().requires_grad_(True)
        self.dtype = next(self.teacher.parameters()).dtype
        self.scheduler = copy.deepcopy(sd.scheduler)
        self.fake_opt = torch.optim.Adam(self.fake_score.parameters(), lr=lrs[0], betas=(0.0, 0.999), eps=1e-8)
        self.g_opt = torch.optim.Adam(self.G.parameters(), lr=lrs[1], betas=(0.0, 0.999), eps=1e-8)
        self.prompt_rng = random.Random(seed)
        self.rng = torch.Generator(device=self.device).manual_seed(seed)

    # ---------------------------------------------------------------- sd_util equivalents
    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode(self, contexts) -> torch.Tensor:
        """tokenize_captions + encode_prompt: every call, no cache."""
        ids = self.sd.tokenizer(list(contexts), padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids
        with torch.no_grad():
            return self.sd.text_encoder(ids.to(self.device))[0]

    def sampler(self, unet, z, contexts) -> torch.Tensor:
        """sid_sd_sampler, training path, one step: x0 through scheduler.step on the batch."""
        emb = self.encode(contexts)
        t = torch.full((z.shape[0],), self.t_init, dtype=torch.long, device=self.device)
        x = self.scheduler.add_noise(torch.zeros_like(z), z, t)
        eps = unet(x.to(self.dtype), t, encoder_hidden_states=emb.to(self.dtype)).sample.float()
        return self.scheduler.step(eps, t[0], x).pred_original_sample.float()

    def denoise(self, unet, images, noise, contexts, t, predict_x0=True, guidance=1.0, contexts_neg=None):
        """sid_sd_denoise: cond and uncond ("" or negatives) encoded on every call; x0 per sample."""
        emb = self.encode(contexts)
        uncond = self.encode(contexts_neg if contexts_neg is not None else [""] * len(contexts))
        x_t = self.scheduler.add_noise(images, noise, t)
        if guidance == 1:
            eps = unet(x_t.to(self.dtype), t, encoder_hidden_states=emb.to(self.dtype)).sample.float()
        else:
            out = unet(torch.cat([x_t, x_t]).to(self.dtype), torch.cat([t, t]),
                       encoder_hidden_states=torch.cat([uncond, emb]).to(self.dtype)).sample.float()
            eps_u, eps_c = out.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        if not predict_x0:
            return eps
        x0 = [self.scheduler.step(eps[i], t[i], x_t[i]).pred_original_sample for i in range(eps.shape[0])]
        return torch.stack(x0).float()

    # ---------------------------------------------------------------- one branch of each phase
    def fake_score_round(self, d: BranchDraws, coef: float) -> float:
        with torch.no_grad():
            x_g = self.sampler(self.G, d.z, d.contexts)
        eps = self.denoise(self.fake_score, x_g, d.noise, d.contexts, d.t, predict_x0=False, guidance=self.k1)
        noise = d.noise
        nan_mask = torch.isnan(eps).flatten(1).any(1)
        if nan_mask.any():                               # host sync
            eps, noise = eps[~nan_mask], noise[~nan_mask]  # dynamic shape
        loss = (eps - noise).square().sum() * self.loss_scaling / self.batch_gpu_total
        if (~nan_mask).sum().item() > 0:                 # host sync
            loss.mul(coef).backward()
        return loss.item()                               # host sync

    def generator_round(self, d: BranchDraws, coef: float) -> float:
        x_g = self.sampler(self.G, d.z, d.contexts)
        y_fake = self.denoise(self.fake_score, x_g, d.noise, d.contexts, d.t, guidance=self.k2)
        y_real = self.denoise(self.teacher, x_g, d.noise, d.teacher_contexts, d.t, guidance=self.k4)
        nan_mask = (torch.isnan(x_g).flatten(1).any(1) | torch.isnan(y_real).flatten(1).any(1)
                    | torch.isnan(y_fake).flatten(1).any(1))
        if nan_mask.any():                               # host sync
            x_g, y_real, y_fake = x_g[~nan_mask], y_real[~nan_mask], y_fake[~nan_mask]
        with torch.no_grad():
            omega = (x_g - y_real).abs().mean(dim=[1, 2, 3], keepdim=True).clamp(min=1e-5)
        if self.alpha == 1:
            loss = (y_real - y_fake) * (y_fake - x_g) / omega
        else:
            loss = (y_real - y_fake) * ((y_real - x_g) - self.alpha * (y_real - y_fake)) / omega
        loss = loss.sum() * self.loss_scaling_G / self.batch_gpu_total
        if (~nan_mask).sum().item() > 0:                 # host sync
            loss.mul(coef).backward()
        return loss.item()                               # host sync

    # ---------------------------------------------------------------- draws and the iteration
    def draw_branch(self, forget: bool) -> BranchDraws:
        sd, B = self.sd, self.batch_gpu
        if forget:
            contexts = [self.prompt_rng.choice(sd.forget_prompts) for _ in range(B)]
            teacher_contexts = [override_of(p) for p in contexts]
        else:
            contexts = [self.prompt_rng.choice(sd.remain_prompts) for _ in range(B)]
            teacher_contexts = contexts
        shape = (B, *sd.latent_shape)
        z = torch.randn(shape, generator=self.rng, device=self.device)
        noise = torch.randn(shape, generator=self.rng, device=self.device)
        t = torch.randint(self.t_min, self.t_max, (B,), generator=self.rng, device=self.device)
        return BranchDraws(contexts, teacher_contexts, z, noise, t)

    @staticmethod
    def _nan_to_num_grads(module):
        for p in module.parameters():                    # per-parameter loop, as the reference
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)

    def _housekeeping(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        gc.collect()

    def train_step(self, draws: dict | None = None) -> dict:
        """One iteration; `draws` = {"fake": (remain, forget), "generator": (remain, forget)}
        of BranchDraws (one round), or None to draw them here. Returns the four losses of the
        last round as Python floats."""
        self._housekeeping()
        self.G.eval().requires_grad_(False)
        self.fake_score.train().requires_grad_(True)
        self.fake_opt.zero_grad(set_to_none=True)
        out = {}
        with self.autocast():
            for _ in range(self.rounds):
                fr, ff = draws["fake"] if draws else (self.draw_branch(False), self.draw_branch(True))
                out["fake_score/remain"] = self.fake_score_round(fr, self.sg_r)
                if self.sg_f > 0:
                    out["fake_score/forget"] = self.fake_score_round(ff, self.sg_f)
        self.fake_score.eval().requires_grad_(False)
        self._nan_to_num_grads(self.fake_score)
        self.fake_opt.step()

        self.G.train().requires_grad_(True)
        self.g_opt.zero_grad(set_to_none=True)
        with self.autocast():
            for _ in range(self.rounds):
                gr, gf = draws["generator"] if draws else (self.draw_branch(False), self.draw_branch(True))
                out["generator/remain"] = self.generator_round(gr, self.g_r)
                if self.g_f > 0:
                    out["generator/forget"] = self.generator_round(gf, self.g_f)
        self.G.eval()
        self._nan_to_num_grads(self.G)
        self.g_opt.step()
        self._housekeeping()
        return out
