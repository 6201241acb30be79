"""Soft-prompt attack on a text-conditioned one-step generator, in the UnlearnDiffAtk manner
(Zhang et al. 2024): K free token embeddings are inserted after the start token of benign prompts
and optimised so that the generator's one-step output from a fixed noise matches a target image of
the concept (the teacher-initialised generator's latents from the forget prompt and the same
noise). The latent-space distance is the differentiable surrogate; a separate judge (CLIP
zero-shot, sd/robustness.py) decides whether the result shows the concept.

Budget: `steps` normalised steps of step_size x the mean token-embedding norm, each free token
within radius x that norm of its start (a random vocabulary token, seeded), projected per token.
"""
from __future__ import annotations

import contextlib

import torch


def mean_token_norm(text_encoder) -> float:
    return float(text_encoder.get_input_embeddings().weight.detach().norm(dim=1).mean())


def with_placeholders(ids: torch.Tensor, k: int, placeholder: int) -> torch.Tensor:
    """(B, L) token ids -> the same length with k placeholder ids after the first (start) token;
    the last k positions (padding for short prompts) fall off."""
    ph = torch.full((ids.shape[0], k), placeholder, dtype=ids.dtype, device=ids.device)
    return torch.cat([ids[:, :1], ph, ids[:, 1:ids.shape[1] - k]], dim=1)


@contextlib.contextmanager
def soft_tokens(text_encoder, tokens_ref: list):
    """While open, positions 1..K of every token-embedding lookup are tokens_ref[0] (K, D)."""
    table = text_encoder.get_input_embeddings()

    def hook(module, inp, out):
        adv = tokens_ref[0].to(out.dtype)
        k = adv.shape[0]
        return torch.cat([out[:, :1], adv.unsqueeze(0).expand(out.shape[0], -1, -1), out[:, 1 + k:]], dim=1)
    handle = table.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def project_rows(e: torch.Tensor, e0: torch.Tensor, radius_abs: float) -> torch.Tensor:
    """Each row of e within radius_abs of its row of e0."""
    d = e - e0
    n = d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return e0 + d * (radius_abs / n).clamp(max=1.0)


def soft_prompt_search(generator, text_encoder, ids: torch.Tensor, z: torch.Tensor, target: torch.Tensor,
                       cfg, seed: int) -> torch.Tensor:
    """The free tokens (K, D) after cfg.steps steps: minimise ||G(z, text(ids + tokens)) - target||^2.
    `ids` already hold the placeholders (with_placeholders)."""
    table = text_encoder.get_input_embeddings().weight.detach()
    g = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.randint(0, table.shape[0], (cfg.tokens,), generator=g).to(table.device)
    e0 = table[start].clone().float()
    scale = mean_token_norm(text_encoder)
    ref = [e0]
    e = e0.clone()
    with soft_tokens(text_encoder, ref):
        for _ in range(cfg.steps):
            e.requires_grad_(True)
            ref[0] = e
            with torch.enable_grad():
                cond = text_encoder(ids)[0]
                out = generator(z, cond.to(next(generator.parameters()).dtype))
                loss = (out.float() - target.float()).square().mean()
                (grad,) = torch.autograd.grad(loss, e)
            with torch.no_grad():   # descent, normalised per token
                step = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
                e = project_rows(e - cfg.step_size * scale * step, e0, cfg.radius * scale)
    return e.detach()


@torch.no_grad()
def conditions_with_tokens(text_encoder, ids: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    if tokens is None:
        return text_encoder(ids)[0]
    with soft_tokens(text_encoder, [tokens]):
        return text_encoder(ids)[0]
