"""`sfd-fast report RUN_A RUN_B ...`: one self-contained page comparing runs (one run: report.py).

Sections (fixed ids, like the single-run report):
  runs         each run's label, folder, last logged step and number of evaluations
  curves       one panel per quantity (each network's remain/forget loss, samples/s, every eval/...
               metric), one line per run, against the step
  final-eval   eval.json side by side: one row per metric, one column per run
  config       the resolved configs side by side, one row per key; rows whose values differ between
               the runs carry class "diff" (highlighted) and are listed first
  environment  each run's latest start (torch, CUDA, device, commit) side by side, differences marked

The question it answers is a sweep's: what changed between these runs, and what it did. A run
missing a file simply shows "-" in its column.
"""
from __future__ import annotations

import argparse
import html
import json
from pathlib import Path

from ..checkpoint import atomic_write_text
from ..environment import read_environment
from ..trackers import flatten
from .report import MISSING_MATPLOTLIB, NETWORKS, STYLE, _figure_tag, _pyplot, _series, read_stats, write_report

MISSING = object()   # a key one run does not have
COMPARE_STYLE = STYLE + " tr.diff td{background:#fff3b0} td.missing{color:#999}"
CURVE_KEYS = [f"{net}/{branch}" for net in NETWORKS for branch in ("remain", "forget")] + ["samples_per_s"]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def load_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() and not (run_dir / "stats.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} holds neither config.json nor stats.jsonl; is it a sfd-fast run directory?")
    config = _read_json(run_dir / "config.json")
    ticks, evals = read_stats(run_dir)
    starts = read_environment(run_dir)
    return {"dir": run_dir, "name": config.get("run", {}).get("name") or run_dir.name, "config": config,
            "ticks": ticks, "evals": evals, "eval": _read_json(run_dir / "eval.json"),
            "env": starts[-1] if starts else {}}


def _labels(runs: list[dict]) -> list[str]:
    """Run names, made unique with the folder name where two runs share one."""
    names = [r["name"] for r in runs]
    return [n if names.count(n) == 1 else f"{n} ({r['dir'].name})" for n, r in zip(names, runs)]


def _curves(plt, runs: list[dict], labels: list[str]) -> str:
    eval_keys = sorted({k for r in runs for e in r["evals"] for k in e if k.startswith("eval/")})
    panels = [(k, "ticks") for k in CURVE_KEYS] + [(k, "evals") for k in eval_keys]
    panels = [(k, src) for k, src in panels if any(_series(r[src], k)[0] for r in runs)]
    if not panels:
        return "<p>no records in any of these runs yet.</p>"
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (key, src) in zip(axes.flat, panels):
        for run, label in zip(runs, labels):
            x, y = _series(run[src], key)
            if x:
                ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return _figure_tag(plt, fig, "curves of every run, overlaid")


def _cell(v) -> str:
    if v is MISSING:
        return '<td class="missing">-</td>'
    text = f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return f"<td>{html.escape(text)}</td>"


def side_by_side(dicts: list[dict], labels: list[str], diff_first: bool) -> str:
    """One row per flattened key, one column per run; rows whose values differ get class "diff"."""
    flats = [flatten(d) for d in dicts]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    rows = []
    for k in keys:
        values = [f.get(k, MISSING) for f in flats]
        as_text = {"-" if v is MISSING else json.dumps(v, sort_keys=True, default=str) for v in values}
        rows.append((len(as_text) > 1, k, values))
    if diff_first:
        rows.sort(key=lambda r: not r[0])   # stable: differing keys first, each group in config order
    head = "<tr><th>key</th>" + "".join(f"<th>{html.escape(label)}</th>" for label in labels) + "</tr>"
    body = "".join(f'<tr class="{"diff" if d else "same"}" data-key="{html.escape(k)}"><td>{html.escape(k)}</td>'
                   + "".join(_cell(v) for v in values) + "</tr>" for d, k, values in rows)
    n_diff = sum(r[0] for r in rows)
    return f"<p>{n_diff} of {len(rows)} keys differ (highlighted).</p><table>{head}{body}</table>"


def render_comparison(run_dirs: list[Path]) -> str:
    runs = [load_run(d) for d in run_dirs]
    labels = _labels(runs)
    plt = _pyplot()
    curves = _curves(plt, runs, labels) if plt is not None else f'<p class="warn">{html.escape(MISSING_MATPLOTLIB)}</p>'
    overview = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{html.escape(str(r['dir']))}</td>"
        f"<td>{r['ticks'][-1]['step'] if r['ticks'] else '-'}</td><td>{len(r['evals'])}</td></tr>"
        for r, label in zip(runs, labels))
    sections = [
        ("runs", "Runs", "<table><tr><th>run</th><th>folder</th><th>last step</th><th>evaluations</th></tr>"
                         f"{overview}</table>"),
        ("curves", "Curves, overlaid", curves),
        ("final-eval", "Final evaluation (eval.json)", side_by_side([r["eval"] for r in runs], labels, False)),
        ("config", "Configs (differences first)", side_by_side([r["config"] for r in runs], labels, True)),
        ("environment", "Environment (latest start)", side_by_side([r["env"] for r in runs], labels, False)),
    ]
    body = "".join(f'<section id="{sid}"><h2>{title}</h2>{content}</section>' for sid, title, content in sections)
    title = "sfd-fast comparison: " + ", ".join(labels)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{COMPARE_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def write_comparison(run_dirs: list[Path], out: Path) -> Path:
    out = Path(out)
    atomic_write_text(out, render_comparison([Path(d) for d in run_dirs]))
    return out


def main(argv=None) -> None:
    """`sfd-fast report RUN_DIR [--out FILE]` or `sfd-fast report RUN_A RUN_B ... [--out FILE]`."""
    p = argparse.ArgumentParser(prog="sfd-fast report", description=(
        "write a self-contained HTML report of a run; given several runs, one page comparing them "
        "(curves overlaid, eval tables and configs side by side, config differences highlighted)"))
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories (config.json, stats.jsonl, samples/, eval.json)")
    p.add_argument("--out", help="output file (default: RUN_DIR/report.html for one run, compare.html for several)")
    args = p.parse_args(argv)
    try:
        if len(args.run_dirs) == 1:
            out = write_report(Path(args.run_dirs[0]), args.out)
        else:
            out = write_comparison(args.run_dirs, Path(args.out or "compare.html"))
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    if _pyplot() is None:
        print(f"warning: {MISSING_MATPLOTLIB}")
    print(out)
