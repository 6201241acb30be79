"""Two report sections about how a run ran, rather than what it learned.

  plan         the acceleration plan: RUN_DIR/acceleration_plan.json when the run wrote one (precision,
               attention, checkpointing, loss kernel, compile, micro-batch, backend), else the
               config's engine section, labelled as such
  environment  RUN_DIR/environment.json (sfd_fast/environment.py): torch, CUDA, device, world size,
               host, commit of the latest start, and how many starts (first run + resumes) there were
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from ..environment import read_environment

ENV_ROWS = (("torch", "torch"), ("CUDA", "cuda"), ("cuDNN", "cudnn"), ("device", "device"),
            ("device name", "device_name"), ("world size", "world_size"), ("Python", "python"),
            ("platform", "platform"), ("host", "host"), ("sfd-fast commit", "commit"))


def _table(rows, header=("key", "value")) -> str:
    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table><tr><th>{header[0]}</th><th>{header[1]}</th></tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return "-" if v is None else str(v)


def plan_section(run_dir: Path, config: dict) -> str:
    plan = read_plan(run_dir, config)
    source = plan.pop("source")
    note = ("from acceleration_plan.json, written by the run" if source == "acceleration_plan.json"
            else "this run wrote no acceleration_plan.json: the config's engine section as requested")
    return f"<p>{html.escape(note)}</p>" + _table(sorted(plan.items()), ("setting", "value"))


def environment_section(run_dir: Path) -> str:
    starts = read_environment(run_dir)
    if not starts:
        return "<p>no environment.json (written by runs since issue #23; this run predates it).</p>"
    last = starts[-1]
    steps = ", ".join(str(s.get("step", "?")) for s in starts)
    head = (f"<p>{len(starts)} start(s) of this run, at step(s) {html.escape(steps)}; the latest "
            f"start's environment:</p>")
    return head + _table([(label, last.get(key)) for label, key in ENV_ROWS], ("", "latest start"))


def read_plan(run_dir: Path, config: dict) -> dict:
    """RUN_DIR/acceleration_plan.json when the run wrote one, else the config's engine section."""
    from ..engine.plan import PLAN_FILE
    path = Path(run_dir) / PLAN_FILE
    if path.is_file():
        try:
            return {"source": PLAN_FILE, **json.loads(path.read_text())}
        except (json.JSONDecodeError, TypeError):
            pass
    return {"source": "config engine section", **config.get("engine", {})}
