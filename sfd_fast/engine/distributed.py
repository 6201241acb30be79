"""DeepSpeed configuration and the process group (imports no deepspeed until a run asks for it).

`build_deepspeed_config(cfg, role, world)` is the dict of one engine ('generator' or 'fake_score'),
with the batch arithmetic checked (`validate_world`); `init_distributed(cfg)` picks this rank's
device and starts the process group (nccl on CUDA, gloo on CPU).
"""
from __future__ import annotations

import copy
import logging
import os
import socket
from pathlib import Path

import torch

from ..config import Config, ConfigError, read_json_file

log = logging.getLogger("sfd_fast")

DS_HINT = ("engine.backend='deepspeed' needs DeepSpeed ({err}). Install it with "
           "`pip install -e '.[dist]'` (pins deepspeed==0.19.8), or use engine.backend='plain'")
# keys of the generated DeepSpeed dict that the run config owns: a merged JSON may not change them
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "optimizer", "bf16", "fp16")


# ---------------------------------------------------------------------------------------------------
# checks before anything is built
# ---------------------------------------------------------------------------------------------------

def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


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


def read_user_ds_json(path: str) -> dict:
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
        user = read_user_ds_json(e.deepspeed_config)
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
    from .device import resolve_device
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


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown_distributed():
    """After a successful run: every rank meets once more, then the process group is torn down
    explicitly. Left to the interpreter's exit, gloo's destructor can race a peer that already
    closed its sockets and abort the process (SIGABRT) after all the work was done."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


