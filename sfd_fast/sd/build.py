"""The Stable Diffusion family: teacher, fake score, generator, text task and sample grids.

`build_parts(cfg)` (called by train.py for model.kind == "stable_diffusion"):
  1. loads the pipeline through `load_stable_diffusion(cfg.model.pretrained)` (fp32 master weights;
     bf16 compute comes from engine.precision's autocast). The prediction type (epsilon or
     v_prediction) and the betas come from the model's scheduler config, not from cfg.schedule;
  2. teacher = the frozen UNet; fake score = deepcopy with gradients; generator = deepcopy with
     the weights of `model.generator_init` ("teacher", a diffusers UNet / pipeline folder, a
     safetensors state dict, a sfd-fast run or checkpoint folder, or - only with
     model.trust_pickle - a SiD-LSG pickle {"ema": UNet});
  3. the TextForgetTask (text.py) over the remain / forget prompt sets, with the text encoder
     behind a TextEncoderCache;
  4. save_grid: one-step samples (fixed latents, seed 2024) for the grid prompts, VAE-decoded.

`model.pretrained = "tiny:DIR"` builds a tiny random pipeline in DIR on first use
(tiny.py) and then loads it through the same code as a real one (CPU smoke runs, tests).
"""
from __future__ import annotations

import copy
import logging
import os
import pickle
from pathlib import Path

import torch

from ..checkpoint import check_finite, generator_weights_file
from ..config import Config
from ..generator import OneStepGenerator
from ..trainer import RunParts
from .loading import SDComponents, load_stable_diffusion, sd_denoiser
from .prompts import ForgetPromptSet, RemainPromptSet, forget_sets_from_config, multi_grid_prompts
from .sampling import make_save_grid
from .text import TextEncoderCache, TextForgetTask

log = logging.getLogger("sfd_fast")

TINY_PREFIX = "tiny:"


# ---------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------

def resolve_pretrained(pretrained: str, prediction: str = "epsilon") -> str:
    """A loadable source: "tiny:DIR" builds the tiny pipeline in DIR once (if absent)."""
    if not pretrained.startswith(TINY_PREFIX):
        return pretrained
    d = Path(pretrained[len(TINY_PREFIX):]).expanduser()
    if not (d / "model_index.json").is_file():
        from .tiny import build_tiny_sd
        log.info("building the tiny random Stable Diffusion pipeline in %s (%s)", d, prediction)
        build_tiny_sd(d, prediction_type=prediction)
    return str(d)


def load_sd_components(cfg: Config, device) -> SDComponents:
    src = resolve_pretrained(cfg.model.pretrained, cfg.schedule.prediction)
    # attention: not chosen here; a training run's acceleration plan applies engine.attention once
    # (engine/plan.py); sampling and export use the UNet as diffusers builds it (SDPA on torch 2)
    comps = load_stable_diffusion(src, device=device, dtype=torch.float32, attention=None)
    if cfg.schedule.prediction != comps.prediction:
        log.warning("schedule.prediction=%r differs from the model's scheduler config (%r); the model's "
                    "prediction type is used", cfg.schedule.prediction, comps.prediction)
    return comps


def _load_pickled_unet_state(path: Path) -> dict:
    with open(path, "rb") as f:
        obj = pickle.load(f)  # noqa: S301  (only with model.trust_pickle, checked by the caller)
    net = obj.get("ema") if isinstance(obj, dict) else None
    if net is None or not hasattr(net, "state_dict"):
        raise ValueError(f"{path}: expected a pickle of {{'ema': UNet2DConditionModel}} (SiD-LSG's format), "
                         f"got {type(obj).__name__} with keys {list(obj)[:5] if isinstance(obj, dict) else '-'}")
    return {k: v.detach().float().cpu() for k, v in net.state_dict().items()}


