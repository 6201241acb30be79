"""`sfd-fast report RUN_DIR`: one self-contained HTML page about a run (also written at the end of
every run as RUN_DIR/report.html).

Sections (each an element with a fixed id, so tests and readers can find them):
  losses       per network (fake score, generator): remain, forget, and each forget target
  throughput   samples/s and peak memory per logging tick
  evaluation   the evaluation-during-training curves ("eval/..." records of stats.jsonl)
  quality      fd_ratio, UA and retained against SFD seconds, targets drawn, time_to_target (report_quality.py)
  samples      the sample grids over time: the first, up to three in between, the last, the final grid
  final-eval   eval.json as a table
  plan         the acceleration plan (acceleration_plan.json, else the config's engine section)
  environment  torch, CUDA, device, world size, commit (environment.json; report_context.py)
  robustness   attacks.json (sfd-fast attack) as a table: success, reference, gap
  config       the resolved config.json

`sfd-fast report RUN_A RUN_B ...` (several runs) writes the comparison page instead (compare.py).

Family-agnostic: it reads only the files every run writes (config.json, stats.jsonl, samples/*.png,
eval.json), from either backend. A run that was resumed logs some steps twice: the last record of a
step wins. A run stopped early simply has fewer records; a torn last line is skipped. Images are
embedded as base64 PNG and nothing is fetched: the page opens with no network access. The plots need
matplotlib (the `report` extra); without it the page says so in place of each plot.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from ..checkpoint import atomic_write_text
from ..trackers import flatten
from .report_context import environment_section, plan_section
from .report_quality import quality_section
from .attacks.table import html_section as attacks_html_section

NETWORKS = ("fake_score_loss", "generator_loss")
MISSING_MATPLOTLIB = ("matplotlib is not installed, so this report has no plots; install it with "
                      "`pip install matplotlib` and rerun `sfd-fast report`")


def read_stats(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training tick records, evaluation records) of stats.jsonl, one per step (the last logged
    wins, e.g. after a resume), sorted by step. Unreadable lines (a run killed mid-write) are skipped."""
    ticks: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    path = Path(run_dir) / "stats.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or "step" not in rec:
                continue
            is_eval = any(k.startswith("eval/") for k in rec)
            (evals if is_eval else ticks)[int(rec["step"])] = rec
    return [ticks[s] for s in sorted(ticks)], [evals[s] for s in sorted(evals)]


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display; figures are rendered to PNG bytes
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def _png_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _figure_tag(plt, fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return _png_tag(buf.getvalue(), alt)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(records: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in records if _finite(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot_panels(plt, records: list[dict], panels: list[tuple[str, list[str]]], alt: str,
                 ylabel_of=lambda title: title, logy: bool = False) -> str:
    """One row of subplots; panel = (title, keys to draw as lines against the step)."""
    panels = [(t, [k for k in keys if _series(records, k)[0]]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        return "<p>no records for this section yet.</p>"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            x, y = _series(records, k)
            ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, label=k.split("/", 1)[-1] or k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel_of(title))
        if logy and all(v > 0 for k in keys for v in _series(records, k)[1]):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _figure_tag(plt, fig, alt)


def _loss_section(plt, ticks: list[dict]) -> str:
    keys = sorted({k for r in ticks for k in r})
    panels = [(net, [k for k in keys if k.startswith(net + "/")]) for net in NETWORKS]
    return _plot_panels(plt, ticks, panels, "losses per network and target")


def _throughput_section(plt, ticks: list[dict]) -> str:
    for r in ticks:  # bytes -> MiB for a readable axis
        for k in ("peak_mem_bytes", "peak_mem_reserved_bytes"):
            if _finite(r.get(k)):
                r[k.replace("_bytes", "_mib")] = r[k] / 2**20
    panels = [("samples/s", ["samples_per_s"]), ("peak memory (MiB)", ["peak_mem_mib", "peak_mem_reserved_mib"])]
    return _plot_panels(plt, ticks, panels, "throughput and peak memory")


def _eval_section(plt, evals: list[dict]) -> str:
    keys = sorted({k for r in evals for k in r if k.startswith("eval/")})
    groups: dict[str, list[str]] = {}
    for k in keys:  # eval/ua/0, eval/ua/7 -> one panel "ua"
        groups.setdefault(k.split("/")[1], []).append(k)
    return _plot_panels(plt, evals, list(groups.items()), "evaluation during training")


def _sample_section(run_dir: Path) -> str:
    grids = sorted((run_dir / "samples").glob("step-*.png")) if (run_dir / "samples").is_dir() else []
    if len(grids) > 5:   # the first, three evenly spaced in between, the last
        idx = sorted({0, len(grids) - 1, *(round(i * (len(grids) - 1) / 4) for i in (1, 2, 3))})
        grids = [grids[i] for i in idx]
    if (run_dir / "samples_final.png").is_file():
        grids.append(run_dir / "samples_final.png")
    if not grids:
        return "<p>no sample grids in this run.</p>"
    cells = [f'<figure>{_png_tag(p.read_bytes(), p.name)}<figcaption>{html.escape(p.stem)}</figcaption></figure>'
             for p in grids]
    return '<div class="grids">' + "".join(cells) + "</div>"


def _final_eval_section(run_dir: Path) -> str:
    path = run_dir / "eval.json"
    if not path.is_file():
        return "<p>no eval.json (the run has no end-of-run evaluation, or it has not finished).</p>"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return f"<p>eval.json is not valid JSON: {html.escape(str(e))}</p>"
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, list) else str(v)
    shown = {k: v for k, v in data.items() if k != "curve"} if isinstance(data, dict) else data
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(fmt(v))}</td></tr>" for k, v in flatten(shown).items())
    note = "<p>eval.json's <code>curve</code> is plotted in the quality section.</p>" if shown is not data else ""
    return f"{note}<table><tr><th>metric</th><th>value</th></tr>{body}</table>"


STYLE = ("body{font-family:sans-serif;margin:1.5em;max-width:1400px} img{max-width:100%} "
         "table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:2px 8px;text-align:left} "
         "pre{background:#f5f5f5;padding:1em;overflow:auto} .grids{display:flex;flex-wrap:wrap;gap:1em} "
         "figure{margin:0} .warn{color:#a00}")


def render_report(run_dir: Path) -> str:
    """The report page of `run_dir` as an HTML string (see the module docstring)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    cfg_text = cfg_path.read_text() if cfg_path.is_file() else "{}"
    try:
        config = json.loads(cfg_text)
        name = config.get("run", {}).get("name", run_dir.name)
    except (json.JSONDecodeError, AttributeError):
        config, name = {}, run_dir.name
    ticks, evals = read_stats(run_dir)
    plt = _pyplot()
    if plt is None:
        warn = f'<p class="warn">{html.escape(MISSING_MATPLOTLIB)}</p>'
        losses = throughput = curves = warn
    else:
        losses, throughput, curves = _loss_section(plt, ticks), _throughput_section(plt, ticks), _eval_section(plt, evals)
    last = ticks[-1] if ticks else {}
    summary = (f"{len(ticks)} logging ticks, last step {last.get('step', '-')} "
               f"({last.get('kimg', 0):.3f} kimg); {len(evals)} evaluations during training")
    sections = [("losses", "Losses per network and target", losses),
                ("throughput", "Throughput and memory", throughput),
                ("evaluation", "Evaluation during training", curves),
                ("quality", "Quality against SFD time", quality_section(plt, run_dir, evals, config, _figure_tag)),
                ("samples", "Sample grids over time", _sample_section(run_dir)),
                ("final-eval", "Final evaluation (eval.json)", _final_eval_section(run_dir)),
                ("plan", "Acceleration plan", plan_section(run_dir, config)),
                ("environment", "Environment", environment_section(run_dir)),
                ("robustness", "Worst-case forgetting (attacks.json)", attacks_html_section(run_dir)),
                ("config", "Resolved config (config.json)", f"<pre>{html.escape(cfg_text)}</pre>")]
    body = "".join(f'<section id="{sid}"><h2>{title}</h2>{content}</section>' for sid, title, content in sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>sfd-fast report: {html.escape(name)}</title>"
            f"<style>{STYLE}</style></head><body><h1>sfd-fast run {html.escape(name)}</h1>"
            f"<p>{html.escape(str(run_dir))}: {html.escape(summary)}</p>{body}</body></html>")


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report (atomically) to `out` (default RUN_DIR/report.html); returns its path."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() and not (run_dir / "stats.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} holds neither config.json nor stats.jsonl; is it a sfd-fast run directory?")
    out = Path(out) if out else run_dir / "report.html"
    atomic_write_text(out, render_report(run_dir))
    return out
