"""Stage records and the JSON summary of bench/gpu_check.sh (docs/gpu_check.md).

    python bench/gpu_summary.py probe OUT [--rehearse]     # exit 0 with CUDA (or rehearsing), 3 without
    python bench/gpu_summary.py env OUT [--no-peak]        # versions, importability, bf16 peak -> OUT/stages.json
    python bench/gpu_summary.py record OUT STAGE --rc RC --seconds S --limit L [--data FILE] [--log-tail FILE]
    python bench/gpu_summary.py finish OUT [--skip-all REASON]
    python bench/gpu_summary.py imports                    # exit 1 unless every module a stage needs imports

Honesty rules (issue 19): a stage is `ok` only when it exited 0 AND its data file holds the numbers
its kind needs (STAGE_KINDS: step rows with a step time, both ddpm providers, kernel medians, a
memory peak after at least one step, at least one passed GPU test and none failed). A selection
that matches no case is `missing`, a data file that is absent, empty or without those numbers is
`missing`, a stage stopped at its limit is `timeout`: none of them counts as measured. The run is
`ok` only when every stage is ok, `partial` when the headline stages (HEADLINE) are ok and another
is not, `failed` otherwise.

OUT/stages.json keeps the raw record of every finished stage (pytest-benchmark JSON, JUnit counts,
the memory stage's JSON) and OUT/summary.json is rewritten after EVERY stage, so a run cut short
still leaves the numbers of the stages before. The summary holds: the device, versions and the bf16
matmul peak measured in this run; per stage its status, time and limit; the SD1.5 step table
(samples/s, step time, MFU, peak memory) and the speed ratios fast/baseline of this run; the kernel
rates; the GPU tier's counts; the 24 GB configuration's measured peak.

MFU (/work/shared/design/PERFORMANCE.md): the useful work of one step (FLOPs counted with
FlopCounterMode on the eager fast step in this run; the PERFORMANCE.md table, 18F per SFD sample,
when no count exists) / (median step time x the bf16 matmul peak measured on this device in this
run). The baseline is charged the same useful work, not its redundant text-encoder passes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_stage_data import measured, parse_data, parse_junit, parse_test_lines  # noqa: E402,F401

# The stages in their order in gpu_check.sh (its budget table is the authority on limits): the
# headline numbers first (eager fast vs baseline, memory), the compiled variants last.
STAGES = ("eager_fast", "eager_baseline", "memory_24gb", "ddpm", "kernels", "gpu_tests", "compiled", "fused")
HEADLINE = ("eager_fast", "eager_baseline", "memory_24gb")
# What each stage's data file must hold to count as measured.
STAGE_KINDS = {"eager_fast": "step", "eager_baseline": "step", "memory_24gb": "memory", "ddpm": "pair",
               "kernels": "bench", "gpu_tests": "tests", "compiled": "step", "fused": "step"}
OPTIONAL_MODULES = ("sfd_fast.kernels", "triton", "diffusers", "deepspeed", "bitsandbytes", "pydantic",
                    "hjson", "pytest_benchmark", "cpuinfo", "transformers", "pynvml", "xformers")
# Every module some stage imports (also lazily, inside the product): `imports` checks them in the
# replica (bench/device_replica.sh), so the image list + the wheelhouse are proven enough.
STAGE_MODULES = ("torch", "triton", "numpy", "scipy", "tqdm", "PIL", "safetensors", "transformers",
                 "diffusers", "deepspeed", "bitsandbytes", "pytest", "pytest_benchmark", "cpuinfo", "pynvml",
                 "sfd_fast.trainer", "sfd_fast.sd.build", "sfd_fast.ddpm.build", "sfd_fast.engine.deepspeed",
                 "sfd_fast.engine.telemetry", "sfd_fast.kernels.sfd_loss")
TIMEOUT_CODES = (124, 137)   # GNU timeout: TERM -> 124, KILL (-k) -> 137
NO_TESTS_CODE = 5            # pytest: no test was selected
GIB = 2 ** 30


def _write_json(path: Path, data) -> None:
    """Temp + rename: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _read_json(path: Path, default):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def check_imports() -> int:
    """Import every STAGE_MODULES entry; print the failures; 0 when all import."""
    import importlib

    bad = {}
    for name in STAGE_MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # ImportError, or a wheel built for another torch / Python
            bad[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
    for name, why in bad.items():
        print(f"imports: {name} does not import: {why}", file=sys.stderr)
    print(f"imports: {len(STAGE_MODULES) - len(bad)}/{len(STAGE_MODULES)} stage modules import")
    return 1 if bad else 0


def checkout(root: Path | None = None) -> dict:
    """The commit the check runs on and whether tracked files differ from it (a result counts only
    from a clean tree). The device gets a copy of the working tree, possibly without .git: then the
    caller's GPU_CHECK_COMMIT (and GPU_CHECK_TREE_CLEAN=1/0) say it, else both are unknown (null)."""
    import subprocess

    root = root or Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout if r.returncode == 0 else None
    head = git("rev-parse", "HEAD")
    if head:
        changed = (git("status", "--porcelain", "--untracked-files=no") or "").splitlines()
        return {"commit": head.strip(), "tree_clean": not changed, "changed": [c[3:] for c in changed][:20],
                "source": "git"}
    flag = os.environ.get("GPU_CHECK_TREE_CLEAN")
    return {"commit": os.environ.get("GPU_CHECK_COMMIT") or None,
            "tree_clean": None if flag is None else flag == "1", "changed": [], "source": "environment"}


def probe() -> dict:
    """torch only: versions, the checkout, and the device when CUDA is usable."""
    info = {"python": sys.version.split()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "checkout": checkout()}
    try:
        import torch
    except Exception as err:
        return dict(info, torch=None, cuda_available=False, error=f"torch does not import: {err}")
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if info["cuda_available"]:
        info.update(device=torch.cuda.get_device_name(), device_capability=list(torch.cuda.get_device_capability()),
                    device_memory_bytes=torch.cuda.get_device_properties(0).total_memory)
    else:
        info["device"] = None
    return info


def environment(measure_peak: bool = True) -> dict:
    """probe() plus the version (or the import error) of each optional module and the measured
    bf16 matmul peak."""
    import importlib

    info = probe()
    versions, unavailable = {}, {}
    for name in OPTIONAL_MODULES:
        try:
            mod = importlib.import_module(name)
            versions[name] = getattr(mod, "__version__", getattr(mod, "CPUINFO_VERSION_STRING", "present"))
        except Exception as err:  # ImportError, or a wheel built for another torch
            first = str(err).splitlines()[0] if str(err) else ""
            unavailable[name] = f"{type(err).__name__}: {first}"[:300]
    info.update(versions=versions, unavailable=unavailable)
    if measure_peak and info.get("cuda_available"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import measure
        info["peak_bf16_tflops"] = measure.peak_bf16_matmul_flops() / 1e12
    return info


def stage_status(rc: int, data: dict | None, kind: str = "bench") -> tuple[str, str | None]:
    """(status, reason): ok / timeout / missing (nothing selected, or no numbers) / failed."""
    if rc in TIMEOUT_CODES:
        return "timeout", None
    if rc == NO_TESTS_CODE:
        return "missing", "its selection matched no case (pytest exit code 5)"
    lack = measured(kind, data)
    j = (data or {}).get("junit") or {}
    if rc != 0 or j.get("failed") or j.get("errors"):   # a failed test is a failure whatever the exit code
        return "failed", f"exit code {rc}" + (f"; {lack}" if lack else "")
    if lack:
        return "missing", f"exited 0 but {lack}"
    return "ok", None


def record(out: Path, stage: str, rc: int, seconds: float, limit: float, data_file=None, log_tail=None,
           reason: str | None = None) -> dict:
    """Add one stage's record to OUT/stages.json and rewrite OUT/summary.json."""
    stages_file = out / "stages.json"
    raw = _read_json(stages_file, {})
    data = parse_data(data_file) if data_file else None
    if rc is None:   # never started (no time left): recorded with the caller's reason
        status, why = "skipped", None
    else:
        status, why = stage_status(rc, data, STAGE_KINDS.get(stage, "bench"))
    rec = {"status": status, "rc": rc, "seconds": round(seconds, 1), "limit_s": limit, "data": data}
    if reason:
        rec["reason"] = reason
    elif status == "timeout":
        rec["reason"] = f"stopped at its time limit ({limit:g} s): numbers of this stage are lost, the others kept"
    elif why:
        rec["reason"] = why
    if log_tail and Path(log_tail).is_file() and status not in ("ok", "skipped"):
        rec["log_tail"] = Path(log_tail).read_text(errors="replace").splitlines()[-15:]
    raw.setdefault("stages", {})[stage] = rec
    _write_json(stages_file, raw)
    return write_summary(out, final=False)


def _step_rows(stages: dict) -> list[dict]:
    rows = []
    for name in ("eager_fast", "eager_baseline", "compiled", "fused", "ddpm"):
        for r in ((stages.get(name) or {}).get("data") or {}).get("benchmarks", []) or []:
            if r.get("config"):
                rows.append(dict(r, stage=name))
    return rows


def step_table(stages: dict, env: dict) -> tuple[list[dict], dict]:
    """The SD step rows (samples/s, MFU, peak memory) and the speed ratios of this run."""
    rows = _step_rows(stages)
    work = {}   # config -> (flops per step, source): the counted work, else the table
    for r in rows:
        if r.get("flops_per_step") and "FlopCounterMode" in str(r.get("flops_source", "")):
            work.setdefault(r["config"], (r["flops_per_step"], r["flops_source"]))
    for r in rows:
        if r.get("flops_per_step"):
            work.setdefault(r["config"], (r["flops_per_step"], r.get("flops_source")))
    table = []
    for r in rows:
        step_s = r.get("step_s") or r.get("median_s")
        samples = r.get("sfd_samples_per_step") or (2 * r["batch"] if r.get("batch") else None)
        peak = r.get("peak_bf16_tflops") or env.get("peak_bf16_tflops")
        flops, source = work.get(r["config"], (None, None))
        row = {"stage": r["stage"], "name": r.get("name"), "config": r["config"], "provider": r.get("provider"),
               "compile": r.get("compile"), "batch": r.get("batch"), "micro_batch": r.get("micro_batch"),
               "step_s": step_s, "samples_per_s": samples / step_s if samples and step_s else None,
               "peak_mem_gib": r["peak_mem_bytes"] / GIB if r.get("peak_mem_bytes") else None,
               "peak_reserved_gib": r["peak_reserved_bytes"] / GIB if r.get("peak_reserved_bytes") else None,
               "flops_per_step": flops, "flops_source": source, "peak_bf16_tflops": peak}
        row["mfu"] = flops / step_s / (peak * 1e12) if flops and step_s and peak else None
        table.append(row)
    ratios = {}
    base = {r["config"]: r for r in table if r["provider"] == "baseline" and r["samples_per_s"]}
    for r in table:
        if r["provider"] != "baseline" and r["samples_per_s"] and r["config"] in base:
            ratios[f"{r['config']}/{r['stage']}_vs_baseline"] = r["samples_per_s"] / base[r["config"]]["samples_per_s"]
    return table, ratios


def _kernel_rows(stage: dict) -> list[dict]:
    keys = ("name", "provider", "mode", "shape", "dtype", "median_s", "gbps", "bandwidth_fraction")
    return [{k: r.get(k) for k in keys} for r in ((stage or {}).get("data") or {}).get("benchmarks", []) or []]


def _memory(stage: dict) -> dict | None:
    data = ((stage or {}).get("data") or {}).get("json")
    if not isinstance(data, dict):
        return None
    peak = data.get("peak_allocated_bytes")
    return dict(data, peak_allocated_gib=peak / GIB if peak else None,
                target_gib=22, within_target=(peak / GIB <= 22) if peak else None)


def overall_status(stages: dict, final: bool, skip_reason: str | None = None) -> str:
    """ok only when every stage is ok; partial when the headline stages are; else failed."""
    if skip_reason:
        return "skipped"
    if not final:
        return "running"
    ok = {s for s in STAGES if (stages.get(s) or {}).get("status") == "ok"}
    if ok == set(STAGES):
        return "ok"
    return "partial" if set(HEADLINE) <= ok else "failed"


def write_summary(out: Path, final: bool = True, skip_reason: str | None = None) -> dict:
    """OUT/summary.json from OUT/stages.json. final=False while stages are still to run."""
    raw = _read_json(out / "stages.json", {})
    env, stages = raw.get("environment", {}), raw.get("stages", {})
    if skip_reason:
        stages = {s: {"status": "skipped", "reason": skip_reason} for s in STAGES}
    table, ratios = step_table(stages, env)
    status = overall_status(stages, final, skip_reason)
    summary = {
        "status": status, "reason": skip_reason, "mode": "rehearsal" if env.get("rehearsal") else "device",
        "headline": list(HEADLINE), "device": env.get("device"), "torch": env.get("torch"),
        "cuda": env.get("cuda"), "python": env.get("python"), "checkout": env.get("checkout"), "peak_bf16_tflops": env.get("peak_bf16_tflops"),
        "versions": env.get("versions", {}), "unavailable_modules": env.get("unavailable", {}),
        "stages": {s: {k: v for k, v in stages.get(s, {"status": "not run"}).items() if k != "data"}
                   for s in STAGES},
        "step": table, "ratios": ratios, "kernels": _kernel_rows(stages.get("kernels")),
        "gpu_tests": ((stages.get("gpu_tests") or {}).get("data") or {}).get("junit"),
        "memory_24gb": _memory(stages.get("memory_24gb")),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_json(out / "summary.json", summary)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probe")
    pr.add_argument("out")
    pr.add_argument("--rehearse", action="store_true", help="no CUDA needed (gpu_check.sh --rehearse)")
    sub.add_parser("imports")
    e = sub.add_parser("env")
    e.add_argument("out")
    e.add_argument("--no-peak", action="store_true")
    r = sub.add_parser("record")
    r.add_argument("out")
    r.add_argument("stage", choices=STAGES)
    r.add_argument("--rc", type=int, default=None)
    r.add_argument("--seconds", type=float, default=0.0)
    r.add_argument("--limit", type=float, default=0.0)
    r.add_argument("--data", default=None)
    r.add_argument("--log-tail", default=None)
    r.add_argument("--reason", default=None)
    f = sub.add_parser("finish")
    f.add_argument("out")
    f.add_argument("--skip-all", default=None, metavar="REASON")
    a = p.parse_args(argv)
    if a.cmd == "imports":
        return check_imports()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.cmd in ("probe", "env"):
        raw = _read_json(out / "stages.json", {})
        rehearse = bool(getattr(a, "rehearse", False) or raw.get("environment", {}).get("rehearsal"))
        raw["environment"] = probe() if a.cmd == "probe" else environment(not a.no_peak)
        raw["environment"]["rehearsal"] = rehearse
        _write_json(out / "stages.json", raw)
        write_summary(out, final=False)
        return 0 if raw["environment"].get("cuda_available") or rehearse else 3
    if a.cmd == "record":
        record(out, a.stage, a.rc, a.seconds, a.limit, a.data, a.log_tail, a.reason)
        return 0
    s = write_summary(out, final=True, skip_reason=a.skip_all)
    bad = {k: f"{v['status']}: {v.get('reason', '')}" for k, v in s["stages"].items() if v["status"] != "ok"}
    for k, v in bad.items():
        print(f"gpu_check summary: {k} {v}")
    print(f"gpu_check summary ({s['mode']}): status={s['status']} device={s['device']} ratios={s['ratios']} -> {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
