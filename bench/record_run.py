"""Record a finished training run whose figures a document quotes: its eval.json, config.json and
provenance (command, commit, machine, date, wall time) under docs/results/<date>_<machine>_<name>/.

    python bench/record_run.py RUN_DIR --name digits_forget0 --tree /path/to/the/checkout/that/ran \\
        --command "python sfd_fast/train.py --config configs/digits_forget0.json" --wall-s 812

`--tree` is the checkout whose code the run used (default: this one). A tree with uncommitted
changes is refused (the figures would not come from committed code). tests/test_results_provenance.py
checks that the README's numbers match the files it cites.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ROOT, tree_state  # noqa: E402


def machine() -> dict:
    model = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "python": platform.python_version()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--name", required=True)
    p.add_argument("--tree", default=ROOT, help="the checkout the run's code came from")
    p.add_argument("--command", required=True)
    p.add_argument("--wall-s", type=float, required=True, help="wall time of the command, seconds")
    p.add_argument("--load", default="", help="load average before/after, as measured")
    p.add_argument("--machine-tag", default="cpu", help="short machine name for the folder")
    p.add_argument("--out-root", default=str(Path(ROOT) / "docs" / "results"))
    a = p.parse_args(argv)
    run = Path(a.run_dir)
    state = tree_state(a.tree)
    if state["dirty"]:
        raise SystemExit(f"error: {a.tree} has uncommitted changes ({', '.join(state['changes'][:5])}); "
                         "figures must come from committed code: commit, re-run, then record")
    import torch
    config = json.loads((run / "config.json").read_text())
    date = datetime.datetime.fromtimestamp((run / "eval.json").stat().st_mtime, datetime.timezone.utc)
    out = Path(a.out_root) / f"{date:%Y-%m-%d}_{a.machine_tag}_{a.name}"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "eval.json", out / "eval.json")
    shutil.copy(run / "config.json", out / "config.json")
    provenance = {"command": a.command, "commit": state["commit"], "dirty": False,
                  "finished_utc": date.isoformat(timespec="seconds"), "wall_s": a.wall_s, "load": a.load,
                  "machine": machine(), "torch": torch.__version__,
                  "seed": config.get("run", {}).get("seed")}
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    print(out)
    return out


if __name__ == "__main__":
    main()
