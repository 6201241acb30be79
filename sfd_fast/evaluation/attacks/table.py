"""attacks.json as rows: a text table for the log and the docs, an HTML table for the report."""
from __future__ import annotations

import html
import json
from pathlib import Path


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def rows(result: dict) -> list[list[str]]:
    """[target, attack, success / steps, headline reference, its value, gap (points) +- se, others]."""
    out = []
    for target, per in result.get("per_class", result.get("per_concept", {})).items():
        for attack, r in per.items():
            if "steps" in r:   # relearning: steps until UA < threshold (None: not within the budget)
                refs = ", ".join(f"{k} {v}" for k, v in r.get("references", {}).items())
                fewer = r.get("fewer_steps_than_reference")
                out.append([target, attack, f"{r['steps']} steps", r.get("reference", "-"),
                            f"{r.get('reference_steps')} steps", "-" if fewer is None else f"{fewer} fewer", refs])
            else:
                refs = ", ".join(f"{k} {_pct(v)}" for k, v in r.get("references", {}).items())
                gap = "-" if "gap" not in r else f"{100 * r['gap']:+.1f} +- {100 * r['gap_se']:.1f}"
                out.append([target, attack, _pct(r.get("rate")), r.get("reference", "-"),
                            _pct(r.get("reference_rate")), gap, refs])
    return out


HEADER = ["target", "attack", "success %", "reference", "reference %", "gap (points)", "all references"]


def text_table(result: dict) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows(result)]
    return "\n".join(lines)


def html_section(run_dir: Path) -> str:
    """The report's robustness section: attacks.json as a table (or why there is none)."""
    path = Path(run_dir) / "attacks.json"
    if not path.is_file():
        return "<p>no attacks.json (eval.attacks.enabled was off; run <code>sfd-fast attack RUN_DIR</code>).</p>"
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return f"<p>attacks.json is not valid JSON: {html.escape(str(e))}</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows(result))
    return (f"<p>Success: the judge sees the forgotten class (relearning: fine-tuning steps until UA &lt; threshold). "
            f"Gap = attack - reference that never knew it (docs/robustness.md).</p>"
            f"<table><tr>{head}</tr>{body}</table>")
