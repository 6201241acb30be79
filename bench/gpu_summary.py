"""Stage records and the JSON summary of bench/gpu_check.sh (docs/gpu_check.md).

    python bench/gpu_summary.py probe OUT                  # exit 0 with CUDA, 3 without (torch only)
    python bench/gpu_summary.py env OUT                    # versions, importability, bf16 peak -> OUT/stages.json
    python bench/gpu_summary.py record OUT STAGE --rc RC --seconds S --limit L [--data FILE] [--log-tail FILE]
    python bench/gpu_summary.py finish OUT [--skip-all REASON]

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
import xml.etree.ElementTree as ET
from pathlib import Path

# The stages in their order in gpu_check.sh (its budget table is the authority on limits).
STAGES = ("eager_fast", "eager_baseline", "kernels", "memory_24gb", "gpu_tests", "fused", "compiled")
OPTIONAL_MODULES = ("sfd_fast.kernels", "triton", "diffusers", "deepspeed", "bitsandbytes", "pydantic",
                    "hjson", "pytest_benchmark", "cpuinfo", "transformers", "xformers")
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


def probe() -> dict:
    """torch only: versions, and the device when CUDA is usable."""
    info = {"python": sys.version.split()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
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


def parse_data(path) -> dict | None:
    """A stage's result file: pytest-benchmark JSON (the rows), JUnit XML (counts) or plain JSON."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    if path.suffix == ".xml":
        return {"junit": parse_junit(path)}
    data = _read_json(path, None)
    if isinstance(data, dict) and "benchmarks" in data:
        rows = []
        for b in data["benchmarks"]:
            stats = b.get("stats") or {}
            rows.append(dict(b.get("extra_info") or {}, name=b.get("name"), median_s=stats.get("median"),
                             rounds=stats.get("rounds")))
        return {"benchmarks": rows}
    return {"json": data}


def stage_status(rc: int, data: dict | None, expects_data: bool = True) -> str:
    """ok / timeout / absent (nothing selected) / failed / empty (exit 0 but no numbers: skipped cases)."""
    if rc in TIMEOUT_CODES:
        return "timeout"
    if rc == NO_TESTS_CODE:
        return "absent"
    if rc != 0:
        return "failed"
    if expects_data and (data is None or ("benchmarks" in data and not data["benchmarks"])):
        return "empty"
    return "ok"


def record(out: Path, stage: str, rc: int, seconds: float, limit: float, data_file=None, log_tail=None,
           reason: str | None = None) -> dict:
    """Add one stage's record to OUT/stages.json and rewrite OUT/summary.json."""
    stages_file = out / "stages.json"
    raw = _read_json(stages_file, {})
    data = parse_data(data_file) if data_file else None
    rec = {"status": "skipped" if reason and rc is None else stage_status(rc, data, data_file is not None), "rc": rc,
           "seconds": round(seconds, 1), "limit_s": limit, "data": data}
    if reason:
        rec["reason"] = reason
    elif rec["status"] == "timeout":
        rec["reason"] = f"stopped at its time limit ({limit:g} s): numbers of this stage are lost, the others kept"
    elif rec["status"] == "absent":
        rec["reason"] = "no benchmark case matched this stage's selection (not built yet)"
    elif rec["status"] == "empty":
        rec["reason"] = "exited 0 but recorded no numbers (its cases skipped: see stages.log)"
    if log_tail and Path(log_tail).is_file() and rec["status"] not in ("ok", "absent", "skipped"):
        rec["log_tail"] = Path(log_tail).read_text(errors="replace").splitlines()[-15:]
    raw.setdefault("stages", {})[stage] = rec
    _write_json(stages_file, raw)
    return write_summary(out, final=False)


def _step_rows(stages: dict) -> list[dict]:
    rows = []
    for name in ("eager_fast", "eager_baseline", "compiled", "fused"):
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


def write_summary(out: Path, final: bool = True, skip_reason: str | None = None) -> dict:
    """OUT/summary.json from OUT/stages.json. final=False while stages are still to run."""
    raw = _read_json(out / "stages.json", {})
    env, stages = raw.get("environment", {}), raw.get("stages", {})
    if skip_reason:
        stages = {s: {"status": "skipped", "reason": skip_reason} for s in STAGES}
    table, ratios = step_table(stages, env)
    statuses = [stages.get(s, {}).get("status", "not run") for s in STAGES]
    if skip_reason:
        status = "skipped"
    elif not final:
        status = "running"
    elif all(s in ("ok", "absent") for s in statuses):
        status = "ok"
    elif any(s == "ok" for s in statuses):
        status = "partial"
    else:
        status = "failed"
    summary = {
        "status": status, "reason": skip_reason, "device": env.get("device"), "torch": env.get("torch"),
        "cuda": env.get("cuda"), "python": env.get("python"), "peak_bf16_tflops": env.get("peak_bf16_tflops"),
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
    sub.add_parser("probe").add_argument("out")
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
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.cmd in ("probe", "env"):
        raw = _read_json(out / "stages.json", {})
        raw["environment"] = probe() if a.cmd == "probe" else environment(not a.no_peak)
        _write_json(out / "stages.json", raw)
        write_summary(out, final=False)
        return 0 if raw["environment"].get("cuda_available") else 3
    if a.cmd == "record":
        record(out, a.stage, a.rc, a.seconds, a.limit, a.data, a.log_tail, a.reason)
        return 0
    s = write_summary(out, final=True, skip_reason=a.skip_all)
    print(f"gpu_check summary: status={s['status']} device={s['device']} ratios={s['ratios']} -> {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
