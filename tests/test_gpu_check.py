"""bench/gpu_check.sh, its summary (bench/gpu_summary.py), the bare-checkout import and the wheel list, as far
as a CPU machine allows: the clean skip without CUDA; staging, time limits and the partial summary
with a fake `python` that pretends to have CUDA; the refusal of torch wheels."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "bench"))

import gpu_summary  # noqa: E402

# The fake python: gpu_summary.py's probe/env pretend to see a GPU, its other commands and `-c` run
# in the real interpreter; pip is a no-op; every stage writes plausible result files, except the
# stage whose arguments contain $FAKE_SLOW (sleeps past any limit) or $FAKE_ABSENT (pytest exit 5).
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$* | PYTHONPATH=$PYTHONPATH | INDUCTOR=$TORCHINDUCTOR_CACHE_DIR" >>"$FAKE_LOG"
case "$*" in
  *"gpu_summary.py probe"*|*"gpu_summary.py env"*)
    out="${@: -1}"
    printf '{"environment": {"device": "FakeGPU", "cuda_available": true, "torch": "fake", "peak_bf16_tflops": 800.0}}' >"$out/stages.json"
    exit 0;;
  *gpu_summary.py*|-c*) exec "$REAL_PYTHON" "$@";;
  *"-m pip install"*) exit 0;;
esac
if [ -n "${FAKE_SLOW:-}" ] && [[ "$*" == *"$FAKE_SLOW"* ]]; then sleep 30; exit 0; fi
if [ -n "${FAKE_ABSENT:-}" ] && [[ "$*" == *"$FAKE_ABSENT"* ]]; then exit 5; fi
prev=""; file=""
for a in "$@"; do case "$prev" in --benchmark-json|--junitxml|--json) file="$a";; esac; prev="$a"; done
row() { printf '{"benchmarks": [{"name": "%s", "stats": {"median": %s, "rounds": 3}, "extra_info": %s}]}' "$@"; }
case "$file" in
  *.xml) printf '<testsuites><testsuite><testcase classname="t" name="a"/><testcase classname="t" name="b"><failure message="x"/></testcase></testsuite></testsuites>' >"$file";;
  *memory*) printf '{"peak_allocated_bytes": %s, "steps": 2}' $((20 * 1073741824)) >"$file";;
  *kernels*) row "k[cuda-8x4x64x64-bf16-triton-fwd]" 0.0001 '{"provider": "triton", "mode": "fwd", "gbps": 2000.0}' >"$file";;
  *eager_fast*) row "s[sd15-fast]" 0.5 '{"config": "sd15", "provider": "fast", "compile": false, "batch": 8, "sfd_samples_per_step": 16, "step_s": 0.5, "flops_per_step": 2.0e14, "flops_source": "FlopCounterMode on one eager fast step", "peak_mem_bytes": 1073741824}' >"$file";;
  *eager_baseline*) row "s[sd15-baseline]" 2.0 '{"config": "sd15", "provider": "baseline", "compile": false, "batch": 8, "sfd_samples_per_step": 16, "step_s": 2.0, "flops_per_step": 1.9e14, "flops_source": "table"}' >"$file";;
  *) row "s[sd15-fast-other]" 0.25 '{"config": "sd15", "provider": "fast", "compile": true, "batch": 8, "step_s": 0.25}' >"$file";;
esac
exit 0
"""
STAGE_ENV = {f"GPU_CHECK_T_{s.upper()}": "3" for s in gpu_summary.STAGES}  # s: slack for a loaded machine


def _run(out, env_extra=None, wheels=None, python=None, timeout=120, wrap=()):
    env = dict(os.environ, PYTHON=python or sys.executable, **(env_extra or {}))
    if wheels is not None:
        env["GPU_CHECK_WHEELS"] = str(wheels)
    args = [*wrap, "bash", str(SCRIPT)] + ([str(out)] if out is not None else [])
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture
def fake(tmp_path):
    """(python path, log path, env) of the fake interpreter; short stage budgets."""
    py = tmp_path / "bin" / "python"
    py.parent.mkdir()
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    log = tmp_path / "fake.log"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"")
    env = dict(STAGE_ENV, FAKE_LOG=str(log), REAL_PYTHON=sys.executable, GPU_CHECK_T_SETUP="3",
               GPU_CHECK_KILL_GRACE="1", GPU_CHECK_MIN_STAGE="1", FAKE_SLOW="[sd15-baseline]",
               FAKE_ABSENT="fused")
    return py, log, env, wheels


def test_usage_without_argument():
    r = _run(None)
    assert r.returncode == 2 and "usage: bench/gpu_check.sh OUT" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_clean_skip_without_cuda(tmp_path):
    out = tmp_path / "results" / "nested"
    r = _run(out)
    assert r.returncode == 0, r.stderr
    assert "SKIPPED: no CUDA device" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "skipped" and "no CUDA device" in s["reason"]
    assert s["torch"] == torch.__version__ and s["device"] is None
    assert set(s["stages"]) == set(gpu_summary.STAGES)
    assert all(st["status"] == "skipped" and "no CUDA" in st["reason"] for st in s["stages"].values())
    assert s["step"] == [] and s["ratios"] == {}
    assert len(list(out.iterdir())) <= 6


