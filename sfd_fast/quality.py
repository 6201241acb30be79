"""Quality against SFD time: the targets a run is judged by, and when it first met them.

Each evaluation during training (trainer.evaluate_during, every `eval.every` steps) writes a stats.jsonl
record with `sfd_seconds` (seconds of SFD training since step 0, evaluation and everything before
training excluded: sfd_clock.py) and, for the digits family, `eval/fd_ratio` (the during-evaluation's
FD over the 50-step teacher's FD on the same sample count, seeds and classifier features), `eval/ua/<c>`
per forgotten class and `eval/retained_accuracy`.

A record meets the targets (`eval.targets`) when fd_ratio <= targets.fd_ratio, every forgotten class's
UA >= targets.ua, and retained accuracy >= targets.retained. `time_to_target` is the first record that
meets them; `held_at_end` says whether the last record meets them too (a run may reach and then lose
them). docs/quality.md explains the curve and the sweep (bench/quality_sweep.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TargetsConfig:
    fd_ratio: float = 1.0     # during-eval FD / teacher FD (same samples per class): at most this
    ua: float = 0.99          # unlearning accuracy of every forgotten class: at least this
    retained: float = 0.95    # classifier accuracy on the remaining classes' samples: at least this


def validate_quality(cfg, bad) -> None:
    """eval.targets and train.time_limit_s (values are finite already: domains.validate_numbers)."""
    tg = cfg.eval.targets
    if not tg.fd_ratio > 0:
        bad("eval.targets.fd_ratio", f"must be > 0 (generator FD / teacher FD, 1.0 = as good as the teacher), "
            f"got {tg.fd_ratio}")
    for key in ("ua", "retained"):
        value = getattr(tg, key)
        if not 0 <= value <= 1:
            bad(f"eval.targets.{key}", f"is an accuracy: must be in [0, 1], got {value}")
    limit = cfg.train.time_limit_s
    if limit < 0:
        bad("train.time_limit_s", f"must be >= 0 seconds of SFD training (0 = no limit), got {limit}")
    if limit > 0 and cfg.engine.backend != "plain":
        bad("train.time_limit_s", f"is supported with engine.backend 'plain' only (each rank's clock would "
            f"stop at its own step under {cfg.engine.backend!r}); set it to 0 or use the plain backend")


def ua_keys(record: dict) -> list[str]:
    return sorted(k for k in record if k.startswith("eval/ua/"))


def meets_targets(record: dict, targets: TargetsConfig) -> bool:
    """All three targets hold in this evaluation record (a missing metric does not meet its target)."""
    ratio, retained, uas = record.get("eval/fd_ratio"), record.get("eval/retained_accuracy"), ua_keys(record)
    if ratio is None or retained is None or not uas:
        return False
    return (ratio <= targets.fd_ratio and retained >= targets.retained
            and all(record[k] >= targets.ua for k in uas))


def quality_records(records: list[dict]) -> list[dict]:
    """The evaluation records that carry a quality point (fd_ratio and sfd_seconds), by step; the last
    record of a step wins (a resumed run logs some steps twice)."""
    by_step = {}
    for r in records:
        if "eval/fd_ratio" in r and "sfd_seconds" in r:
            by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


def quality_curve(records: list[dict]) -> list[dict]:
    """[{step, sfd_seconds, fd_ratio, ua: {class: value}, retained}] of the evaluation records."""
    return [{"step": int(r["step"]), "sfd_seconds": r["sfd_seconds"], "fd_ratio": r["eval/fd_ratio"],
             "ua": {k[len("eval/ua/"):]: r[k] for k in ua_keys(r)},
             "retained": r.get("eval/retained_accuracy")} for r in quality_records(records)]


def time_to_target(records: list[dict], targets: TargetsConfig, eval_every: int) -> dict:
    """{"sfd_seconds", "step": the first evaluation meeting every target, "held_at_end": the last one
    meets them too, "targets"}; with null values and a "reason" when they were never met."""
    out = {"sfd_seconds": None, "step": None, "held_at_end": None, "targets": asdict(targets)}
    if eval_every <= 0:
        return {**out, "reason": "eval.every is 0: no evaluation during training, so no curve to read"}
    points = quality_records(records)
    if not points:
        return {**out, "reason": "no evaluation record with eval/fd_ratio and sfd_seconds in stats.jsonl"}
    out["held_at_end"] = meets_targets(points[-1], targets)
    first = next((r for r in points if meets_targets(r, targets)), None)
    if first is None:
        return {**out, "reason": f"targets never met in {len(points)} evaluations (steps {points[0]['step']}"
                                 f"-{points[-1]['step']})"}
    return {**out, "sfd_seconds": first["sfd_seconds"], "step": int(first["step"])}
