"""Analytic peak memory per GPU for SFD on the Stable Diffusion 1.5 architecture (CPU-OK, no weights).

    python bench/memory_report.py [--out docs/memory.md] [--micro-batch 1]

Every term except activations comes from sfd_fast.engine.memory_model on BUILT objects: SD1.5's
UNet (diffusers UNet2DConditionModel, SD1.5 config; teacher frozen, fake score and generator
trained), CLIP ViT-L/14's text encoder and SD's VAE are constructed on the `meta` device (shapes
and dtypes, no memory), the frozen ones cast to bf16 as sfd_fast/sd/build.py stores them, and
memory_model's static_terms / phase_terms / combine count weights, EMA, optimizer state (Adam or
bitsandbytes 8-bit Adam), DeepSpeed's fp32 masters, gradients, buckets and the optimizer step.

Activations cannot come from memory_model's real-phase probe on the meta device (no compute); they
come from a meta trace of one UNet forward at 4x64x64 latents / 77x768 text with memory_model's
saved-tensor counter (trace_saved), per row, then assembled per phase (spec section 3):
  * attention as a flash / memory-efficient kernel saves it (q, k, v, out, log-sum-exp; no L x L
    matrix): SDPA on CUDA in bf16, or xformers; the trace runs in bf16;
  * "full" pass: trained weights (saves the inputs of every linear/conv for the weight gradient);
    "input-only": frozen weights, gradient to the input only. The generator phase holds at once G
    (1 row per sample, full), the fake score with CFG (2 rows, input-only) and the teacher with CFG
    (2 rows, input-only); the fake-score phase holds the fake score with CFG (2 rows, full). Remain
    and forget ride in one batch: a micro-batch of b + b samples is 2b rows;
  * activation checkpointing (every ResNet and Transformer2D block a unit): what is saved outside
    the units, plus every unit's input, plus the largest unit (recomputed in the backward);
  * plain bf16 autocast saves bf16 casts of the fp32 trained weights (the generator's, cached, and
    the fake score's through FrozenView in the generator phase; the fake score's in its own phase):
    2 B per parameter each, added to that phase (on CPU memory_model measures these directly).

NOT modelled: the CUDA context and cuBLAS/cuDNN workspaces, allocator fragmentation and caching,
the largest transient output between saved tensors, sampling/VAE decoding activations during a grid,
ZeRO-3 prefetch buffers. Nothing here was measured on a GPU (no GPU has run this project yet);
the model is checked against a measured CPU peak of a tiny configuration (tests/test_memory_peak.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sfd_fast.engine import memory_model  # noqa: E402

GIB = 2**30
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, sample_size=512, scaling_factor=0.18215)


class _FlashLikeAttention(torch.autograd.Function):
    """Stands in for SDPA during the trace with what a flash/memory-efficient kernel saves for the
    backward (q, k, v, out and the fp32 log-sum-exp), not the L x L attention matrix that the meta
    device's math fallback would save."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _sdpa_flash_like(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    return _FlashLikeAttention.apply(q, k, v)