def generator_init_state(init: str, trust_pickle: bool = False) -> dict | None:
    """The generator's starting UNet state dict from `model.generator_init`; None = the teacher.

    Accepted: "teacher"; a diffusers UNet folder (config.json + weights) or pipeline folder (unet/);
    a sfd-fast run or checkpoint folder (generator_ema, else generator); a .safetensors state dict;
    a pickle {"ema": UNet} (SiD-LSG) only with trust_pickle."""
    if init == "teacher":
        return None
    path = Path(init).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model.generator_init {init!r} does not exist")
    if path.suffix.lower() in (".pkl", ".pickle"):
        if not trust_pickle:
            raise ValueError(f"model.generator_init {init!r} is a pickle: loading it executes code from the "
                             "file. Set model.trust_pickle=true only for a trusted source (e.g. the SiD-LSG "
                             "release), or convert it to safetensors")
        return _load_pickled_unet_state(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"model.generator_init {init!r}: expected a .safetensors UNet state dict, a "
                             "diffusers UNet/pipeline folder, a run folder or a trusted .pkl")
        from safetensors.torch import load_file
        return load_file(str(path))
    if (path / "checkpoints").is_dir() or (path / "trainer_state.json").is_file():
        from safetensors.torch import load_file
        return load_file(str(generator_weights_file(path)))
    from diffusers import UNet2DConditionModel
    sub = "unet" if (path / "unet").is_dir() else None
    if not ((path / (sub or "") / "config.json").is_file()):
        raise ValueError(f"model.generator_init {init!r} is a folder but neither a diffusers UNet folder "
                         "(config.json + weights), a pipeline folder (unet/) nor a sfd-fast run folder")
    unet = UNet2DConditionModel.from_pretrained(str(path), subfolder=sub, local_files_only=True)
    return unet.state_dict()


def make_generator_net(teacher_unet: torch.nn.Module, init: str, trust_pickle: bool) -> torch.nn.Module:
    net = copy.deepcopy(teacher_unet)
    state = generator_init_state(init, trust_pickle)
    if state is not None:
        check_finite(state, f"model.generator_init {init}")
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"model.generator_init {init!r} does not fit the teacher UNet "
                             f"(different architecture?): {str(e)[:500]}") from None
        log.info("generator initialised from %s", init)
    return net.requires_grad_(True)


def sample_shape(comps: SDComponents, resolution: int) -> tuple:
    """Latent shape (C, res/f, res/f); the latent side must survive the UNet's downsamplings."""
    f = comps.vae_scale_factor
    if resolution % f:
        raise ValueError(f"prompts.resolution={resolution} is not a multiple of the VAE factor {f}")
    side = resolution // f
    down = 2 ** (len(comps.unet.config.block_out_channels) - 1)
    if side % down:
        raise ValueError(f"prompts.resolution={resolution}: latent side {side} is not divisible by the "
                         f"UNet's downsampling {down}; use a multiple of {f * down}")
    return (comps.latent_channels, side, side)


def store_frozen_in_bf16(comps: SDComponents, precision: str) -> torch.dtype:
    """With engine.precision == "bf16", store the frozen networks (teacher UNet, text encoder, VAE) in
    bf16: under bf16 autocast their matmuls and convolutions compute in bf16 anyway (autocast would
    cast the fp32 weights on every call), so this halves their memory (SD1.5: 1.72 + 0.25 + 0.17 GB
    saved) and changes only the non-autocast ops' (norms, embeddings) parameters by bf16 rounding
    (tests/test_memory_model.py bounds the loss change). Call it AFTER the fake score and generator
    are copied from the teacher: the trained networks keep fp32 master weights. Returns the dtype."""
    if precision != "bf16":
        return torch.float32
    for m in (comps.unet, comps.text_encoder, comps.vae):
        torch.nn.Module.to(m, torch.bfloat16)   # diffusers' .to() would warn about an empty keep-fp32 list
    return torch.bfloat16


def make_task(cfg: Config, cache: TextEncoderCache, use_cache: bool = True,
              forget: ForgetPromptSet | list | None = None) -> TextForgetTask:
    """The TextForgetTask of every concept of the config (prompts.concepts, or the single concept)."""
    pr, s = cfg.prompts, cfg.sfd
    remain = RemainPromptSet.from_path(pr.remain_file)
    sets, names, weights = forget_sets_from_config(pr)
    if forget is not None:
        sets = list(forget) if isinstance(forget, (list, tuple)) else [forget]
    return TextForgetTask(cache, remain, sets, pr.use_neg, pr.sid_w_neg, pr.sg_w_override,
                          pr.context_dropout, (s.cfg_train_fake, s.cfg_eval_fake, s.cfg_eval_real),
                          use_cache=use_cache, seed=cfg.run.seed, target_names=names, weights=weights)


def grid_prompts(cfg: Config, forget) -> list[str]:
    """prompts.grid_prompts, else one row block per concept (its forget prompts), then validation."""
    sets = list(forget) if isinstance(forget, (list, tuple)) else [forget]
    return list(cfg.prompts.grid_prompts) or multi_grid_prompts(sets)


# ---------------------------------------------------------------------------------------------------
# the family entry point
# ---------------------------------------------------------------------------------------------------

