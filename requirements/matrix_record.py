"""Write requirements/matrix/<env>.json from one matrix venv (requirements/matrix.sh calls this with the
venv's own python, so `python` below is that environment's interpreter).

    python requirements/matrix_record.py ENV VENV_DIR COMMIT EXIT_CODE [RERUN_COMMIT]
    python requirements/matrix_record.py --failed JUNIT_XML      # node ids of failed / errored tests

A test that failed is run once more on its own (matrix.sh: VENV_DIR/rerun.xml). The record keeps the
first run's counts and lists each re-run test with its outcome; the environment counts as passed only
when every failure passed on its re-run (e.g. a subprocess time limit hit on a loaded machine), and the
table says how many were re-run. RERUN_COMMIT: the commit the re-runs ran at, when a fix landed
between the tier run and the re-runs (the record and the table then name both commits).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

KEYS = ["torch", "transformers", "diffusers", "huggingface-hub", "kernels", "safetensors", "numpy", "scipy",
        "scikit-learn", "tqdm", "pillow", "pyyaml", "matplotlib", "triton", "deepspeed", "bitsandbytes",
        "torchmetrics", "tensorboard", "wandb", "pytest", "pytest-benchmark"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _counts(junit: Path) -> dict:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for s in ET.parse(junit).getroot().iter("testsuite"):
        t, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
        counts["failed"] += f
        counts["errors"] += e
        counts["skipped"] += k
        counts["passed"] += t - f - e - k
    return counts


def failed_ids(junit: Path, root: Path = Path(".")) -> list[str]:
    """pytest node ids (tests/test_x.py::name[param]) of the failed and errored cases of a JUnit file."""
    ids = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is None and case.find("error") is None:
            continue
        parts = case.get("classname", "").split(".")
        for cut in range(len(parts), 0, -1):  # the longest dotted prefix that is a file is the module
            path = Path(*parts[:cut]).with_suffix(".py")
            if (root / path).is_file():
                ids.append("::".join([path.as_posix(), *parts[cut:], case.get("name")]))
                break
    return sorted(set(ids))


def main(env: str, venv: Path, commit: str, rc: int, rerun_commit: str | None = None) -> dict:
    pins = {}
    for line in (venv / "freeze.txt").read_text().splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    junit = venv / "junit.xml"
    counts = _counts(junit) if junit.exists() else {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    reruns = []
    if rc != 0 and junit.exists() and (venv / "rerun.xml").exists():
        again = {n for n in failed_ids(venv / "rerun.xml")}
        reruns = [{"test": t, "passed_on_rerun": t not in again} for t in failed_ids(junit)]
        rerun_counts = _counts(venv / "rerun.xml")
        if reruns and all(r["passed_on_rerun"] for r in reruns) and rerun_counts["passed"] == len(reruns):
            rc = 0
    status = "passed" if rc == 0 and counts["passed"] > 0 else ("install failed" if not junit.exists() else "failed")
    rec = {"environment": env, "date": datetime.date.today().isoformat(), "commit": commit,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
           "versions": {k: pins[k] for k in KEYS if k in pins}, **counts, "reruns": reruns, "exit_code": rc,
           "status": status}
    if reruns and rerun_commit and rerun_commit != commit:
        rec["rerun_commit"] = rerun_commit
    out = Path(__file__).resolve().parent / "matrix" / f"{env}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rec, indent=1) + "\n")
    return rec


if __name__ == "__main__":
    if sys.argv[1] == "--failed":
        print("\n".join(failed_ids(Path(sys.argv[2]))))
    else:
        print(json.dumps(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]),
                              sys.argv[5] if len(sys.argv) > 5 else None)))
