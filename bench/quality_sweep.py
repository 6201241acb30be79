"""Quality-against-time sweep on the digits config: every setting gets the same SFD wall time.

    python bench/quality_sweep.py --time-limit-s 60 --eval-every 250 --seeds 0
    python bench/quality_sweep.py --only default gen_lr_x2 --time-limit-s 20   # a subset
    python bench/quality_sweep.py --settings my_settings.json                  # {"name": ["k=v", ...], ...}

Each setting is a list of config overrides in the `--set key=value` form of `sfd-fast train` (value
parsed as JSON, else a string). Each (setting, seed) runs `sfd_fast/train.py --config CONFIG` in its own
process with train.time_limit_s, eval.every and run.seed set for all alike (train.total_steps large
enough that the time limit ends the run), then its eval.json is read: the final fd ratio
(fd_final / fd_teacher on eval.samples_per_class samples), UA, retained accuracy, time_to_target
(from the evaluations during training, sfd_fast/quality.py) and the steps reached.

Writes the results as JSON (--out) and a markdown table between `<!-- quality-sweep -->` and
`<!-- /quality-sweep -->` in docs/quality.md (--doc; appended when the markers are absent), with the
command, machine (CPU model from /proc/cpuinfo), commit (and whether the tree was clean) and date.
Runs are timed by the run itself (SFD seconds), not by this script: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- quality-sweep -->", "<!-- /quality-sweep -->"

# the knobs the literature says matter, around configs/digits_forget0.json (generator lr 1e-4, fake-score
# lr 3e-4, alpha 1.2, t_init 440 in [0, num_timesteps), EMA half-life 50 kimg, batch 128, betas (0, 0.999))
DEFAULT_SETTINGS: dict[str, list[str]] = {
    "default": [],
    "gen_lr_x2": ["optim.generator.lr=2e-4"],
    "gen_lr_x3": ["optim.generator.lr=3e-4"],
    "fake_lr_x0.5": ["optim.fake_score.lr=1.5e-4"],
    "fake_lr_x2": ["optim.fake_score.lr=6e-4"],
    "alpha_1.0": ["sfd.alpha=1.0"],
    "alpha_1.5": ["sfd.alpha=1.5"],
    "t_init_300": ["sfd.t_init=300"],
    "t_init_600": ["sfd.t_init=600"],
    "ema_hl_10": ["train.ema.halflife_kimg=10"],
    "ema_hl_25": ["train.ema.halflife_kimg=25"],
    "ema_none": ["train.ema.halflife_kimg=0"],
    "batch_64": ["train.batch_size=64"],
    "batch_256": ["train.batch_size=256"],
    "betas_0.5": ["optim.generator.betas=[0.5,0.999]", "optim.fake_score.betas=[0.5,0.999]"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "digits_forget0.json"))
    p.add_argument("--time-limit-s", type=float, default=60.0, help="train.time_limit_s of every run")
    p.add_argument("--eval-every", type=int, default=250, help="eval.every of every run (time_to_target's resolution)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--total-steps", type=int, default=1_000_000, help="large: the time limit ends each run")
    p.add_argument("--settings", help='JSON file {"name": ["key=value", ...]} replacing the default list')
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these settings (by name)")
    p.add_argument("--set", dest="common", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides added to every setting (before its own)")
    p.add_argument("--root", default=str(ROOT / "runs"), help="run.root (the cached teacher lives in ROOT/cache)")
    p.add_argument("--runs-dir", help="where the runs go (default <--root>/quality_sweep/<UTC time>)")
    p.add_argument("--out", help="results JSON (default bench/results/<date>_quality-sweep.json)")
    p.add_argument("--doc", default=str(ROOT / "docs" / "quality.md"), help="markdown file to update ('' = none)")
    return p.parse_args(argv)


def load_settings(args) -> dict[str, list[str]]:
    settings = DEFAULT_SETTINGS
    if args.settings:
        settings = json.loads(Path(args.settings).read_text(encoding="utf-8"))
        if not isinstance(settings, dict) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                                                     for v in settings.values()):
            raise SystemExit(f"error: {args.settings} must hold a JSON object {{name: [\"key=value\", ...]}}")
    if args.only:
        unknown = [n for n in args.only if n not in settings]
        if unknown:
            raise SystemExit(f"error: unknown setting(s) {', '.join(unknown)}; known: {', '.join(settings)}")
        settings = {n: settings[n] for n in args.only}
    return dict(settings)


def run_overrides(args, overrides: list[str], seed: int) -> list[str]:
    """The `--set` list of one run: the sweep's common keys, then the setting's own."""
    return [f"train.time_limit_s={args.time_limit_s}", f"eval.every={args.eval_every}", "eval.enabled=true",
            f"run.seed={seed}", f"train.total_steps={args.total_steps}", "train.progress=false",
            f"run.root={args.root}", *args.common, *overrides]


def check_settings(args, settings: dict) -> None:
    """Every setting's config must load (keys, types, values) before the first run starts."""
    sys.path.insert(0, str(ROOT))
    from sfd_fast.config import load_config
    from sfd_fast.errors import UserError
    for name, overrides in settings.items():
        try:
            load_config(args.config, run_overrides(args, overrides, args.seeds[0]))
        except UserError as e:
            raise SystemExit(f"error: setting {name!r}: {e}") from None


