"""DeepSpeed ZeRO backend: two engines (generator, fake score) around the unchanged SFD step.

The teacher stays outside any engine (eval, no grads). The step functions of step.py are the same
as in the plain backend; what changes (docs/deepspeed_findings.md has the probe behind each choice):

  * fake-score phase: the generator sample runs through `engine_G` under no_grad; the fake score is
    called through `engine_F` (its forward is `Denoiser.output`); `engine_F.backward/step` per micro
    batch (DeepSpeed scales by 1/accumulation and steps at the boundary).
  * generator phase: the fake score is evaluated WITHOUT its engine's forward (engine_F(x) there
    registers backward hooks that break or silently corrupt the generator's backward). ZeRO 0-2: the
    core's FrozenView (functional_call with detached weights). ZeRO-3: the weights are partitioned
    and functional_call fails (`'Tensor' object has no attribute 'ds_id'`), so requires_grad is
    toggled off on the fake score and `engine_F.module` is called (restored in a finally block).
  * NaN robustness: the client optimizer checks its own gradients (under ZeRO: the averaged fp32
    partition), all-reduces the flag and skips the update on every rank (optim.NonfiniteGuard);
    the skipped-update counter is the trainer's, as in the plain backend.
  * random draws: by default every rank draws the GLOBAL micro batch from the same seeded stream
    and keeps its rows (rng_mode='global_slice'): a world-size-N run at global batch B draws exactly
    what the single-process run draws at B, resume needs one RNG state, and ranks still see
    different samples. rng_mode='per_rank' seeds rank r with seed + r and draws only its rows.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_write_text, latest_checkpoint, publish_checkpoint_dir, save_safetensors_atomic
from .config import Config, ConfigError, read_json_file
from .denoisers import FrozenView
from .optim import NonfiniteGuard, make_optimizer, require_bitsandbytes
from .step import PhaseDraws, fake_score_phase, generator_phase
from .tasks import PhaseConditions
from .trainer import SFDTrainer

log = logging.getLogger("sfd_fast")

DS_HINT = ("engine.backend='deepspeed' needs DeepSpeed ({err}). Install it with "
           "`pip install -e '.[dist]'` (pins deepspeed==0.19.8), or use engine.backend='plain'")
XFORMERS_HINT = ("engine.attention='xformers' was requested but xformers cannot be used here ({err}). "
                 "Install a wheel built for this torch (`pip install xformers`) on a CUDA machine, or set "
                 "engine.attention='sdpa' (or 'auto' to fall back)")
# keys of the generated DeepSpeed dict that the run config owns: a merged JSON may not change them
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "optimizer", "bf16", "fp16")


# ---------------------------------------------------------------------------------------------------
# checks before anything is built
# ---------------------------------------------------------------------------------------------------

def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def validate_world(cfg: Config, world: int) -> int:
    """global batch = micro batch x accumulation x world size; returns the per-rank micro batch."""
    t = cfg.train
    if world < 1:
        raise ConfigError(f"world size must be >= 1, got {world}")
    if t.batch_size % (t.grad_accum * world):
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) is the GLOBAL batch and must be divisible by "
            f"train.grad_accum ({t.grad_accum}) x world size ({world}) = {t.grad_accum * world}; "
            f"the per-rank micro batch would be {t.batch_size / (t.grad_accum * world):g}. Pick a batch "
            f"size that is a multiple of {t.grad_accum * world}, or change grad_accum / the number of ranks")
    return t.batch_size // (t.grad_accum * world)


def check_xformers(device: torch.device | None = None):
    """Raise with the install hint unless xformers imports and can run (CUDA only)."""
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:
        raise RuntimeError(XFORMERS_HINT.format(err=f"{type(e).__name__}: {e}")) from None
    if device is not None and device.type != "cuda":
        raise RuntimeError(XFORMERS_HINT.format(err=f"xformers kernels run on CUDA only; run.device is {device}"))


def preflight(cfg: Config, device: torch.device | None = None):
    """Every 'explicit request' of the engine section, checked before any model is built."""
    e = cfg.engine
    if e.backend == "deepspeed":
        validate_world(cfg, world_size_from_env())
        try:
            import deepspeed  # noqa: F401
        except Exception as err:
            raise RuntimeError(DS_HINT.format(err=f"{type(err).__name__}: {err}")) from None
    if e.optimizer == "adam8bit":
        require_bitsandbytes()
    if e.attention == "xformers":
        if device is None:
            from .engine import resolve_device
            device = resolve_device(cfg.run.device)
        check_xformers(device)
    if e.deepspeed_config and e.backend == "deepspeed":
        _read_user_ds_json(e.deepspeed_config)


# ---------------------------------------------------------------------------------------------------
# attention backend and activation checkpointing (both backends)
# ---------------------------------------------------------------------------------------------------

_CKPT_CLASSES: dict = {}


def _checkpointed_class(cls):
    """A subclass of `cls` whose forward runs under torch.utils.checkpoint (state_dict unchanged)."""
    if getattr(cls, "_sfd_checkpointed", False):
        return cls
    if cls not in _CKPT_CLASSES:
        def forward(self, *args, **kwargs):
            if getattr(self, "_sfd_recompute", False) or not torch.is_grad_enabled():
                return cls.forward(self, *args, **kwargs)
            # The weights go into the checkpoint as explicit inputs, so the recomputation uses the
            # same tensors as the forward, also under functional_call (FrozenView's detached weights).
            named = dict(self.named_parameters())
            names, n = list(named), len(args)

            def run(*flat):
                self._sfd_recompute = True
                try:
                    return torch.func.functional_call(self, dict(zip(names, flat[n:])), tuple(flat[:n]), kwargs)
                finally:
                    self._sfd_recompute = False
            return torch.utils.checkpoint.checkpoint(run, *args, *named.values(), use_reentrant=False)
        _CKPT_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (cls,),
                                  {"forward": forward, "_sfd_checkpointed": True})
    return _CKPT_CLASSES[cls]


def _nets(parts):
    return [("teacher", parts.teacher.net), ("fake_score", parts.fake_score.net),
            ("generator", parts.generator.net)]


def apply_attention_and_checkpointing(parts, engine_cfg, device: torch.device | None = None) -> dict:
    """Attention backend and activation checkpointing on the three networks (idempotent).

    diffusers UNets: set_attn_processor(AttnProcessor2_0) (SDPA) or
    enable_xformers_memory_efficient_attention(); enable_gradient_checkpointing().
    Digits MLP (no attention): its residual blocks run under torch.utils.checkpoint.
    Returns what was applied, per network, for the log."""
    applied = {}
    attention = engine_cfg.attention
    if attention == "auto":
        try:
            check_xformers(device)
            attention = "xformers"
        except RuntimeError:
            attention = "sdpa"
        log.info("engine.attention auto -> %s", attention)
    elif attention == "xformers":
        check_xformers(device)
    for role, net in _nets(parts):
        done = []
        has_attn = hasattr(net, "set_attn_processor")
        if has_attn and attention == "xformers":
            net.enable_xformers_memory_efficient_attention()
            done.append("xformers")
        elif has_attn:
            from diffusers.models.attention_processor import AttnProcessor2_0
            net.set_attn_processor(AttnProcessor2_0())
            done.append("sdpa")
        if engine_cfg.activation_checkpointing:
            if hasattr(net, "enable_gradient_checkpointing"):
                net.enable_gradient_checkpointing()
                done.append("checkpointing(diffusers)")
            elif isinstance(getattr(net, "blocks", None), nn.ModuleList):
                for block in net.blocks:
                    block.__class__ = _checkpointed_class(type(block))
                done.append(f"checkpointing({len(net.blocks)} blocks)")
            else:
                raise RuntimeError(f"engine.activation_checkpointing: the {role} network "
                                   f"({type(net).__name__}) has no known checkpointing hook")
        applied[role] = done
    if any(applied.values()):
        log.info("attention/checkpointing: %s", applied)
    return applied


# ---------------------------------------------------------------------------------------------------
# DeepSpeed config
# ---------------------------------------------------------------------------------------------------

def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k.startswith("_"):
            continue
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_user_ds_json(path: str) -> dict:
    p = Path(path)
    data = read_json_file(p, "engine.deepspeed_config", "point it at an existing DeepSpeed JSON file or leave it empty")
    clash = [k for k in OWNED_KEYS if k in data or any(k in data.get(r, {}) for r in ("generator", "fake_score"))]
    if clash:
        raise ConfigError(f"engine.deepspeed_config {p}: {clash} are set by the run config (train.batch_size, "
                          "train.grad_accum, engine.precision, engine.optimizer, optim.*); remove them there")
    return data


def build_deepspeed_config(cfg: Config, role: str, world_size: int) -> dict:
    """The DeepSpeed dict for one network role ('generator' or 'fake_score'), concrete numbers only.

    The optimizer is a client optimizer (optim.make_optimizer: fused torch Adam, or bitsandbytes
    Adam8bit) so that the NaN guard and value clipping run inside its step; this equals DeepSpeed's
    {"type": "Adam", "params": {"torch_adam": true, "adam_w_mode": false}} numerically. A JSON file
    in engine.deepspeed_config is merged over the result (top level, or per role under
    "generator"/"fake_score")."""
    if role not in ("generator", "fake_score"):
        raise ValueError(f"role must be 'generator' or 'fake_score', got {role!r}")
    e, t = cfg.engine, cfg.train
    micro = validate_world(cfg, world_size)
    stage = e.zero_stage
    zero: dict = {"stage": stage}
    if stage in (1, 2):
        zero.update({"contiguous_gradients": True, "overlap_comm": False,
                     "reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000,
                     "reduce_scatter": True})
    elif stage == 3:
        zero.update({"contiguous_gradients": True, "overlap_comm": False,
                     "reduce_bucket_size": 200_000_000, "stage3_prefetch_bucket_size": 50_000_000,
                     "stage3_param_persistence_threshold": 100_000,
                     "stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000,
                     "stage3_gather_16bit_weights_on_model_save": False})
    ds = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": 0.0,       # norm clipping off; optim.<role>.grad_clip_value clips by value
        "zero_optimization": zero,
        "bf16": {"enabled": e.precision == "bf16"},
        "fp16": {"enabled": False},     # legacy pure fp16 is deliberately not offered (docs/deepspeed.md)
        "zero_allow_untested_optimizer": True,   # client optimizer (SkipAdam / bnb Adam8bit)
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if e.deepspeed_config:
        user = _read_user_ds_json(e.deepspeed_config)
        per_role = {k: v for k, v in user.items() if k not in ("generator", "fake_score")}
        ds = _deep_merge(ds, per_role)
        ds = _deep_merge(ds, user.get(role, {}))
        got = ds.get("zero_optimization", {}).get("stage", stage)
        if got != stage:
            raise ConfigError(f"engine.deepspeed_config {e.deepspeed_config} sets zero_optimization.stage={got}, "
                              f"but engine.zero_stage is {stage}; set the stage with engine.zero_stage only")
    return ds


# ---------------------------------------------------------------------------------------------------
# process group
# ---------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Config) -> torch.device:
    """Pick the device for this rank, set DS_ACCELERATOR before deepspeed is imported, init the
    process group (nccl on CUDA, gloo on CPU). A plain `python` launch becomes a world of one."""
    from .engine import resolve_device
    device = resolve_device(cfg.run.device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        backend = "gloo"
    if "RANK" not in os.environ:  # single process without a launcher
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    if not torch.distributed.is_initialized():
        # 2 h: rank 0 may pretrain and cache the digits teacher (model.teacher='auto') while the other
        # ranks wait in a barrier; SFD_DIST_TIMEOUT_MIN overrides
        from datetime import timedelta
        timeout = timedelta(minutes=float(os.environ.get("SFD_DIST_TIMEOUT_MIN", "120")))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    return device


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------

class _OutputForward(nn.Module):
    """The fake score as engine_F sees it: forward = Denoiser.output (what the fake phase calls)."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x_t, t, cond, uncond=None, guidance: float = 1.0):
        return self.denoiser.output(x_t, t, cond, uncond, guidance)


