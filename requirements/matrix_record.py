"""Write requirements/matrix/<env>.json from one matrix venv (requirements/matrix.sh calls this with the
venv's own python, so `python` below is that environment's interpreter).

    python requirements/matrix_record.py ENV VENV_DIR COMMIT EXIT_CODE
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
        "torchmetrics", "pytest", "pytest-benchmark"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(env: str, venv: Path, commit: str, rc: int) -> dict:
    pins = {}
    for line in (venv / "freeze.txt").read_text().splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    junit = venv / "junit.xml"
    if junit.exists():
        for s in ET.parse(junit).getroot().iter("testsuite"):
            t, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
            counts["failed"] += f
            counts["errors"] += e
            counts["skipped"] += k
            counts["passed"] += t - f - e - k
    status = "passed" if rc == 0 and counts["passed"] > 0 else ("install failed" if not junit.exists() else "failed")
    rec = {"environment": env, "date": datetime.date.today().isoformat(), "commit": commit,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
           "versions": {k: pins[k] for k in KEYS if k in pins}, **counts, "exit_code": rc, "status": status}
    out = Path(__file__).resolve().parent / "matrix" / f"{env}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rec, indent=1) + "\n")
    return rec


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))))