def summarize(name: str, seed: int, overrides: list[str], run_dir: Path, rc: int, wall_s: float) -> dict:
    """One results row from the run's eval.json (or its failure)."""
    row = {"setting": name, "seed": seed, "overrides": overrides, "run_dir": str(run_dir), "rc": rc,
           "wall_s": round(wall_s, 1)}
    path = run_dir / "eval.json"
    if rc != 0 or not path.is_file():
        return {**row, "error": f"exit status {rc}" + ("" if path.is_file() else ", no eval.json")}
    ev = json.loads(path.read_text())
    ttt = ev.get("time_to_target") or {}
    return {**row, "steps": ev.get("step"), "sfd_seconds": ev.get("sfd_seconds"), "fd_final": ev.get("fd_final"),
            "fd_teacher": ev.get("fd_teacher"), "fd_ratio": ev.get("fd_ratio"), "ua_per_class": ev.get("ua_per_class"),
            "retained": ev.get("retained_accuracy"), "final_meets_targets": ev.get("final_meets_targets"),
            "time_to_target_s": ttt.get("sfd_seconds"), "time_to_target_step": ttt.get("step"),
            "held_at_end": ttt.get("held_at_end"), "targets": ttt.get("targets"), "ttt_reason": ttt.get("reason")}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


def tree_state(ignore: tuple = ()) -> dict:
    """{"commit", "clean", "changes"}: uncommitted changes (untracked files included) other than the
    results files a sweep writes (bench/results/, and `ignore`: the table's document)."""
    def git(*a):
        out = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return out.stdout if out.returncode == 0 else None
    commit = (git("rev-parse", "HEAD") or "").strip() or None
    skip = {os.path.realpath(p) for p in ignore}
    changes = [line for line in (git("status", "--porcelain") or "").splitlines()
               if not line[3:].startswith("bench/results/") and os.path.realpath(ROOT / line[3:].strip('"')) not in skip]
    return {"commit": commit, "clean": commit is not None and not changes, "changes": changes[:20]}