def test_stages_time_limits_and_partial_summary(fake, tmp_path):
    py, log, env, wheels = fake
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = _run(out, env, wheels=wheels, python=str(py))
    took = time.monotonic() - t0
    assert took < 25, f"the sleeping stage was not cut at its limit ({took:.0f} s)"
    assert r.returncode == 1, r.stdout + r.stderr   # not all stages ok -> 1
    calls = log.read_text().splitlines()
    pip = [c for c in calls if "-m pip install" in c]
    assert len(pip) == 1 and "--no-index --no-deps" in pip[0] and "--target" in pip[0]
    assert str(wheels / "diffusers-0.42.1-py3-none-any.whl") in pip[0]
    stage_calls = [c for c in calls if "bench_step.py" in c or "bench_kernels.py" in c or "memory_gpu.py" in c
                   or "-m gpu" in c]
    order = ["[sd15-fast]", "[sd15-baseline]", "bench_kernels.py", "memory_gpu.py", "-m gpu", "fused",
             "[sd15-fast-compile]"]
    assert len(stage_calls) == len(order)
    for call, key in zip(stage_calls, order):
        assert key in call, (key, call)
    # every stage sees the private package folder first, the checkout, and a private compile cache
    site, rest = stage_calls[0].split("PYTHONPATH=")[1].split(" | ")[0].split(":", 1)
    assert site.endswith("/site") and rest.startswith(str(ROOT))
    assert f"INDUCTOR={Path(site).parent}/inductor" in stage_calls[0]
    assert not Path(site).exists(), "the private folder is removed at the end"

    s = json.loads((out / "summary.json").read_text())
    st = s["stages"]
    assert st["eager_baseline"]["status"] == "timeout" and st["eager_baseline"]["rc"] in (124, 137)
    assert st["eager_baseline"]["seconds"] <= st["eager_baseline"]["limit_s"] + 3
    assert st["fused"]["status"] == "absent"
    for name in ("eager_fast", "kernels", "memory_24gb", "gpu_tests", "compiled"):
        assert st[name]["status"] == "ok", (name, st[name])
    assert s["status"] == "partial" and s["device"] == "FakeGPU"
    fast = [row for row in s["step"] if row["stage"] == "eager_fast"][0]
    assert fast["samples_per_s"] == pytest.approx(32.0, rel=1e-12)       # 16 samples / 0.5 s
    assert fast["mfu"] == pytest.approx(2e14 / 0.5 / 800e12, rel=1e-12)  # counted work / time / peak
    assert s["ratios"] == {}   # the baseline timed out: no ratio invented
    assert s["memory_24gb"]["peak_allocated_gib"] == pytest.approx(20.0) and s["memory_24gb"]["within_target"]
    assert s["gpu_tests"]["passed"] == 1 and s["gpu_tests"]["failed"] == 1
    assert len(s["kernels"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "stages.json", "stages.log", "summary.json"]


def test_a_killed_run_keeps_the_finished_stages(fake, tmp_path):
    py, log, env, wheels = fake
    out = tmp_path / "out"
    env = dict(env, GPU_CHECK_T_EAGER_BASELINE="60")  # the slow stage would run 60 s: the whole run is killed
    _run(out, env, wheels=wheels, python=str(py), wrap=("timeout", "10"))
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "running"
    assert s["stages"]["eager_fast"]["status"] == "ok" and s["stages"]["eager_baseline"]["status"] == "not run"
    assert [row["samples_per_s"] for row in s["step"]] == [pytest.approx(32.0, rel=1e-12)]


def test_torch_wheel_is_refused(fake, tmp_path):
    py, log, env, wheels = fake
    (wheels / "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    (wheels / "nvidia_cublas-13.0.0-py3-none-manylinux_2_27_x86_64.whl").write_bytes(b"")
    out = tmp_path / "out"
    r = _run(out, env, wheels=wheels, python=str(py))
    assert r.returncode == 2
    assert "REFUSED" in r.stderr and "torch-2.11.0" in r.stderr and "nvidia_cublas" in r.stderr
    assert not log.exists() and not out.exists(), "nothing may run or be written"


def test_bare_checkout_imports_its_kernels(tmp_path):
    """gpu_check.sh does not install the project: PYTHONPATH=<root> must be enough for
    `sfd_fast.kernels` (python -S: no site-packages, so no editable install can answer instead)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from sfd_fast.kernels import triton_support as t; print(t.__file__); "
            "print(callable(t.triton_available))")
    r = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(ROOT / "sfd_fast" / "kernels" / "triton_support.py"), "True"]


def test_wheel_list_is_pinned_and_has_no_torch():
    lines = [l for l in (ROOT / "bench" / "wheelhouse.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    names = []
    for line in lines:
        spec, _, why = line.partition("#")
        assert why.strip(), f"no reason given for {line!r}"
        pin = spec.split()[0]
        name, _, version = pin.partition("==")
        assert version, f"not pinned: {line!r}"
        names.append(name.lower().replace("_", "-"))
    assert len(names) == len(set(names))
    assert not [n for n in names if n.startswith(("torch", "triton", "nvidia", "cuda", "pytorch"))]
    assert {"diffusers", "deepspeed", "hjson", "pydantic", "bitsandbytes"} <= set(names)


def test_summary_record_and_ratios(tmp_path):
    bench = {"benchmarks": [{"name": "s[sd15-fast]", "stats": {"median": 0.5, "rounds": 10},
                             "extra_info": {"config": "sd15", "provider": "fast", "batch": 8, "step_s": 0.5,
                                            "sfd_samples_per_step": 16, "flops_per_step": 2e14,
                                            "flops_source": "FlopCounterMode on one eager fast step"}}]}
    base = {"benchmarks": [{"name": "s[sd15-baseline]", "stats": {"median": 2.0, "rounds": 3},
                            "extra_info": {"config": "sd15", "provider": "baseline", "batch": 8, "step_s": 2.0,
                                           "sfd_samples_per_step": 16, "flops_per_step": 1.9e14,
                                           "flops_source": "PERFORMANCE.md table"}}]}
    (tmp_path / "f.json").write_text(json.dumps(bench))
    (tmp_path / "b.json").write_text(json.dumps(base))
    (tmp_path / "stages.json").write_text(json.dumps({"environment": {"device": "H100", "peak_bf16_tflops": 790.0}}))
    gpu_summary.record(tmp_path, "eager_fast", 0, 30, 75, tmp_path / "f.json")
    gpu_summary.record(tmp_path, "eager_baseline", 1, 20, 75, tmp_path / "b.json", reason=None)
    gpu_summary.record(tmp_path, "kernels", None, 0, 3, reason="skipped: no time left")
    s = gpu_summary.write_summary(tmp_path)
    assert s["ratios"] == {"sd15/eager_fast_vs_baseline": pytest.approx(4.0, rel=1e-12)}
    base_row = [r for r in s["step"] if r["provider"] == "baseline"][0]
    # the baseline is charged the counted useful work of the fast step, not its own figure
    assert base_row["mfu"] == pytest.approx(2e14 / 2.0 / 790e12, rel=1e-12)
    assert s["stages"]["eager_baseline"]["status"] == "failed" and s["stages"]["kernels"]["status"] == "skipped"
    assert s["stages"]["compiled"]["status"] == "not run" and s["status"] == "partial"


def test_junit_and_absent_stage(tmp_path):
    (tmp_path / "t.xml").write_text(
        '<testsuites><testsuite><testcase classname="a" name="x"/><testcase classname="a" name="y">'
        '<skipped message="no xformers"/></testcase><testcase classname="a" name="z"><error message="e"/>'
        '</testcase></testsuite></testsuites>')
    gpu_summary.record(tmp_path, "gpu_tests", 1, 5, 60, tmp_path / "t.xml")
    s = gpu_summary.record(tmp_path, "fused", 5, 3, 50, tmp_path / "missing.json")
    assert s["gpu_tests"]["passed"] == 1 and s["gpu_tests"]["skipped"] == 1 and s["gpu_tests"]["errors"] == 1
    assert s["stages"]["fused"]["status"] == "absent" and s["status"] == "running"


def test_environment_reports_unloadable_modules(monkeypatch):
    monkeypatch.setattr(gpu_summary, "OPTIONAL_MODULES", ("json", "surely_not_a_module_xyz"))
    env = gpu_summary.environment(measure_peak=False)
    assert env["torch"] == torch.__version__ and "json" in env["versions"]
    assert env["unavailable"]["surely_not_a_module_xyz"].startswith("ModuleNotFoundError")


def _memory_tiny(tmp_path, *overrides):
    out = tmp_path / "memory.json"
    args = [sys.executable, str(ROOT / "bench" / "memory_gpu.py"), "--tiny", "--json", str(out)]
    for o in overrides:
        args += ["--set", o]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    return r, (json.loads(out.read_text()) if out.is_file() else None)


@pytest.mark.slow
def test_memory_stage_runs_the_configuration_on_tiny_sd(tmp_path):
    """bench/memory_gpu.py end to end on CPU: the 24 GB configuration (tiny pipeline, DeepSpeed ZeRO-2
    world of one, 8-bit Adam, activation checkpointing)."""
    r, res = _memory_tiny(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert res["steps"] == 2 and len(res["step_s"]) == 2 and res["peak_rss_bytes"] > 0
    assert "engine.zero_stage=2" in res["overrides"] and "engine.optimizer=adam8bit" in res["overrides"]


def test_stage_without_numbers_is_not_ok(tmp_path):
    """A benchmark stage whose cases all skipped exits 0 but must not count as measured."""
    (tmp_path / "e.json").write_text(json.dumps({"benchmarks": []}))
    gpu_summary.record(tmp_path, "eager_fast", 0, 5, 75, tmp_path / "e.json")
    s = gpu_summary.record(tmp_path, "kernels", 0, 5, 75, tmp_path / "never_written.json")
    assert s["stages"]["eager_fast"]["status"] == "empty" and s["stages"]["kernels"]["status"] == "empty"
    assert "no numbers" in s["stages"]["kernels"]["reason"]
