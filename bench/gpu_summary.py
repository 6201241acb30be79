"""The JSON summary of bench/gpu_check.sh (PERFORMANCE.md "The GPU check script").

    python bench/gpu_summary.py OUT_DIR [--status ok|skipped|failed] [--reason TEXT]

reads what gpu_check.sh left in OUT_DIR:
    env.json        device name, torch / triton / CUDA versions, measured bf16 matmul peak, and
                    the optional packages that could not be imported (written by `env` below)
    install.log     the offline wheel install (optional)
    gpu_tests.xml   JUnit XML of `pytest tests -m gpu`
    bench_*.json    pytest-benchmark JSON of the CUDA benchmarks (step, kernels)
and writes OUT_DIR/summary.json: environment, test counts and failures, and per benchmark
configuration: samples/s, MFU, TFLOP/s, peak memory (allocated and reserved), and the fast /
baseline speed-up measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

OPTIONAL_MODULES = ("triton", "xformers", "bitsandbytes", "deepspeed", "pytest_benchmark", "diffusers",
                    "transformers")


def environment(measure_peak: bool = True) -> dict:
    """Versions, device, the measured bf16 matmul peak, and optional modules that do not load."""
    import importlib

    info = {"python": sys.version.split()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        import torch
    except Exception as err:  # pragma: no cover - torch is required
        return dict(info, torch=None, error=f"torch does not import: {err}")
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    unavailable = {}
    for name in OPTIONAL_MODULES:
        try:
            mod = importlib.import_module(name)
            info[f"{name}_version"] = getattr(mod, "__version__", "unknown")
        except Exception as err:  # ImportError, or a wheel built for another torch
            unavailable[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
    info["unavailable"] = unavailable
    info["triton"] = info.get("triton_version")
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["device_capability"] = list(torch.cuda.get_device_capability())
        if measure_peak:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import measure
            info["peak_bf16_tflops"] = measure.peak_bf16_matmul_flops() / 1e12
    else:
        info["device"] = None
    return info


def parse_junit(path) -> dict:
    """Counts and the names of failed/errored tests from a JUnit XML file (pytest --junitxml)."""
    path = Path(path)
    if not path.is_file():
        return {"ran": False}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"ran": True, "tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [],
           "skip_reasons": []}
    for s in suites:
        for case in s.iter("testcase"):
            out["tests"] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            if case.find("failure") is not None:
                out["failed"] += 1
                out["failures"].append(name)
            elif case.find("error") is not None:
                out["errors"] += 1
                out["failures"].append(name)
            elif case.find("skipped") is not None:
                out["skipped"] += 1
                msg = case.find("skipped").get("message", "")
                out["skip_reasons"].append(f"{name}: {msg}"[:300])
            else:
                out["passed"] += 1
    return out


def parse_bench(*paths) -> dict:
    """Per benchmark: the extra_info the suites record, plus median seconds; and the speed-ups.
    Several pytest-benchmark JSON files (one per suite) are merged; missing ones are skipped."""
    files = [Path(p) for p in paths if Path(p).is_file()]
    if not files:
        return {"ran": False, "results": [], "speedups": {}}
    data = {"benchmarks": []}
    for f in files:
        d = json.loads(f.read_text())
        data["benchmarks"] += d.get("benchmarks", [])
        data.setdefault("machine_info", d.get("machine_info", {}))
    results = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info", {}))
        stats = b.get("stats") or {}
        info.update(name=b.get("name"), median_s=stats.get("median"), rounds=stats.get("rounds"))
        results.append(info)
    speedups = {}
    steps = [r for r in results if r.get("config") and r.get("samples_per_s")]
    for cfg in sorted({r["config"] for r in steps}):
        base = [r for r in steps if r["config"] == cfg and r.get("provider") == "baseline"]
        for r in steps:
            if r["config"] == cfg and r.get("provider") == "fast" and base:
                key = f"{cfg}/fast{'-compile' if r.get('compile') else ''}_vs_baseline"
                speedups[key] = r["samples_per_s"] / base[0]["samples_per_s"]
    return {"ran": True, "results": results, "speedups": speedups,
            "machine_info": data.get("machine_info", {}).get("cpu", {}).get("brand_raw")}


def step_table(bench: dict) -> list[dict]:
    """The per-configuration rows of the README table (step benchmarks only)."""
    keys = ("config", "provider", "compile", "batch", "samples_per_s", "mfu", "tflops", "peak_mem_bytes",
            "peak_reserved_bytes", "device", "flops_source")
    return [{k: r.get(k) for k in keys} for r in bench.get("results", []) if r.get("config")]


def write_summary(out_dir, status: str = "ok", reason: str | None = None, env: dict | None = None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if env is None:
        env_file = out_dir / "env.json"
        env = json.loads(env_file.read_text()) if env_file.is_file() else {}
    bench = parse_bench(*sorted(out_dir.glob("bench*.json")))
    tests = parse_junit(out_dir / "gpu_tests.xml")
    summary = {
        "status": status, "reason": reason, "environment": env,
        "device": env.get("device"), "torch": env.get("torch"), "triton": env.get("triton"),
        "cuda": env.get("cuda"), "peak_bf16_tflops": env.get("peak_bf16_tflops"),
        "unavailable_modules": env.get("unavailable", {}),
        "tests": tests, "step_benchmarks": step_table(bench), "speedups": bench["speedups"],
        "benchmarks": bench["results"],
        "logs": sorted(p.name for p in out_dir.glob("*.log")),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--status", default="ok", choices=["ok", "skipped", "failed"])
    p.add_argument("--reason", default=None)
    p.add_argument("--env-only", action="store_true", help="write OUT_DIR/env.json and exit")
    p.add_argument("--no-peak", action="store_true", help="do not measure the matmul peak")
    a = p.parse_args(argv)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if a.env_only:
        (out / "env.json").write_text(json.dumps(environment(not a.no_peak), indent=2, default=str))
        return 0
    s = write_summary(out, a.status, a.reason)
    print(f"gpu_check summary: status={s['status']} device={s['device']} tests={s['tests']} "
          f"speedups={s['speedups']} -> {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