def _num(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def render_table(results: dict) -> str:
    """The markdown block written between the markers: provenance lines, then one row per run."""
    m = results["meta"]
    tree = m["tree"]
    lines = [f"Command: `{m['command']}`  ",
             f"Machine: {m['cpu']} ({m['cpus']} CPUs); commit {tree['commit'] or 'unknown'}"
             f"{'' if tree['clean'] else ' (UNCOMMITTED changes in the tree)'}; date {m['date_utc']}  ",
             f"Every run: train.time_limit_s={m['time_limit_s']:g} s of SFD, eval.every={m['eval_every']}, "
             f"config {m['config']}; targets {json.dumps(m.get('targets'))}.", "",
             "| setting | overrides | seed | steps | SFD s | fd / teacher | UA | retained | meets targets at end "
             "| time to target (s) | held at end |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        over = " ".join(f"`{o}`" for o in r["overrides"]) or "(config as is)"
        if "error" in r:
            lines.append(f"| {r['setting']} | {over} | {r['seed']} | failed: {r['error']} | | | | | | | |")
            continue
        ua = ", ".join(f"{c}: {v:.3f}" for c, v in (r.get("ua_per_class") or {}).items()) or "-"
        ttt = _num(r.get("time_to_target_s"), "{:.1f}") + (f" (step {r['time_to_target_step']})"
                                                           if r.get("time_to_target_step") is not None else "")
        held = "-" if r.get("held_at_end") is None else ("yes" if r["held_at_end"] else "no")
        meets = "-" if r.get("final_meets_targets") is None else ("yes" if r["final_meets_targets"] else "no")
        lines.append(f"| {r['setting']} | {over} | {r['seed']} | {r.get('steps', '-')} | "
                     f"{_num(r.get('sfd_seconds'), '{:.1f}')} | {_num(r.get('fd_ratio'))} | {ua} | "
                     f"{_num(r.get('retained'))} | {meets} | {ttt} | {held} |")
    return "\n".join(lines)


def write_table(doc: Path, block: str) -> None:
    """Replace what lies between the markers in `doc` (append markers and block when absent); the
    rest of the file is kept byte for byte; written atomically."""
    doc = Path(doc)
    text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    start, end = text.find(BEGIN), text.find(END)
    if start != -1 and end > start:
        new = text[:start + len(BEGIN)] + "\n" + block + "\n" + text[end:]
    elif start == -1 and end == -1:
        new = text + ("" if text.endswith("\n") or not text else "\n") + f"{BEGIN}\n{block}\n{END}\n"
    else:
        raise SystemExit(f"error: {doc} has only one of the markers {BEGIN} / {END} (or in the wrong order); fix it")
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, doc)


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = load_settings(args)
    check_settings(args, settings)
    now = datetime.datetime.now(datetime.timezone.utc)
    runs_dir = Path(args.runs_dir or Path(args.root) / "quality_sweep" / now.strftime("%Y%m%d-%H%M%S"))
    out = Path(args.out or ROOT / "bench" / "results" / f"{now:%Y-%m-%d}_quality-sweep.json")
    sys.path.insert(0, str(ROOT))
    from sfd_fast.config import load_config
    targets = load_config(args.config, run_overrides(args, [], args.seeds[0])).eval.targets
    tree = tree_state(ignore=(args.doc,) if args.doc else ())
    results = {"commit_info": {"id": tree["commit"], "dirty": not tree["clean"]},   # as pytest-benchmark's files
               "meta": {"command": shlex.join([os.path.relpath(sys.argv[0], ROOT) if argv is None else
                                               "bench/quality_sweep.py", *(sys.argv[1:] if argv is None else argv)]),
                        "cpu": cpu_model(), "cpus": os.cpu_count(), "tree": tree,
                        "date_utc": now.strftime("%Y-%m-%d %H:%M UTC"), "time_limit_s": args.time_limit_s,
                        "eval_every": args.eval_every, "config": os.path.relpath(args.config, ROOT),
                        "targets": targets.__dict__},
               "runs": []}
    for name, overrides in settings.items():
        for seed in args.seeds:
            run_dir = runs_dir / f"{name}-seed{seed}"
            cmd = [sys.executable, str(ROOT / "sfd_fast" / "train.py"), "--config", args.config,
                   "--run-dir", str(run_dir), "--set", *run_overrides(args, overrides, seed)]
            print(f"[quality_sweep] {name} seed {seed}: {shlex.join(cmd)}", flush=True)
            t0 = time.time()
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            with open(run_dir.parent / f"{run_dir.name}.out", "w") as log:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
            row = summarize(name, seed, overrides, run_dir, rc, time.time() - t0)
            print(f"[quality_sweep] {json.dumps({k: v for k, v in row.items() if k != 'overrides'})}", flush=True)
            results["runs"].append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1) + "\n")   # after every run: a crash keeps the rest
    if args.doc:
        write_table(Path(args.doc), render_table(results))
        print(f"[quality_sweep] table written to {args.doc}")
    print(f"[quality_sweep] results: {out}")
    return results


if __name__ == "__main__":
    main()