class _EngineOutput:
    """Stands in for the fake-score Denoiser in fake_score_phase: .output goes through engine_F."""

    def __init__(self, engine):
        self.engine = engine

    def output(self, x_t, t, cond, uncond=None, guidance: float = 1.0):
        return self.engine(x_t, t, cond, uncond, guidance)


class _ModuleX0:
    """ZeRO-3 generator phase: call the (requires_grad-toggled) module directly, never the engine."""

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def x0(self, x_t, t, cond, uncond=None, guidance: float = 1.0):
        return self.denoiser.x0(x_t, t, cond, uncond, guidance)


def _slice_draws(d: PhaseDraws, idx: torch.Tensor) -> PhaseDraws:
    c = d.cond
    pick = lambda x: None if x is None else x.index_select(0, idx)
    cond = PhaseConditions(pick(c.generator_cond), pick(c.fake_cond), pick(c.teacher_cond),
                           pick(c.fake_uncond), pick(c.teacher_uncond), pick(c.is_forget))
    return PhaseDraws(pick(d.z), pick(d.noise), pick(d.t), cond, pick(d.coef))


class DeepSpeedTrainer(SFDTrainer):
    """SFDTrainer with the generator and the fake score in two DeepSpeed ZeRO engines."""

    def __init__(self, cfg: Config, parts, run_dir: Path, device: torch.device, generator_loss_fn=None,
                 rng_mode: str = "global_slice"):
        import deepspeed
        if not torch.distributed.is_initialized():
            raise RuntimeError("DeepSpeedTrainer needs an initialised process group: call "
                               "distributed.init_distributed(cfg) first (train.py does)")
        if rng_mode not in ("global_slice", "per_rank"):
            raise ValueError(f"rng_mode must be 'global_slice' or 'per_rank', got {rng_mode!r}")
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.rank_micro = validate_world(cfg, self.world)
        self.rng_mode = rng_mode
        super().__init__(cfg, parts, run_dir, device, generator_loss_fn)
        # ---- tail: replace the plain optimizers by guarded client optimizers inside two engines
        if rng_mode == "per_rank":
            self.rng.manual_seed(cfg.run.seed + self.rank)
            if hasattr(parts.task, "host_rng"):  # text task: prompt picks on accelerators differ per rank too
                parts.task.host_rng.manual_seed(cfg.run.seed + 7919 + self.rank)
        self.zero_stage = cfg.engine.zero_stage
        self.ds_configs = {r: build_deepspeed_config(cfg, r, self.world) for r in ("generator", "fake_score")}
        if self.rank == 0:
            for r, d in self.ds_configs.items():
                atomic_write_text(self.run_dir / f"deepspeed_{r}.json", json.dumps(d, indent=1))
                log.info("deepspeed %s config: %s", r, json.dumps(d))
        if not self.ema_enabled:   # plain fp32 copy made before DeepSpeed touches the generator
            self.generator_ema = copy.deepcopy(self.generator).float().requires_grad_(False)
        self.snapshot_step = 0
        o = cfg.optim
        gen_opt = make_optimizer(o.generator, cfg.engine, self.gen_params, device,
                                 NonfiniteGuard(self.skipped, 1, o.generator.grad_clip_value))
        fake_opt = make_optimizer(o.fake_score, cfg.engine, self.fake_params, device,
                                  NonfiniteGuard(self.skipped, 0, o.fake_score.grad_clip_value))
        self.engine_G, self.gen_opt, _, _ = deepspeed.initialize(
            model=self.generator, optimizer=gen_opt, config=copy.deepcopy(self.ds_configs["generator"]))
        self.fake_module = _OutputForward(self.fake_score)
        self.engine_F, self.fake_opt, _, _ = deepspeed.initialize(
            model=self.fake_module, optimizer=fake_opt, config=copy.deepcopy(self.ds_configs["fake_score"]))
        self.fake_call = _EngineOutput(self.engine_F)
        self._ds_skips_seen = {0: 0, 1: 0}
        # generator phase view of the fake score (see module docstring)
        self.fake_score_view = _ModuleX0(self.fake_score) if self.zero_stage == 3 else FrozenView(self.fake_score)
        # generator_ema is always a plain fp32 module (deep-copied before DeepSpeed touched the
        # generator): sampling/eval on rank 0 never enters a collective. Without EMA it is a snapshot
        # of the fp32 master weights, refreshed before every grid, checkpoint and at the end.
        grid = parts.save_grid
        self.parts = dataclasses.replace(parts, save_grid=None if grid is None else self._rank0_grid(grid))
        if self.rank == 0:
            log.info("deepspeed: world %d, ZeRO-%d, %s, optimizer %s, micro batch %d x accumulation %d x "
                     "world %d = global batch %d, rng %s", self.world, self.zero_stage, cfg.engine.precision,
                     cfg.engine.optimizer, self.rank_micro, cfg.train.grad_accum, self.world,
                     cfg.train.batch_size, rng_mode)

    # ------------------------------------------------------------------ helpers
    @contextmanager
    def _gathered(self, engine):
        if self.zero_stage == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
                yield
        else:
            yield

    def _full_fp32(self, engine, net: nn.Module) -> dict:
        """Full fp32 weights of `net` (inside `engine`): collective, every rank gets them."""
        from deepspeed.utils import safe_get_full_fp32_param
        out = {}
        for k, v in net.state_dict(keep_vars=True).items():
            if isinstance(v, nn.Parameter):
                full = safe_get_full_fp32_param(v)
                if full is None:        # ZeRO-0 fp32: the module parameter is the master weight
                    full = v.detach()
                out[k] = full.detach().float().cpu().clone()
            else:
                out[k] = v.detach().cpu().clone()
        return out

    @staticmethod
    def _load_full_into(net: nn.Module, sd: dict):
        with torch.no_grad():
            for k, v in net.state_dict(keep_vars=True).items():
                v.copy_(sd[k].to(v.device, v.dtype))

    def _refresh_snapshot(self):
        """Without EMA: copy the current fp32 master weights into generator_ema (collective)."""
        if self.ema_enabled or self.snapshot_step == self.step:
            return
        self._load_full_into(self.generator_ema.net, self._full_fp32(self.engine_G, self.generator.net))
        self.snapshot_step = self.step

    def _rank0_grid(self, save_grid):
        def grid(gen, path):
            self._refresh_snapshot()   # collective: all ranks
            if self.rank == 0:
                save_grid(self.generator_ema, path)
        return grid

    # ------------------------------------------------------------------ one step
    def _draw(self, phase: str, remain_coef: float, forget_coef: float):
        s = self.cfg.sfd
        if self.rng_mode == "per_rank":
            n = self.rank_micro
            from .step import draw_phase
            return draw_phase(self.parts.task, self.rng, n, n if forget_coef > 0 else 0, self.parts.sample_shape,
                              s.t_min, s.t_max, remain_coef, forget_coef, self.device, phase)
        d = super()._draw(phase, remain_coef, forget_coef)   # the global micro batch, as one process
        m, M = self.rank_micro, self.micro
        rows = torch.arange(self.rank * m, (self.rank + 1) * m, device=self.device)
        if forget_coef > 0:
            rows = torch.cat([rows, rows + M])
        return _slice_draws(d, rows)

    def fake_score_update(self):
        s, t = self.cfg.sfd, self.cfg.train
        for _ in range(t.grad_accum):
            draws = self._draw("fake_score", s.sg_remain_coef, s.sg_forget_coef)
            with self.autocast():
                # denom = per-rank micro batch: DeepSpeed averages over ranks and divides by the
                # accumulation, so the gradient is sum_all_rows coef*L / global batch, as in one process
                loss, stats = fake_score_phase(self.engine_G, self.fake_call, self.schedule, draws,
                                               s.cfg_train_fake, self.rank_micro)
            self.engine_F.backward(loss)
            self.engine_F.step()
            self.stats[0] += stats
        self._count_ds_skips(self.engine_F, 0)

    @contextmanager
    def _fake_score_frozen(self):
        if self.zero_stage != 3:
            yield
            return
        params = list(self.fake_score.parameters())
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def generator_update(self):
        s, t = self.cfg.sfd, self.cfg.train
        with self._fake_score_frozen():
            for _ in range(t.grad_accum):
                draws = self._draw("generator", s.g_remain_coef, s.g_forget_coef)
                with self.autocast():
                    loss, stats = generator_phase(self.engine_G, self.fake_score_view, self.teacher,
                                                  self.schedule, draws, s.alpha, s.cfg_eval_fake,
                                                  s.cfg_eval_real, self.rank_micro, self.loss_fn)
                self.engine_G.backward(loss)
                self.engine_G.step()
                self.stats[1] += stats
        self._count_ds_skips(self.engine_G, 1)

    def _count_ds_skips(self, engine, index: int):
        """ZeRO 1-3 detect non-finite gradients themselves (a global flag, all ranks skip) before our
        guard runs: add those skips to the counter (a host int DeepSpeed already synced)."""
        seen = self._ds_skips_seen.get(index, 0)
        now = int(getattr(engine, "skipped_steps", 0))
        if now != seen:
            self.skipped[index] += now - seen
            self._ds_skips_seen[index] = now

    def ema_update(self):
        """EMA from the module weights (fp32 = the master weights under precision fp32; under bf16
        these are the bf16 compute weights: see docs/deepspeed.md)."""
        if not self.ema_enabled:
            return
        beta = self.ema_beta()
        with self._gathered(self.engine_G):
            ema = list(self.generator_ema.parameters())
            src = [p.detach().to(e.dtype) for p, e in zip(self.generator.parameters(), ema)]
            torch._foreach_lerp_(ema, src, 1.0 - beta)

    # ------------------------------------------------------------------ ticks
    def _tick(self, t0: float, steps_in_tick: int, bar) -> dict:
        torch.distributed.all_reduce(self.stats)  # per-rank sums and counts -> global
        if self.rank != 0:
            self.stats.zero_()
            return {}
        return super()._tick(t0, steps_in_tick, bar)

    def train(self, total_steps: int | None = None) -> list[dict]:
        records = super().train(total_steps)
        self._refresh_snapshot()
        barrier()
        return records

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """DeepSpeed state of both engines + plain safetensors exports, one atomic folder."""
        ckpt_root = self.run_dir / "checkpoints"
        name = f"step-{self.step:08d}"
        final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}-ds"
        if self.rank == 0:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier()
        self.engine_G.save_checkpoint(str(tmp / "ds_generator"), tag="state", save_latest=False)
        self.engine_F.save_checkpoint(str(tmp / "ds_fake_score"), tag="state", save_latest=False)
        weights = {"generator": self._full_fp32(self.engine_G, self.generator.net),
                   "fake_score": self._full_fp32(self.engine_F, self.fake_score.net)}
        if self.ema_enabled:
            weights["generator_ema"] = {k: v.detach().float() for k, v in self.generator_ema.net.state_dict().items()}
        rng_states = [None] * self.world
        torch.distributed.all_gather_object(rng_states, self.rng.get_state())
        task = self.parts.task
        task_states = [None] * self.world
        if hasattr(task, "rng_state"):  # the text task's host generator (prompt picks on accelerators)
            torch.distributed.all_gather_object(task_states, task.rng_state())
        if self.rank == 0:
            for role, sd in weights.items():
                save_safetensors_atomic(sd, tmp / f"{role}.safetensors")
            rng = {"rng": rng_states[0].clone()}
            rng.update({f"rng_rank{r}": s for r, s in enumerate(rng_states)})
            rng.update({f"task_rng_rank{r}": s for r, s in enumerate(task_states) if s is not None})
            save_safetensors_atomic(rng, tmp / "rng.safetensors")
            state = {"step": self.step, "nimg": self.nimg, "skipped": self.skipped.tolist(),
                     "backend": "deepspeed", "world_size": self.world, "zero_stage": self.zero_stage,
                     "rng_mode": self.rng_mode, "optimizers": {"deepspeed": ["ds_generator", "ds_fake_score"]}}
            atomic_write_text(tmp / "trainer_state.json", json.dumps(state, indent=1))
            publish_checkpoint_dir(tmp, ckpt_root, name)
        barrier()
        return final

    def resume(self, run_dir: Path):
        from safetensors.torch import load_file
        ck = latest_checkpoint(run_dir)
        state = json.loads((ck / "trainer_state.json").read_text())
        if state.get("backend") != "deepspeed":
            raise RuntimeError(f"{ck} was written by the plain backend; resume it with engine.backend='plain' "
                               "(its safetensors weights can start a new DeepSpeed run via model.generator_init)")
        if state["world_size"] != self.world or state["zero_stage"] != self.zero_stage:
            raise RuntimeError(f"{ck} was written with world size {state['world_size']} and ZeRO-"
                               f"{state['zero_stage']}; resume with the same (now {self.world}, ZeRO-{self.zero_stage})")
        self.engine_G.load_checkpoint(str(ck / "ds_generator"), tag="state")
        self.engine_F.load_checkpoint(str(ck / "ds_fake_score"), tag="state")
        if self.ema_enabled:
            self._load_full_into(self.generator_ema.net, load_file(str(ck / "generator_ema.safetensors")))
        rng = load_file(str(ck / "rng.safetensors"))
        self.rng.set_state(rng[f"rng_rank{self.rank}"] if self.rng_mode == "per_rank" else rng["rng"])
        if f"task_rng_rank{self.rank}" in rng and hasattr(self.parts.task, "set_rng_state"):
            self.parts.task.set_rng_state(rng[f"task_rng_rank{self.rank}"])
        self.step, self.nimg = state["step"], state["nimg"]
        self.skipped.copy_(torch.tensor(state["skipped"], device=self.device))
        self.snapshot_step = -1
        self._refresh_snapshot()
        if self.rank == 0:
            log.info("resumed from %s at step %d (DeepSpeed, world %d, ZeRO-%d)", ck, self.step, self.world,
                     self.zero_stage)
