"""The report's `quality` section: quality against SFD seconds (sfd_fast/quality.py).

Three panels against sfd_seconds (seconds of SFD training, evaluation excluded): fd_ratio (the
during-evaluation FD over the teacher's FD on the same samples), UA per forgotten class, and retained
accuracy, each with its target from eval.targets drawn as a dashed line; above them, one sentence with
time_to_target (eval.json's when the run has one, else computed from stats.jsonl and config.json),
also drawn as a vertical line when the targets were met.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from ..quality import TargetsConfig, quality_records, time_to_target, ua_keys


def _targets(config: dict) -> TargetsConfig:
    raw = config.get("eval", {}).get("targets", {}) if isinstance(config.get("eval"), dict) else {}
    known = {k: float(v) for k, v in (raw if isinstance(raw, dict) else {}).items()
             if k in TargetsConfig.__dataclass_fields__ and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return TargetsConfig(**known)


def _time_to_target(run_dir: Path, evals: list[dict], config: dict, targets: TargetsConfig) -> dict:
    path = Path(run_dir) / "eval.json"
    if path.is_file():
        try:
            ttt = json.loads(path.read_text()).get("time_to_target")
            if isinstance(ttt, dict):
                return ttt
        except (json.JSONDecodeError, AttributeError):
            pass
    every = config.get("eval", {}).get("every", 0) if isinstance(config.get("eval"), dict) else 0
    return time_to_target(evals, targets, int(every or 0))


def time_to_target_sentence(ttt: dict) -> str:
    tg = ttt.get("targets", {})
    what = (f"fd_ratio <= {tg.get('fd_ratio')}, UA >= {tg.get('ua')} for every forgotten class, "
            f"retained >= {tg.get('retained')}")
    if ttt.get("sfd_seconds") is None:
        return f"Targets ({what}) not reached: {ttt.get('reason', 'no record meets them')}."
    held = "held at the end" if ttt.get("held_at_end") else "NOT held at the end"
    return (f"Targets ({what}) first met after {ttt['sfd_seconds']:.1f} s of SFD training (step "
            f"{ttt.get('step')}); {held}.")


def quality_section(plt, run_dir: Path, evals: list[dict], config: dict, figure_tag) -> str:
    """HTML of the section; `plt` None (no matplotlib) gives the sentence without plots."""
    targets = _targets(config)
    ttt = _time_to_target(run_dir, evals, config, targets)
    sentence = f'<p id="time-to-target">{html.escape(time_to_target_sentence(ttt))}</p>'
    points = quality_records(evals)
    if not points:
        return sentence + "<p>no evaluation records with fd_ratio and sfd_seconds (eval.every > 0 on a digits run writes them).</p>"
    if plt is None:
        return sentence
    x = [r["sfd_seconds"] for r in points]
    panels = [("fd / teacher fd", [("fd_ratio", [r["eval/fd_ratio"] for r in points])], targets.fd_ratio),
              ("UA per forgotten class", [(k.split("/")[-1], [r.get(k) for r in points]) for k in ua_keys(points[-1])],
               targets.ua),
              ("retained accuracy", [("retained", [r.get("eval/retained_accuracy") for r in points])], targets.retained)]
    fig, axes = plt.subplots(1, 3, figsize=(16.5, 3.6), squeeze=False)
    for ax, (title, lines, target) in zip(axes[0], panels):
        for label, y in lines:
            ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, label=label)
        ax.axhline(target, color="k", linestyle="--", linewidth=1, label=f"target {target:g}")
        if ttt.get("sfd_seconds") is not None:
            ax.axvline(ttt["sfd_seconds"], color="g", linestyle=":", linewidth=1, label="time to target")
        ax.set_title(title)
        ax.set_xlabel("SFD seconds (evaluation excluded)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return sentence + figure_tag(plt, fig, "quality against SFD seconds with targets")