def build_parts(cfg: Config) -> RunParts:
    """RunParts for SD concept forgetting (see the module docstring)."""
    from ..engine import resolve_device
    device = resolve_device(cfg.run.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per launched rank
    m, s, pr = cfg.model, cfg.sfd, cfg.prompts
    # cheap input checks before loading any weights (config.validate ran them for load_config users)
    if m.generator_init.lower().endswith((".pkl", ".pickle")) and not m.trust_pickle:
        generator_init_state(m.generator_init, trust_pickle=False)  # raises the explanatory error
    task_prompts = forget_sets_from_config(pr)[0]   # one ForgetPromptSet per concept

    from .evaluate import load_scorer
    clip_scorer = load_scorer(cfg, device)   # a CLIP model that does not load stops the run here
    comps = load_sd_components(cfg, device)
    shape = sample_shape(comps, pr.resolution)
    if not 0 <= s.t_init < comps.schedule.num_timesteps or s.t_max > comps.schedule.num_timesteps:
        raise ValueError(f"sfd.t_init/t_max ({s.t_init}/{s.t_max}) outside the model's "
                         f"{comps.schedule.num_timesteps} timesteps")

    teacher_unet = comps.unet  # frozen by load_stable_diffusion
    check_finite(teacher_unet.state_dict(), f"model.pretrained {comps.source} (unet)")  # NaN: every update skipped
    fake_unet = copy.deepcopy(teacher_unet).requires_grad_(True)
    gen_unet = make_generator_net(teacher_unet, m.generator_init, m.trust_pickle)
    frozen_dtype = store_frozen_in_bf16(comps, cfg.engine.precision)  # after the trained copies: fp32 masters
    teacher = sd_denoiser(teacher_unet, comps.schedule)
    fake_score = sd_denoiser(fake_unet, copy.deepcopy(comps.schedule))
    generator = OneStepGenerator(sd_denoiser(gen_unet, copy.deepcopy(comps.schedule)), s.t_init)

    cache = TextEncoderCache(comps.text_encoder, comps.tokenizer, device)
    grid = grid_prompts(cfg, task_prompts)
    # warn about truncated fixed prompts now, before training (remain captions: on first use)
    cache.warn_if_truncated([p for f in task_prompts for p in f.all_prompts()] + grid)
    task = make_task(cfg, cache, forget=task_prompts)
    cache.pin(grid)
    save_grid = make_save_grid(comps, cache, grid, pr.grid_per_prompt, shape)
    log.info("stable diffusion: %s (%s), latents %s, %d remain prompts, forget pairs %s, %d grid prompts, "
             "frozen nets in %s", comps.source, comps.prediction, shape, len(task.remain),
             ", ".join(f"{n!r}: {len(f)}" for n, f in zip(task.target_names, task.forget_sets)), len(grid),
             frozen_dtype)
    return RunParts(task, teacher, fake_score, generator, shape, save_grid,
                    {"components": comps, "text_cache": cache, "grid_prompts": grid, "clip_scorer": clip_scorer})


# ---------------------------------------------------------------------------------------------------
# a finished run, loaded back (sample / export)
# ---------------------------------------------------------------------------------------------------

def run_config(run_dir: Path):
    """The stable_diffusion run's config.json, or a one-line error."""
    from ..config import ConfigError, read_run_config
    try:
        return read_run_config(run_dir, "stable_diffusion")
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def generator_weights(run_dir: Path, checkpoint: str | None = None, raw: bool = False) -> tuple[dict, str]:
    """(UNet state dict, description) of the generator: EMA if present (unless raw), else raw."""
    from safetensors.torch import load_file

    from ..checkpoint import generator_weights_file
    try:
        f = generator_weights_file(Path(checkpoint) if checkpoint else Path(run_dir), raw)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    return load_file(str(f)), f"{f.parent.name}/{f.name}"


def load_run_generator(run_dir: Path, device, checkpoint=None, raw=False):
    """-> (cfg, SDComponents, OneStepGenerator with the run's weights, description)."""
    from ..denoisers import TextUNetDenoiser

    cfg = run_config(run_dir)
    comps = load_sd_components(cfg, device)
    state, desc = generator_weights(run_dir, checkpoint, raw)
    comps.unet.load_state_dict(state)
    generator = OneStepGenerator(TextUNetDenoiser(comps.unet, comps.schedule), cfg.sfd.t_init).eval()
    return cfg, comps, generator, desc
