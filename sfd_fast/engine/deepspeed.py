"""The DeepSpeed ZeRO backend: two engines (generator, fake score) under the one SFD loop (trainer.py).

The teacher stays outside any engine (eval, no grads). The step functions of step.py are the same
as in the plain backend; what changes (docs/deepspeed_findings.md has the probe behind each choice):

  * fake-score phase: the generator sample runs through `engine_G` under no_grad; the fake score is
    called through `engine_F` (its forward is `Denoiser.output`); `engine_F.backward/step` per micro
    batch (DeepSpeed scales by 1/accumulation and steps at the boundary).
  * generator phase: the fake score is evaluated WITHOUT its engine's forward (engine_F(x) there
    registers backward hooks that break or silently corrupt the generator's backward). The plan's
    FrozenFakeScore (denoisers.py) decides how: ZeRO 0-2 FrozenView (functional_call with detached
    weights); ZeRO-3 partitions the weights and functional_call fails (`'Tensor' object has no
    attribute 'ds_id'`), so requires_grad is toggled off on the fake score and the module is called
    directly (restored in a finally block).
  * NaN robustness: the client optimizer checks its own gradients (under ZeRO: the averaged fp32
    partition), all-reduces the flag and skips the update on every rank (engine/optim.py NonfiniteGuard);
    the skipped-update counter is the trainer's, as in the plain backend.
  * random draws: by default every rank draws the GLOBAL micro batch from the same seeded stream
    and keeps its rows (engine.rng_mode='global_slice'): a world-size-N run at global batch B draws exactly
    what the single-process run draws at B, resume needs one RNG state, and ranks still see
    different samples. engine.rng_mode='per_rank' seeds rank r with seed + r and draws only its rows.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import (atomic_write_json, check_finite, crash_point, publish_checkpoint_dir, read_tensors,
                          save_safetensors_atomic)
from ..conditions import PhaseConditions
from ..step import PhaseDraws, draw_phase
from .distributed import barrier, build_deepspeed_config, validate_world
from .optim import NonfiniteGuard, make_optimizer

log = logging.getLogger("sfd_fast")
ROLES = ("fake_score", "generator")


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


def _meta_skeleton(generator: nn.Module) -> nn.Module:
    """A copy of `generator` whose parameters and persistent buffers are fp32 tensors on the meta
    device (no storage): deepcopy's memo maps each of them to its meta stand-in, so nothing of the
    size of the network is ever allocated. Non-persistent buffers (not in the state dict, so not
    refilled from the gathered weights) are copied for real; they are small (e.g. position tables)."""
    def meta(v, param: bool):
        dtype = torch.float32 if v.is_floating_point() else v.dtype
        m = torch.empty(v.shape, dtype=dtype, device="meta")
        return nn.Parameter(m, requires_grad=False) if param else m
    memo = {}
    for mod in generator.net.modules():
        for p in mod._parameters.values():
            if p is not None:
                memo[id(p)] = meta(p, True)
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                memo[id(b)] = meta(b, False)
    return copy.deepcopy(generator, memo).requires_grad_(False)


def _swap_storage(net: nn.Module, device: torch.device) -> None:
    """Give every parameter and persistent buffer of `net` fresh (uninitialised) storage on `device`;
    device "meta" frees it. In place, so module objects (and attention processors) stay the same."""
    for mod in net.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                mod._parameters[name] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=False)
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                mod._buffers[name] = torch.empty_like(b, device=device)


def _slice_draws(d: PhaseDraws, idx: torch.Tensor) -> PhaseDraws:
    c = d.cond
    pick = lambda x: None if x is None else x.index_select(0, idx)  # noqa: E731
    cond = PhaseConditions(pick(c.generator_cond), pick(c.fake_cond), pick(c.teacher_cond),
                           pick(c.fake_uncond), pick(c.teacher_uncond), pick(c.is_forget), pick(c.target))
    return PhaseDraws(pick(d.z), pick(d.noise), pick(d.t), cond, pick(d.coef))


class DeepSpeedBackend:
    """The generator and the fake score in two DeepSpeed ZeRO engines (interface: engine/plain.py)."""
    name = "deepspeed"

    def __init__(self, trainer):
        import deepspeed
        if not torch.distributed.is_initialized():
            raise RuntimeError("the DeepSpeed backend needs an initialised process group: call "
                               "engine.distributed.init_distributed(cfg) first (train.py does)")
        cfg, t = trainer.cfg, trainer
        self.trainer = trainer
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.is_rank0 = self.rank == 0
        self.micro = validate_world(cfg, self.world)            # this rank's rows per micro-batch
        self.global_micro = cfg.train.batch_size // cfg.train.grad_accum
        # denom = per-rank micro batch: DeepSpeed averages over ranks and divides by the
        # accumulation, so the gradient is sum_all_rows coef*L / global batch, as in one process
        self.denom = self.micro
        self.rng_mode = cfg.engine.rng_mode
        if self.rng_mode == "per_rank":
            t.rng.manual_seed(cfg.run.seed + self.rank)
            if hasattr(t.parts.task, "host_rng"):  # text task: prompt picks on accelerators differ per rank too
                t.parts.task.host_rng.manual_seed(cfg.run.seed + 7919 + self.rank)
        self.zero_stage = cfg.engine.zero_stage
        self.ds_configs = {r: build_deepspeed_config(cfg, r, self.world) for r in ROLES}
        self.write_configs()
        if not t.ema_enabled:
            # Sampling/eval on rank 0 needs a plain fp32 module (it never enters a collective). Without
            # EMA that is a copy of the fp32 master weights, but a PERSISTENT one would cost 4 B per
            # generator parameter for the whole run (3.2 GiB on SD1.5). So generator_ema is a
            # meta-device skeleton (structure, attention processors, no storage), copied before
            # DeepSpeed touches the generator; sampling_generator() materialises it on rank 0 only,
            # release_sampling() returns it to meta, finish() keeps the final copy for the evaluation.
            t.generator_ema = _meta_skeleton(t.generator)
        self.snapshot_step = -1     # the step the materialised copy holds (-1: none)
        o = cfg.optim
        params = {"fake_score": [p for p in t.fake_score.parameters() if p.requires_grad],
                  "generator": [p for p in t.generator.parameters() if p.requires_grad]}
        opts = {r: make_optimizer(getattr(o, r), cfg.engine, params[r], t.device,
                                  NonfiniteGuard(t.skipped, i, getattr(o, r).grad_clip_value))
                for i, r in enumerate(ROLES)}
        self.engine_G, self.gen_opt, _, _ = deepspeed.initialize(
            model=t.generator, optimizer=opts["generator"], config=copy.deepcopy(self.ds_configs["generator"]))
        self.engine_F, self.fake_opt, _, _ = deepspeed.initialize(
            model=_OutputForward(t.fake_score), optimizer=opts["fake_score"],
            config=copy.deepcopy(self.ds_configs["fake_score"]))
        self.engines = {"generator": self.engine_G, "fake_score": self.engine_F}
        self.phase_generator = self.engine_G
        self.phase_fake_score = _EngineOutput(self.engine_F)
        # generator phase view of the fake score: the plan's FrozenFakeScore (see the module docstring),
        # never engine_F's forward
        self.fake_score_view = t.frozen_fake_score.view
        self._ds_skips_seen = {r: 0 for r in ROLES}
        if self.is_rank0:
            log.info("deepspeed: world %d, ZeRO-%d, %s, optimizer %s, micro batch %d x accumulation %d x "
                     "world %d = global batch %d, rng %s", self.world, self.zero_stage, cfg.engine.precision,
                     cfg.engine.optimizer, self.micro, cfg.train.grad_accum, self.world,
                     cfg.train.batch_size, self.rng_mode)

    # ---------------------------------------------------------------- one step
    def write_configs(self) -> None:
        """deepspeed_<role>.json in the run directory (rank 0; nothing while the trainer has none)."""
        t = self.trainer
        if self.is_rank0 and t.run_dir is not None:
            for r, d in self.ds_configs.items():
                atomic_write_json(t.run_dir / f"deepspeed_{r}.json", d)
                log.info("deepspeed %s config: %s", r, json.dumps(d))

    def draw(self, phase: str, remain_coef: float, forget_coef: float) -> PhaseDraws:
        t, s = self.trainer, self.trainer.cfg.sfd
        n = self.micro if self.rng_mode == "per_rank" else self.global_micro
        d = draw_phase(t.parts.task, t.rng, n, n if forget_coef > 0 else 0, t.parts.sample_shape, s.t_min,
                       s.t_max, remain_coef, forget_coef, t.device, phase)
        if self.rng_mode == "per_rank":
            return d
        # the global micro batch, as one process draws it; keep this rank's remain and forget rows
        m, M = self.micro, self.global_micro
        rows = torch.arange(self.rank * m, (self.rank + 1) * m, device=t.device)
        if forget_coef > 0:
            rows = torch.cat([rows, rows + M])
        return _slice_draws(d, rows)

    def backward(self, role: str, loss: torch.Tensor) -> None:
        engine = self.engines[role]
        engine.backward(loss)
        engine.step()   # DeepSpeed accumulates and steps at the accumulation boundary

    def update(self, role: str) -> None:
        """ZeRO 1-3 detect non-finite gradients themselves (a global flag, all ranks skip) before our
        guard runs: add those skips to the counter (a host int DeepSpeed already synced)."""
        engine, seen = self.engines[role], self._ds_skips_seen[role]
        now = int(getattr(engine, "skipped_steps", 0))
        if now != seen:
            self.trainer.skipped[ROLES.index(role)] += now - seen
            self._ds_skips_seen[role] = now

    def generator_phase(self):
        return self.trainer.frozen_fake_score.during()

    @contextlib.contextmanager
    def ema_pairs(self):
        """EMA from the module weights (fp32 = the master weights under precision fp32; under bf16
        these are the bf16 compute weights: see docs/deepspeed.md)."""
        t = self.trainer
        with self._gathered(self.engine_G):
            ema = list(t.generator_ema.parameters())
            yield ema, [p.detach().to(e.dtype) for p, e in zip(t.generator.parameters(), ema)]

    def reduce_stats(self, stats: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(stats)  # per-rank sums and counts -> global
        return stats

    def sampling_generator(self):
        """Collective (all ranks): without EMA, rank 0 gets an fp32 copy of the master weights (a
        temporary: release_sampling() frees it); the other ranks take part in the gather only."""
        self._refresh_snapshot()
        return self.trainer.generator_ema

    def release_sampling(self) -> None:
        """Free the temporary fp32 copy (no-op with EMA: the EMA copy is the run's state)."""
        if not self.trainer.ema_enabled and self.snapshot_step >= 0:
            if self.is_rank0:
                _swap_storage(self.trainer.generator_ema.net, torch.device("meta"))
            self.snapshot_step = -1    # on every rank: the next refresh is a collective all enter

    # ---------------------------------------------------------------- helpers
    @contextlib.contextmanager
    def _gathered(self, engine):
        if self.zero_stage == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
                yield
        else:
            yield

    def _full_fp32(self, net: nn.Module) -> dict:
        """Full fp32 weights of `net` (inside an engine): collective, every rank gets them."""
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
        """Without EMA: gather the fp32 masters (collective) and load them into rank 0's copy."""
        t = self.trainer
        if t.ema_enabled or self.snapshot_step == t.step:
            return
        full = self._full_fp32(t.generator.net)
        if self.is_rank0:
            if self.snapshot_step < 0:    # still a skeleton: allocate its storage
                _swap_storage(t.generator_ema.net, t.device)
            self._load_full_into(t.generator_ema.net, full)
        self.snapshot_step = t.step       # on every rank, so that all skip or all gather

    def barrier(self) -> None:
        barrier()

    def finish(self) -> None:
        self._refresh_snapshot()
        barrier()

    # ---------------------------------------------------------------- checkpoints
    def save(self, state: dict) -> Path:
        """DeepSpeed state of both engines + plain safetensors exports, one atomic folder."""
        t = self.trainer
        ckpt_root = t.run_dir / "checkpoints"
        name = f"step-{t.step:08d}"
        final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}-ds"
        if self.is_rank0:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier()
        self.engine_G.save_checkpoint(str(tmp / "ds_generator"), tag="state", save_latest=False)
        self.engine_F.save_checkpoint(str(tmp / "ds_fake_score"), tag="state", save_latest=False)
        crash_point("ds_after_engine_save", t.step)   # fault-injection hook (tests); a no-op otherwise
        weights = {"generator": self._full_fp32(t.generator.net), "fake_score": self._full_fp32(t.fake_score.net)}
        if t.ema_enabled:
            weights["generator_ema"] = {k: v.detach().float() for k, v in t.generator_ema.net.state_dict().items()}
        rng_states = [None] * self.world
        torch.distributed.all_gather_object(rng_states, t.rng.get_state())
        task_states = [None] * self.world
        if hasattr(t.parts.task, "rng_state"):  # the text task's host generator (prompt picks on accelerators)
            torch.distributed.all_gather_object(task_states, t.parts.task.rng_state())
        if self.is_rank0:
            for role, sd in weights.items():
                save_safetensors_atomic(sd, tmp / f"{role}.safetensors")
            rng = {"rng": rng_states[0].clone()}
            rng.update({f"rng_rank{r}": s for r, s in enumerate(rng_states)})
            rng.update({f"task_rng_rank{r}": s for r, s in enumerate(task_states) if s is not None})
            save_safetensors_atomic(rng, tmp / "rng.safetensors")
            state = {**state, "backend": "deepspeed", "world_size": self.world, "zero_stage": self.zero_stage,
                     "rng_mode": self.rng_mode, "optimizers": {"deepspeed": ["ds_generator", "ds_fake_score"]}}
            atomic_write_json(tmp / "trainer_state.json", state)
            publish_checkpoint_dir(tmp, ckpt_root, name)
        barrier()
        return final

    def load(self, ckpt: Path) -> dict:
        t = self.trainer
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if state.get("backend") != "deepspeed":
            raise RuntimeError(f"{ckpt} was written by the plain backend; resume it with engine.backend='plain' "
                               "(its safetensors weights can start a new DeepSpeed run via model.generator_init)")
        if state["world_size"] != self.world or state["zero_stage"] != self.zero_stage:
            raise RuntimeError(f"{ckpt} was written with world size {state['world_size']} and ZeRO-"
                               f"{state['zero_stage']}; resume with the same (now {self.world}, ZeRO-{self.zero_stage})")
        for role in ("generator", "fake_score", "generator_ema"):   # the exports mirror the engines' weights
            f = ckpt / f"{role}.safetensors"
            if f.is_file():
                check_finite(read_tensors(f), f"checkpoint {f}")
        self.engine_G.load_checkpoint(str(ckpt / "ds_generator"), tag="state")
        self.engine_F.load_checkpoint(str(ckpt / "ds_fake_score"), tag="state")
        if t.ema_enabled:
            self._load_full_into(t.generator_ema.net, read_tensors(ckpt / "generator_ema.safetensors"))
        rng = read_tensors(ckpt / "rng.safetensors")
        t.rng.set_state(rng[f"rng_rank{self.rank}"] if self.rng_mode == "per_rank" else rng["rng"])
        if f"task_rng_rank{self.rank}" in rng and hasattr(t.parts.task, "set_rng_state"):
            t.parts.task.set_rng_state(rng[f"task_rng_rank{self.rank}"])
        self.release_sampling()   # a copy of other weights must not pass for this step's
        return state