def build_meta_parts(precision: str = "bf16"):
    """SD1.5's networks on the meta device, as sfd_fast/sd/build.py holds them: teacher, text encoder
    and VAE frozen (bf16 under engine.precision=bf16), fake score and generator trained in fp32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    frozen = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.device("meta"):
        unets = [UNet2DConditionModel(**SD15_UNET) for _ in range(3)]
        text, vae = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)), AutoencoderKL(**SD15_VAE)
    for m in (unets[0], text, vae):
        m.to(frozen).requires_grad_(False)
    for m in unets[1:]:
        m.requires_grad_(True)
    role = lambda net: NS(net=net)  # noqa: E731
    return NS(teacher=role(unets[0]), fake_score=role(unets[1]), generator=role(unets[2]),
              extra_state={"components": NS(text_encoder=text, vae=vae)})


def trace_unet(rows: int = 1) -> tuple[int, dict]:
    """(parameters, {"full" | "input_only": memory_model.trace_saved dict}) for one bf16 UNet, `rows` rows."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET).to(torch.bfloat16)
    units = memory_model.checkpoint_units(unet)
    exclude = {id(p) for p in unet.parameters()}     # meta tensors: the trace keys by identity
    out = {}
    for mode in ("full", "input_only"):
        unet.requires_grad_(mode == "full")
        x = torch.randn(rows, 4, 64, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
        t = torch.full((rows,), 500, device="meta", dtype=torch.long)
        ctx = torch.randn(rows, 77, 768, device="meta", dtype=torch.bfloat16)
        real_sdpa = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = _sdpa_flash_like
        try:
            out[mode] = memory_model.trace_saved(lambda: unet(x, t, encoder_hidden_states=ctx), units, exclude)
        finally:
            torch.nn.functional.scaled_dot_product_attention = real_sdpa
    return sum(p.numel() for p in unet.parameters()), out


# name, GPUs, backend, optimizer, activation checkpointing, EMA (all bf16)
CONFIGS = [
    ("plain bf16 autocast + Adam", 1, "plain", "adam", False, False),
    ("ZeRO-2 + Adam", 1, "deepspeed", "adam", False, False),
    ("ZeRO-2 + Adam", 4, "deepspeed", "adam", False, False),
    ("ZeRO-2 + Adam", 8, "deepspeed", "adam", False, False),
    ("ZeRO-2 + 8-bit Adam", 1, "deepspeed", "adam8bit", False, False),
    ("ZeRO-2 + 8-bit Adam", 4, "deepspeed", "adam8bit", False, False),
    ("ZeRO-2 + 8-bit Adam + act. ckpt", 1, "deepspeed", "adam8bit", True, False),
    ("ZeRO-2 + 8-bit Adam + act. ckpt + EMA", 1, "deepspeed", "adam8bit", True, True),
    ("ZeRO-2 + 8-bit Adam + act. ckpt", 4, "deepspeed", "adam8bit", True, False),
]


def config_for(backend, optimizer, ckpt, ema) -> NS:
    """The fields of sfd_fast.config.Config that memory_model reads."""
    return NS(engine=NS(backend=backend, zero_stage=2, precision="bf16", optimizer=optimizer,
                        activation_checkpointing=ckpt),
              train=NS(ema=NS(decay=None, halflife_kimg=0.5 if ema else 0.0)))


def report(micro_batch: int = 1) -> tuple[str, list[dict]]:
    parts = build_meta_parts("bf16")
    P, acts = trace_unet(rows=1)
    rows = 2 * micro_batch                     # remain + forget rows per micro-batch
    out = []
    for name, gpus, backend, optimizer, ckpt, ema in CONFIGS:
        cfg = config_for(backend, optimizer, ckpt, ema)
        per_row = {m: (a["outside"] + a["unit_inputs"] + a["largest_unit"]) if ckpt else a["full"]
                   for m, a in acts.items()}
        activations = {"fake_score": 2 * rows * per_row["full"],
                       "generator": rows * per_row["full"] + 2 * 2 * rows * per_row["input_only"]}
        if backend == "plain":                 # autocast's bf16 casts of the fp32 trained weights
            activations["fake_score"] += 2 * P
            activations["generator"] += 2 * 2 * P
        static = memory_model.static_terms(cfg, parts, gpus)
        phases = {r: memory_model.phase_terms(cfg, parts, gpus, r) for r in memory_model.ROLES}
        est = memory_model.combine(static, phases, activations)
        base = est["weights"] + est["ema"] + est["optimizer"] + est["masters"]
        est.update(name=name, gpus=gpus, grid=base + est["sampling_copy"], fits24=est["total"] <= 22 * GIB)
        out.append(est)
    g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    wb = out[0]["weights_by_network"]
    head = (f"UNet parameters (SD1.5 config, built on the meta device): {P:,} (x3: teacher, fake score, "
            f"generator). Weights as held under bf16: teacher {g(wb['teacher'])} GiB, text encoder "
            f"{g(wb['text_encoder'])} GiB, VAE {g(wb['vae'])} GiB (frozen, bf16); fake score and generator "
            f"{g(wb['generator'])} GiB each in fp32 (plain) or bf16 module weights + fp32 masters (DeepSpeed).\n\n"
            f"Activations saved for backward per UNet row at 4x64x64 (bf16, meta trace): full pass "
            f"{g(acts['full']['full'])} GiB, input-only {g(acts['input_only']['full'])} GiB; with activation "
            f"checkpointing {g(acts['full']['outside'] + acts['full']['unit_inputs'] + acts['full']['largest_unit'])}"
            f" / {g(acts['input_only']['outside'] + acts['input_only']['unit_inputs'] + acts['input_only']['largest_unit'])}"
            f" GiB.\nMicro-batch: {micro_batch} remain + {micro_batch} forget sample(s) per GPU ({rows} rows), "
            f"CFG on in all three places; bf16 everywhere.\n")
    lines = ["| configuration | GPUs | weights | optimizer + masters | EMA | peak phase | activations | "
             "gradients (+ bucket / step) | **training peak** | during a grid | fits 24 GB | measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out:
        extra = r["phase_peaks"][r["peak_phase"]] - (r["activations"] if r["peak_phase"].endswith("backward") else 0)
        lines.append(f"| {r['name']} | {r['gpus']} | {g(r['weights'])} | {g(r['optimizer'] + r['masters'])} | "
                     f"{g(r['ema'])} | {r['peak_phase']} | "
                     f"{g(r['activations']) if r['peak_phase'].endswith('backward') else '-'} | {g(extra)} | "
                     f"**{g(r['total'])}** | {g(r['grid'])} | {'yes' if r['fits24'] else 'no'} | not measured |")
    return head + "\n" + "\n".join(lines) + "\n", out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="", help="write the markdown table here (e.g. docs/memory.md)")
    p.add_argument("--micro-batch", type=int, default=1)
    a = p.parse_args(argv)
    text, rows = report(a.micro_batch)
    fits = [f"{r['name']} on {r['gpus']} GPU(s)" for r in rows if r["fits24"]]
    key = next(r for r in rows if r["name"] == "ZeRO-2 + 8-bit Adam + act. ckpt" and r["gpus"] == 1)
    ema = next(r for r in rows if r["name"].endswith("+ EMA"))
    g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    doc = ("# Memory: SFD on the SD1.5 architecture, analytic peak per GPU\n\n"
           "Generated by `python bench/memory_report.py --out docs/memory.md` on a CPU: the networks are "
           "built on the meta device and counted by `sfd_fast.engine.memory_model` (the model a run's "
           "own parts are estimated with). **Analytic, not measured:** no GPU has run this project's SD "
           "configurations yet, so every row is marked \"not measured\". The model itself is checked "
           "against a measured CPU peak of a tiny SD configuration (tests/test_memory_peak.py: model / "
           "measured 1.08 in fp32, 1.10 in bf16; the bound asked for is 15%).\n\n" + text +
           "\nColumns (GiB per GPU): weights of every network as held (frozen teacher / text encoder / VAE "
           "in bf16; trained networks fp32 in plain, bf16 module weights under DeepSpeed); optimizer state "
           "(Adam fp32 m + v, or bitsandbytes 8-bit) + DeepSpeed's fp32 masters, both divided by the GPUs "
           "under ZeRO-2; EMA = a persistent fp32 generator copy; the phase with the largest peak and what it "
           "adds: saved activations and gradients (+ DeepSpeed's reduce bucket, 2e8 elements) during a "
           "backward, or DeepSpeed's optimizer step (its gradient partition + an fp32 copy of it, read "
           "from deepspeed/runtime/zero/stage_1_and_2.py, not measured); training peak = the static terms + "
           "that phase; during a grid = static terms + the temporary fp32 generator copy that the "
           "DeepSpeed backend builds on rank 0 for sampling when EMA is off (freed afterwards), sampling "
           "activations not included.\n\n"
           "NOT modelled: the CUDA context and cuBLAS/cuDNN workspaces, allocator fragmentation and "
           "caching, transient outputs between saved tensors, sampling / VAE decoding activations, "
           "ZeRO-3 prefetch buffers. \"fits 24 GB\" = analytic training peak <= 22 GiB, leaving 2 GiB "
           "for all of that.\n\n"
           f"**The 24 GB configuration** (one GPU, DeepSpeed ZeRO-2 in a world of one, bf16, 8-bit Adam, "
           f"activation checkpointing, micro-batch 1 remain + 1 forget, EMA off): analytic training peak "
           f"{g(key['total'])} (at the {key['peak_phase'].replace('_', ' ')}), {g(key['grid'])} during a grid "
           f"(the temporary fp32 copy: {g(key['sampling_copy'])}). With EMA on: {g(ema['total'])}, above "
           f"the 22 GiB line. Plain bf16 autocast + Adam on one GPU: {g(rows[0]['total'])}.\n\n"
           "**Fits a 24 GB card (analytic):** " + "; ".join(fits) + ".\n")
    print(doc)
    if a.out:
        Path(a.out).write_text(doc)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
