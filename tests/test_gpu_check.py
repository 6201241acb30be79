"""bench/gpu_check.sh and its summary writer (bench/gpu_summary.py), as far as a CPU machine allows:
argument handling, the clean skip without CUDA, and the summary logic on fabricated inputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "bench"))

import gpu_summary  # noqa: E402


def _run(*args, timeout=120):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_usage_without_argument():
    r = _run()
    assert r.returncode == 2 and "usage: bench/gpu_check.sh RESULTS_DIR" in r.stderr
    r = _run("a", "b")
    assert r.returncode == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_clean_skip_without_cuda(tmp_path):
    out = tmp_path / "results" / "nested"
    r = _run(str(out))
    assert r.returncode == 0, r.stderr
    assert "SKIPPED: no CUDA device" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "skipped" and "no CUDA device" in s["reason"]
    assert s["torch"] == torch.__version__ and s["device"] is None
    assert s["tests"] == {"ran": False} and s["step_benchmarks"] == []
    assert (out / "gpu_check.log").is_file()


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_gpu_tier" name="test_a" time="1"/>
<testcase classname="tests.test_gpu_tier" name="test_b" time="1"><failure message="boom"/></testcase>
<testcase classname="tests.test_gpu_tier" name="test_c" time="1"><skipped message="no xformers"/></testcase>
<testcase classname="tests.test_gpu_tier" name="test_d" time="1"><error message="setup"/></testcase>
</testsuite></testsuites>"""


def _bench_json(rows):
    return {"machine_info": {"cpu": {"brand_raw": "X"}},
            "benchmarks": [{"name": n, "stats": {"median": m, "rounds": 3}, "extra_info": e} for n, m, e in rows]}


def test_summary_writer(tmp_path):
    (tmp_path / "gpu_tests.xml").write_text(JUNIT)
    step = _bench_json([
        ("test_sfd_step[sd15-fast]", 0.5, {"config": "sd15", "provider": "fast", "compile": False,
                                           "samples_per_s": 32.0, "mfu": 0.4, "tflops": 300.0,
                                           "peak_mem_bytes": 10, "peak_reserved_bytes": 12, "device": "H100"}),
        ("test_sfd_step[sd15-fast-compile]", 0.4, {"config": "sd15", "provider": "fast", "compile": True,
                                                   "samples_per_s": 40.0, "mfu": 0.5}),
        ("test_sfd_step[sd15-baseline]", 2.0, {"config": "sd15", "provider": "baseline", "compile": False,
                                               "samples_per_s": 8.0, "mfu": 0.1}),
    ])
    (tmp_path / "bench_step.json").write_text(json.dumps(step))
    (tmp_path / "bench_kernels.json").write_text(json.dumps(_bench_json(
        [("test_sfd_generator_loss[x]", 1e-4, {"provider": "triton", "mode": "fwd", "gbps": 100.0})])))
    (tmp_path / "gpu_tests.log").write_text("...")
    env = {"device": "H100", "torch": "2.x", "triton": "3.x", "cuda": "12.x", "peak_bf16_tflops": 790.0,
           "unavailable": {"xformers": "ImportError: undefined symbol"}}
    s = gpu_summary.write_summary(tmp_path, "ok", None, env=env)
    assert json.loads((tmp_path / "summary.json").read_text())["device"] == "H100"
    assert s["tests"]["passed"] == 1 and s["tests"]["failed"] == 1 and s["tests"]["skipped"] == 1
    assert s["tests"]["errors"] == 1 and len(s["tests"]["failures"]) == 2
    assert s["speedups"] == {"sd15/fast_vs_baseline": 4.0, "sd15/fast-compile_vs_baseline": 5.0}
    assert [r["provider"] for r in s["step_benchmarks"]] == ["fast", "fast", "baseline"]
    assert s["step_benchmarks"][0]["peak_reserved_bytes"] == 12
    assert len(s["benchmarks"]) == 4 and s["peak_bf16_tflops"] == 790.0
    assert s["unavailable_modules"] == {"xformers": "ImportError: undefined symbol"}
    assert s["logs"] == ["gpu_tests.log"]


def test_summary_with_nothing_run(tmp_path):
    s = gpu_summary.write_summary(tmp_path, "failed", "exit codes", env={})
    assert s["tests"] == {"ran": False} and s["speedups"] == {} and s["status"] == "failed"


def test_environment_reports_unloadable_modules(monkeypatch):
    monkeypatch.setattr(gpu_summary, "OPTIONAL_MODULES", ("json", "surely_not_a_module_xyz"))
    env = gpu_summary.environment(measure_peak=False)
    assert env["torch"] == torch.__version__ and "json_version" in env
    assert env["unavailable"]["surely_not_a_module_xyz"].startswith("ModuleNotFoundError")
