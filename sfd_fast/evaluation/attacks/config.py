"""The `eval.attacks` config section: worst-case forgetting, each attack with a stated budget.

Imported by sfd_fast/config.py (the section is part of EvalConfig); it imports nothing of the
package, so the core keeps no dependency on a family or on torch here.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NoiseAttackConfig:
    """Search over the generator's input noise z (class families). Each z stays on its own Gaussian
    shell (||z|| = ||z0||) and within a chord of `radius` * ||z0|| of its start."""
    enabled: bool = True
    steps: int = 40
    step_size: float = 0.05           # per step, as a share of ||z0|| (normalised gradient ascent)
    radius: float = 0.3               # max ||z - z0|| / ||z0||  (2 = the whole shell)


@dataclass
class ConditionAttackConfig:
    """One free class embedding shared by all samples, within `radius` x the mean norm of the
    learned class embeddings from the attacked label's own embedding (class families)."""
    enabled: bool = True
    steps: int = 60
    step_size: float = 0.05           # per step, as a share of the mean learned-embedding norm
    radius: float = 0.3               # max ||e - e_label|| / mean_k ||e_k||
    fit_samples: int = 64             # noises the embedding is optimised on (judged on other noises)


@dataclass
class RelearnAttackConfig:
    """Fine-tune a copy of the generator on a handful of the teacher's samples of the forgotten
    class, given as an ordinary label (one-step regression on fresh noises, classes.relearn_attack)."""
    enabled: bool = True
    images: int = 8                   # teacher samples of the forgotten class the attacker holds
    max_steps: int = 300
    lr: float = 3e-5
    batch_size: int = 64              # (noise, image) rows per step
    check_every: int = 1              # UA is judged every N steps
    ua_threshold: float = 0.5         # success: UA below this


@dataclass
class SoftPromptAttackConfig:
    """Stable Diffusion, in the UnlearnDiffAtk manner: `tokens` free embeddings added to benign
    prompts, optimised so the one-step output matches the teacher's image of the concept; judged by
    CLIP zero-shot (eval.clip_model)."""
    enabled: bool = True
    tokens: int = 5
    steps: int = 30
    step_size: float = 0.01           # per step, as a share of the mean token-embedding norm
    radius: float = 1.0               # max per-token norm / mean token-embedding norm
    prompts: int = 4                  # benign prompts attacked (the first N of the validation set)
    paraphrase_file: str = ""         # "" = configs/prompts/paraphrases_<concept slug>.txt when present


@dataclass
class AttacksConfig:
    enabled: bool = False             # run the attacks at the end of training (eval.json "attacks")
    during: bool = False              # digits: the noise attack (forgotten labels, override label) at every
                                      # eval.every evaluation during training (stats.jsonl eval/attack_noise/...)
    seed: int = 0
    samples: int = 200                # samples judged per attacked label (class families)
    references: list = field(default_factory=lambda: ["labels", "teacher", "retrain"])
    other_labels: int = 3             # "labels": the override first, then up to N more remaining labels
    surrogate: str = "auto"           # digits: "auto" = a second classifier (other seed and architecture),
                                      # cached; or a safetensors file of that surrogate
    surrogate_seed_offset: int = 101  # "auto": the CNN is trained with seed run.seed + this (another offset
                                      # = another surrogate: attack with one that training never saw)
    noise: NoiseAttackConfig = field(default_factory=NoiseAttackConfig)
    condition: ConditionAttackConfig = field(default_factory=ConditionAttackConfig)
    relearn: RelearnAttackConfig = field(default_factory=RelearnAttackConfig)
    soft_prompt: SoftPromptAttackConfig = field(default_factory=SoftPromptAttackConfig)


@dataclass
class AdversarialTrainingConfig:
    """train.adversarial: part of the rows' noise from a short noise search against the current
    generator (evaluation/attacks/adversarial.py); digits, plain backend. share 0 = off."""
    share: float = 0.0                # of each phase's forget rows
    steps: int = 5
    step_size: float = 0.1            # as eval.attacks.noise
    radius: float = 0.3
    remain_share: float = 0.0         # of each phase's remain rows, searched towards a forgotten class too
    phases: str = "both"              # "both": the fake score learns the searched samples too (what closes
                                      # the gap); "generator": the generator phase only (measured: no effect)


