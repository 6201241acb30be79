"""The data files of bench/gpu_check.sh's stages: parsing, and whether they hold the numbers a
stage must record to count as measured (bench/gpu_summary.py applies it; issue 19's honesty rules).

Kinds (gpu_summary.STAGE_KINDS): `step` (pytest-benchmark rows of bench_step.py with a step time and
a configuration), `pair` (both providers, fast and baseline, timed), `bench` (any timed row),
`memory` (bench/memory_gpu.py's JSON with a peak after at least one step), `tests` (the GPU tier's
JSON lines or JUnit XML: at least one test passed, none failed or errored).
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path


def _read_json(path: Path, default):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def parse_junit(path) -> dict:
    """Counts and the names of failed/errored tests from a JUnit XML file (pytest --junitxml)."""
    root = ET.parse(path).getroot()
    out = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": []}
    for case in root.iter("testcase"):
        out["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            out["failed" if case.find("failure") is not None else "errors"] += 1
            out["failures"].append(name)
        elif case.find("skipped") is not None:
            out["skipped"] += 1
            out["skip_reasons"].append(f"{name}: {case.find('skipped').get('message', '')}"[:300])
        else:
            out["passed"] += 1
    return out


def parse_test_lines(path) -> dict:
    """Counts from bench/gpu_tier_log.py's JSON lines; `running`: tests started and never ended
    (the stage was killed in them)."""
    ends, started = {}, []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue   # a line cut by a kill
        if rec.get("event") == "start":
            started.append(rec["nodeid"])
        elif rec.get("event") == "end":
            ends[rec["nodeid"]] = rec
    out = {"tests": len(ends), "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [],
           "skip_reasons": [], "running": [n for n in started if n not in ends],
           "seconds": {n: r.get("seconds") for n, r in ends.items()}}
    for name, rec in ends.items():
        kind = {"passed": "passed", "failed": "failed", "error": "errors", "skipped": "skipped"}.get(rec.get("outcome"), "errors")
        out[kind] += 1
        if kind in ("failed", "errors"):
            out["failures"].append(f"{name}: {rec.get('message', '')}"[:300])
        elif kind == "skipped":
            out["skip_reasons"].append(f"{name}: {rec.get('message', '')}"[:300])
    return out


def parse_data(path) -> dict | None:
    """A stage's result file: pytest-benchmark JSON (the rows), JUnit XML or JSON lines of the GPU
    tier (counts), or plain JSON."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    if path.suffix == ".xml":
        return {"junit": parse_junit(path)}
    if path.suffix == ".jsonl":
        return {"junit": parse_test_lines(path)}
    data = _read_json(path, None)
    if isinstance(data, dict) and "benchmarks" in data:
        rows = []
        for b in data["benchmarks"]:
            stats = b.get("stats") or {}
            rows.append(dict(b.get("extra_info") or {}, name=b.get("name"), median_s=stats.get("median"),
                             rounds=stats.get("rounds")))
        return {"benchmarks": rows}
    return {"json": data}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and x > 0


def measured(kind: str, data: dict | None) -> str | None:
    """None when `data` holds the numbers a stage of this kind must record, else what is missing."""
    if not data:
        return "its data file is missing or empty"
    rows = data.get("benchmarks")
    if kind in ("step", "pair", "bench"):
        if not rows:
            return "no benchmark row recorded (no case selected, or every case skipped)"
        timed = [r for r in rows if _number(r.get("median_s"))]
        if not timed:
            return "its benchmark rows hold no timing"
        if kind == "step" and not any(_number(r.get("step_s")) and r.get("config") for r in timed):
            return "no step row with a step time and a configuration"
        if kind == "pair" and {r.get("provider") for r in timed} < {"fast", "baseline"}:
            return "not both providers (fast and baseline) measured"
        return None
    if kind == "memory":
        d = data.get("json") or {}
        if not (isinstance(d, dict) and (d.get("steps") or 0) >= 1
                and (_number(d.get("peak_allocated_bytes")) or _number(d.get("peak_rss_bytes")))):
            return "no measured peak after at least one step"
        return None
    if kind == "tests":
        j = data.get("junit") or {}
        if j.get("failed") or j.get("errors"):
            return f"{j['failed']} failed, {j['errors']} errors"
        if not j.get("passed"):
            return "no test passed (none selected, or all skipped)"
        return None
    return f"unknown stage kind {kind!r}"
