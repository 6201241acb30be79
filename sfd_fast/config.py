"""Typed run configuration with a strict JSON loader.

One dataclass per concern. `load_config(path, overrides)` reads JSON, applies `--set a.b=value`
overrides, rejects unknown keys (naming the key and the file), checks types, then `validate()`
checks values, all before any model is built or any file is written.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config_ddpm import DDPMConfig, DDPMNetConfig  # noqa: F401  (DDPMNetConfig: ddpm/model.py)
from .config_edm import EDMConfig
from .errors import UserError
from .quality import TargetsConfig, validate_quality
from .trackers import LogConfig, validate_trackers
from .evaluation.attacks.config import AdversarialTrainingConfig, AttacksConfig, validate_adversarial, validate_attacks


class ConfigError(UserError, ValueError):
    """A bad configuration: the message names the key and the file and says what to do."""


@dataclass
class RunConfig:
    name: str = "run"                 # run directory name under root (a numbered suffix is never added)
    root: str = "runs"                # run root; caches (e.g. the pretrained digits teacher) live here
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N


@dataclass
class ScheduleConfig:
    beta_schedule: str = "linear"     # linear (DDPM) | scaled_linear (Stable Diffusion)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_timesteps: int = 1000
    prediction: str = "epsilon"       # epsilon | v_prediction


@dataclass
class ModelConfig:
    kind: str = "digits"              # a family of families.py: digits | stable_diffusion | ddpm | edm
    teacher: str = "auto"             # digits: safetensors checkpoint, or "auto" = pretrain once and cache
    generator_init: str = "teacher"   # "teacher" (SFD) or a generator checkpoint ("two-stage")
    hidden: int = 384                 # digits MLP width
    blocks: int = 4                   # digits MLP residual blocks
    pretrained: str = ""              # stable_diffusion: diffusers folder or hub id
    trust_pickle: bool = False        # allow loading a pickled {"ema": UNet} generator


@dataclass
class SFDConfig:
    alpha: float = 1.2
    t_init: int = 440
    t_min: int = 38
    t_max: int = 712                  # t ~ U{t_min, ..., t_max - 1}
    num_classes: int = 10
    forget_class: int = 0
    override: str = "fixed"           # fixed | random (a uniform class other than forget_class)
    override_class: int = 1
    forget_classes: list = field(default_factory=list)    # several targets: [0, 7]; [] = [forget_class]
    override_classes: list = field(default_factory=list)  # one per forget class (override "fixed")
    sg_remain_coef: float = 1.0
    sg_forget_coef: float = 1.0
    g_remain_coef: float = 1.0
    g_forget_coef: float = 1.0
    cfg_train_fake: float = 1.0       # kappa1: fake score in its own loss
    cfg_eval_fake: float = 1.0        # kappa2: fake score inside the generator loss
    cfg_eval_real: float = 1.0        # kappa4: teacher inside the generator loss


@dataclass
class OptimizerConfig:
    lr: float = 1e-5
    betas: list = field(default_factory=lambda: [0.0, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_value: Optional[float] = None   # clip_grad_value_ (the DDPM reference uses 1.0)


@dataclass
class OptimConfig:
    fake_score: OptimizerConfig = field(default_factory=OptimizerConfig)
    generator: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class EMAConfig:
    halflife_kimg: float = 0.0        # > 0: SiD-style half-life with ramp-up
    rampup_ratio: Optional[float] = 0.05
    decay: Optional[float] = None     # fixed per-step decay (DDPM reference: 0.9999); overrides halflife


@dataclass
class TrainConfig:
    batch_size: int = 64              # remain samples per step (as many forget samples ride along)
    grad_accum: int = 1
    micro_batch: object = None        # None: batch_size / grad_accum; an int (sets grad_accum); "auto": the
                                      # largest that fits (engine/autobatch.py), resolved to an int on start
    total_steps: int = 1000
    log_every: int = 100              # a tick: status line + stats.jsonl (the only host syncs)
    checkpoint_every: int = 500
    sample_every: int = 500
    progress: bool = True             # tqdm bar (only on a terminal)
    keep_checkpoints: int = 0         # > 0: keep only the newest N checkpoints (0 = keep all)
    max_consecutive_skips: int = 50   # stop (checkpoint, exit 3) after this many skipped updates in a row
    time_limit_s: float = 0.0         # > 0: stop (then finish normally) once SFD time reaches it (quality.py)
    ema: EMAConfig = field(default_factory=EMAConfig)
    adversarial: AdversarialTrainingConfig = field(default_factory=AdversarialTrainingConfig)  # docs/robustness.md


@dataclass
class EngineConfig:
    backend: str = "plain"            # plain (single process) | deepspeed (ZeRO engines)
    precision: str = "fp32"           # fp32 | bf16 (autocast compute, fp32 master weights)
    compile: bool = False             # torch.compile the per-network graphs (fullgraph)
    compile_phase: bool = False       # instead: each whole phase (noise, both scores + CFG, loss) as one graph
    compile_regions: bool = False     # with compile: only the repeated blocks (engine/regional.py; cold compile cost)
    compile_mode: str = "default"     # torch.compile mode: default | max-autotune | reduce-overhead
    channels_last: bool = False       # UNets in channels_last memory format (unmeasured on GPU: off)
    deterministic: bool = False       # CUDA: cudnn.benchmark off, deterministic algorithms, cuBLAS workspace
    kernels: str = "auto"             # auto | torch | triton  (the fused SFD loss)
    attention: str = "sdpa"           # sdpa | xformers | auto
    activation_checkpointing: bool = False
    optimizer: str = "adam"           # adam | adam8bit (bitsandbytes)
    zero_stage: int = 0               # deepspeed only: 0-3
    deepspeed_config: str = ""        # optional JSON file merged over the generated DeepSpeed dict
    rng_mode: str = "global_slice"    # deepspeed only: global_slice (= one process) | per_rank
    memory_limit_gib: Optional[float] = None   # cap on the memory the preflight / auto micro-batch plan for


@dataclass
class PromptsConfig:
    """Stable Diffusion concept forgetting (spec §1b, §4.3)."""
    remain_file: str = "configs/prompts/remain_default.txt"
    forget_file: str = ""
    val_file: str = ""
    concept_to_forget: str = ""
    concept_to_override: str = ""
    override_file: str = ""
    pos_file: str = ""
    neg_file: str = ""
    use_neg: list = field(default_factory=lambda: [False, False, True])  # (kappa1, kappa2, kappa4)
    sid_w_neg: bool = False
    sg_w_override: bool = False
    context_dropout: float = 0.1      # fake-score training only, when its guidance is not 1
    resolution: int = 512
    grid_prompts: list = field(default_factory=list)  # snapshot-grid prompts; [] = first 8 forget + val
    grid_per_prompt: int = 2          # images per grid row (one row per grid prompt)
    # several concepts in one run: a list of {concept_to_forget, concept_to_override, forget_file,
    # override_file?, val_file?, weight?}; [] = the single concept of the keys above
    concepts: list = field(default_factory=list)


@dataclass
class PretrainConfig:
    """Digits teacher (class-conditional DDPM) and classifier pretraining."""
    steps: int = 8000
    batch_size: int = 256
    lr: float = 1e-3
    cond_drop_prob: float = 0.1
    classifier_epochs: int = 300


@dataclass
class EvalConfig:
    enabled: bool = True
    samples_per_class: int = 200
    teacher_steps: int = 50
    every: int = 0                    # > 0: evaluate on a fixed small sample set every N steps (stats.jsonl)
    during_samples_per_class: int = 50   # digits: samples per class of that evaluation
    clip_model: str = ""              # stable_diffusion: CLIP folder or hub id for eval.json ("" = skipped)
    clip_prompts: int = 8             # stable_diffusion: prompts per forget concept / validation set
    clip_images_per_prompt: int = 2   # stable_diffusion: fixed-seed one-step samples per prompt
    report: bool = True               # write report.html at the end of the run
    targets: TargetsConfig = field(default_factory=TargetsConfig)   # time_to_target in eval.json (quality.py)
    attacks: AttacksConfig = field(default_factory=AttacksConfig)   # worst-case forgetting (docs/robustness.md)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sfd: SFDConfig = field(default_factory=SFDConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    ddpm: DDPMConfig = field(default_factory=DDPMConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)
    log: LogConfig = field(default_factory=LogConfig)   # experiment trackers (trackers.py)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# strict loading
# ---------------------------------------------------------------------------------------------------

def _check_type(value, tp, key: str, source: str):
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], key, source)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is list and isinstance(value, (list, tuple)):
        return list(value)
    if tp in (int, float, str, bool, list) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{source}: '{key}' must be {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, data: dict, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.')}' must be an object, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key.startswith("_"):  # "_comment" keys are allowed for documentation
            continue
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown config key '{prefix}{key}'. Known keys in "
                f"'{prefix.rstrip('.') or 'top level'}': {', '.join(sorted(fields))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.", source)
        else:
            kwargs[key] = _check_type(value, tp, f"{prefix}{key}", source)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. train.total_steps=100")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
        node[path[-1]] = value
    return data


def read_json_file(path: str | Path, what: str, hint: str) -> dict:
    """A JSON object from `path`, or a ConfigError naming `what`, the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} {'is a folder' if path.is_dir() else 'does not exist'}; {hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read ({e.strerror})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a JSON config (or the defaults), apply overrides, check keys, types and values."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        data = read_json_file(path, "config file", "pass an existing JSON file to --config")
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} (with --set overrides)"
    cfg = _build(Config, data, "", source)
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str = "config") -> None:
    """Value checks that must stop a run before it starts."""
    def bad(key, msg):
        raise ConfigError(f"{source}: '{key}' {msg}")

    s, t, sch = cfg.sfd, cfg.train, cfg.schedule
    from .domains import validate_micro_batch, validate_numbers
    validate_numbers(cfg, bad)   # every float finite; numeric domains (eps, betas, EMA, pretrain, ...)
    from .families import FAMILIES
    if cfg.model.kind not in FAMILIES:
        bad("model.kind", f"must be one of {', '.join(map(repr, FAMILIES))}, got {cfg.model.kind!r}")
    if sch.beta_schedule not in ("linear", "scaled_linear"):
        bad("schedule.beta_schedule", f"must be 'linear' or 'scaled_linear', got {sch.beta_schedule!r}")
    if sch.prediction not in ("epsilon", "v_prediction"):
        bad("schedule.prediction", f"must be 'epsilon' or 'v_prediction', got {sch.prediction!r}")
    if sch.num_timesteps <= 1:
        bad("schedule.num_timesteps", "must be > 1")
    if not 0 <= s.t_min < s.t_max <= sch.num_timesteps:
        bad("sfd.t_min/t_max", f"need 0 <= t_min < t_max <= {sch.num_timesteps}, got {s.t_min}, {s.t_max}")
    if not 0 <= s.t_init < sch.num_timesteps:
        bad("sfd.t_init", f"must be in [0, {sch.num_timesteps}), got {s.t_init}")
    for k in ("sg_remain_coef", "sg_forget_coef", "g_remain_coef", "g_forget_coef"):
        if getattr(s, k) < 0:
            bad(f"sfd.{k}", "must be >= 0")
    for k in ("cfg_train_fake", "cfg_eval_fake", "cfg_eval_real"):
        if getattr(s, k) <= 0:
            bad(f"sfd.{k}", "must be > 0 (1 disables guidance)")
    if cfg.model.generator_init != "teacher" and not Path(cfg.model.generator_init).exists():
        bad("model.generator_init", f"points to {cfg.model.generator_init}, which does not exist; "
            "use 'teacher' or an existing generator checkpoint")
    if t.batch_size <= 0:
        bad("train.batch_size", f"must be a positive integer, got {t.batch_size}")
    if t.grad_accum <= 0:
        bad("train.grad_accum", f"must be a positive integer, got {t.grad_accum}")
    if t.batch_size % t.grad_accum:
        bad("train.grad_accum", f"({t.grad_accum}) must divide train.batch_size ({t.batch_size})")
    validate_micro_batch(t, bad)
    if t.total_steps <= 0:
        bad("train.total_steps", "must be positive")
    for k in ("log_every", "checkpoint_every", "sample_every"):
        if getattr(t, k) <= 0:
            bad(f"train.{k}", "must be positive")
    for role in ("fake_score", "generator"):
        o: OptimizerConfig = getattr(cfg.optim, role)
        if not o.lr > 0:
            bad(f"optim.{role}.lr", f"must be a positive number, got {o.lr}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            bad(f"optim.{role}.betas", f"must be two numbers in [0, 1), got {o.betas}")
        if o.grad_clip_value is not None and o.grad_clip_value <= 0:
            bad(f"optim.{role}.grad_clip_value", "must be positive or null")
    e = t.ema
    if e.decay is not None and not 0 <= e.decay < 1:
        bad("train.ema.decay", "must be in [0, 1) or null")
    if e.halflife_kimg < 0:
        bad("train.ema.halflife_kimg", "must be >= 0")
    from .domains import validate_engine
    validate_engine(cfg, bad)
    validate_trackers(cfg.log, bad)
    from .families import family_checks
    family_checks(cfg.model.kind)(cfg, bad)   # the family's own checks (digits/checks.py, sd/checks.py)
    ev = cfg.eval
    for k in ("samples_per_class", "during_samples_per_class", "clip_prompts", "clip_images_per_prompt"):
        if getattr(ev, k) <= 0:
            bad(f"eval.{k}", "must be positive")
    if ev.every < 0:
        bad("eval.every", f"must be >= 0 (0 = no evaluation during training), got {ev.every}")
    validate_attacks(ev.attacks, bad, cfg.model.kind, ev.every)
    validate_quality(cfg, bad)   # eval.targets, train.time_limit_s
    validate_adversarial(t.adversarial, bad, cfg.model.kind, cfg.engine.backend)


def read_run_config(run_dir: str | Path, kind: str | None = None) -> Config:
    """A finished run's config.json (keys and types checked; files it names are not re-validated),
    optionally required to be a `kind` run. ConfigError names the file and what is wrong."""
    f = Path(run_dir) / "config.json"
    if not f.is_file():
        raise ConfigError(f"{run_dir} has no config.json; is it a sfd-fast run directory?")
    cfg = _build(Config, read_json_file(f, "run config", "it is written by sfd_fast/train.py"), "", str(f))
    if kind is not None and cfg.model.kind != kind:
        raise ConfigError(f"{run_dir} is a {cfg.model.kind!r} run; this command is for {kind!r} runs")
    return cfg