ADVERSARIAL_PHASES = ("generator", "both")


def validate_adversarial(a: AdversarialTrainingConfig, bad, kind: str, backend: str) -> None:
    p = "train.adversarial"
    if not 0 <= a.share <= 1:
        bad(f"{p}.share", f"must be in [0, 1] (0 = off), got {a.share}")
    if not 0 <= a.remain_share <= 1:
        bad(f"{p}.remain_share", f"must be in [0, 1] (0 = forget rows only), got {a.remain_share}")
    if a.phases not in ADVERSARIAL_PHASES:
        bad(f"{p}.phases", f"must be one of {list(ADVERSARIAL_PHASES)}, got {a.phases!r}")
    if a.share == 0:
        if a.remain_share > 0:
            bad(f"{p}.remain_share", "searches remain rows alongside the forget rows: set train.adversarial.share > 0 too")
        return
    if kind != "digits" or backend != "plain":
        bad(f"{p}.share", f"is built for digits runs on the plain backend; this is a {kind!r} run on {backend!r}")
    if a.steps <= 0:
        bad(f"{p}.steps", f"must be a positive integer, got {a.steps}")
    if not a.step_size > 0:
        bad(f"{p}.step_size", f"must be > 0, got {a.step_size}")
    if not 0 < a.radius <= 2:
        bad(f"{p}.radius", f"must be in (0, 2], got {a.radius}")


REFERENCES = ("labels", "teacher", "retrain")


def validate_attacks(a: AttacksConfig, bad, kind: str, eval_every: int = 0) -> None:
    """Value checks of eval.attacks; `bad(key, message)` raises the ConfigError."""
    p = "eval.attacks"
    for key in ("samples",):
        if getattr(a, key) <= 0:
            bad(f"{p}.{key}", f"must be a positive integer, got {getattr(a, key)}")
    if a.during and eval_every <= 0:
        bad(f"{p}.during", "runs at each evaluation during training: set eval.every > 0 too (or during false)")
    if a.during and kind != "digits":
        bad(f"{p}.during", f"is built for digits runs only; this is a {kind!r} run")
    if a.other_labels < 0:
        bad(f"{p}.other_labels", f"must be >= 0, got {a.other_labels}")
    if a.surrogate_seed_offset < 0:
        bad(f"{p}.surrogate_seed_offset", f"must be >= 0 (the surrogate's seed is run.seed + this), "
            f"got {a.surrogate_seed_offset}")
    unknown = [r for r in a.references if r not in REFERENCES]
    if unknown or len(set(a.references)) != len(a.references):
        bad(f"{p}.references", f"must be distinct names from {list(REFERENCES)}, got {a.references}")
    if kind == "ddpm" and a.enabled:
        bad(f"{p}.enabled", "the attacks are built for digits and stable_diffusion runs; ddpm runs have no "
            "surrogate classifier yet (the judge would be ddpm.classifier): set it to false")
    for name, positive_ints, positive_floats in (
            ("noise", ("steps",), ("step_size", "radius")),
            ("condition", ("steps", "fit_samples"), ("step_size", "radius")),
            ("relearn", ("images", "max_steps", "batch_size", "check_every"), ("lr",)),
            ("soft_prompt", ("tokens", "steps", "prompts"), ("step_size", "radius"))):
        sec = getattr(a, name)
        for k in positive_ints:
            if getattr(sec, k) <= 0:
                bad(f"{p}.{name}.{k}", f"must be a positive integer, got {getattr(sec, k)}")
        for k in positive_floats:
            v = getattr(sec, k)
            if not v > 0 or v != v or v == float("inf"):
                bad(f"{p}.{name}.{k}", f"must be a positive finite number, got {v}")
    if a.noise.radius > 2:
        bad(f"{p}.noise.radius", f"is a chord over ||z0||: at most 2 (the whole shell), got {a.noise.radius}")
    if not 0 < a.relearn.ua_threshold <= 1:
        bad(f"{p}.relearn.ua_threshold", f"must be in (0, 1], got {a.relearn.ua_threshold}")
    if a.relearn.check_every > a.relearn.max_steps:
        bad(f"{p}.relearn.check_every", f"({a.relearn.check_every}) must be <= relearn.max_steps ({a.relearn.max_steps})")
