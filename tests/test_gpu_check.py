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
# stage whose arguments contain $FAKE_SLOW (sleeps past any limit), $FAKE_ABSENT (pytest exit 5:
# its selection matched nothing) or $FAKE_NODATA (exits 0 without writing its data file).
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
if [ -n "${FAKE_NODATA:-}" ] && [[ "$*" == *"$FAKE_NODATA"* ]]; then exit 0; fi
prev=""; file=""
for a in "$@"; do case "$prev" in --benchmark-json|--junitxml|--json|--results-jsonl) file="$a";; esac; prev="$a"; done
row() { printf '{"benchmarks": [{"name": "%s", "stats": {"median": %s, "rounds": 3}, "extra_info": %s}]}' "$@"; }
case "$file" in
  *.jsonl) printf '{"nodeid": "t::a", "event": "start"}\n{"nodeid": "t::a", "event": "end", "outcome": "passed", "seconds": 1.0}\n' >"$file"
           if [ -n "${FAKE_TEST_FAIL:-}" ]; then printf '{"nodeid": "t::b", "event": "start"}\n{"nodeid": "t::b", "event": "end", "outcome": "failed", "seconds": 2.0, "message": "x"}\n' >>"$file"; fi;;
  *ddpm*) printf '{"benchmarks": [{"name": "d[cifar-cuda-fast]", "stats": {"median": 0.1, "rounds": 3}, "extra_info": {"config": "cifar-cuda", "provider": "fast", "batch": 128, "sfd_samples_per_step": 256, "step_s": 0.1}}, {"name": "d[cifar-cuda-baseline]", "stats": {"median": 0.3, "rounds": 3}, "extra_info": {"config": "cifar-cuda", "provider": "baseline", "batch": 128, "sfd_samples_per_step": 256, "step_s": 0.3}}]}' >"$file";;
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
               GPU_CHECK_KILL_GRACE="1", GPU_CHECK_MIN_STAGE="1")
    return py, log, env, wheels


def test_usage_without_argument():
    r = _run(None)
    assert r.returncode == 2 and "usage: bench/gpu_check.sh [--rehearse] OUT" in r.stderr


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
    env = dict(env, FAKE_SLOW="[sd15-baseline]", FAKE_ABSENT="[sd15-fast-compile-phase]", FAKE_TEST_FAIL="1")
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
                   or "-m gpu" in c or "bench_ddpm_step.py" in c]
    order = ["[sd15-fast]", "[sd15-baseline]", "memory_gpu.py", "cifar-cuda", "bench_kernels.py",
             "-m gpu -p gpu_tier_log", "[sd15-fast-compile]", "[sd15-fast-compile-phase]"]
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
    assert st["fused"]["status"] == "missing" and "matched no case" in st["fused"]["reason"]
    assert st["gpu_tests"]["status"] == "failed"            # one test failed: not ok, counts kept
    assert "--per-test-limit" in stage_calls[5] and "--results-jsonl" in stage_calls[5]
    for name in ("eager_fast", "kernels", "memory_24gb", "compiled", "ddpm"):
        assert st[name]["status"] == "ok", (name, st[name])
    assert s["status"] == "failed" and s["device"] == "FakeGPU"   # a headline stage (baseline) is lost
    fast = [row for row in s["step"] if row["stage"] == "eager_fast"][0]
    assert fast["samples_per_s"] == pytest.approx(32.0, rel=1e-12)       # 16 samples / 0.5 s
    assert fast["mfu"] == pytest.approx(2e14 / 0.5 / 800e12, rel=1e-12)  # counted work / time / peak
    assert s["ratios"] == {"cifar-cuda/ddpm_vs_baseline": pytest.approx(3.0, rel=1e-12)}  # no sd15 ratio invented
    assert s["memory_24gb"]["peak_allocated_gib"] == pytest.approx(20.0) and s["memory_24gb"]["within_target"]
    assert s["gpu_tests"]["passed"] == 1 and s["gpu_tests"]["failed"] == 1
    assert len(s["kernels"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "stages.json", "stages.log", "summary.json"]


def test_a_killed_run_keeps_the_finished_stages(fake, tmp_path):
    py, log, env, wheels = fake
    out = tmp_path / "out"
    env = dict(env, GPU_CHECK_T_EAGER_BASELINE="60", FAKE_SLOW="[sd15-baseline]")  # the whole run is killed
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
    assert s["stages"]["compiled"]["status"] == "not run" and s["status"] == "failed"  # headline baseline failed


def test_junit_and_absent_stage(tmp_path):
    (tmp_path / "t.xml").write_text(
        '<testsuites><testsuite><testcase classname="a" name="x"/><testcase classname="a" name="y">'
        '<skipped message="no xformers"/></testcase><testcase classname="a" name="z"><error message="e"/>'
        '</testcase></testsuite></testsuites>')
    gpu_summary.record(tmp_path, "gpu_tests", 1, 5, 60, tmp_path / "t.xml")
    s = gpu_summary.record(tmp_path, "fused", 5, 3, 50, tmp_path / "missing.json")
    assert s["gpu_tests"]["passed"] == 1 and s["gpu_tests"]["skipped"] == 1 and s["gpu_tests"]["errors"] == 1
    assert s["stages"]["fused"]["status"] == "missing" and s["status"] == "running"
    assert s["stages"]["gpu_tests"]["status"] == "failed"   # an error is not a pass


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
    assert s["stages"]["eager_fast"]["status"] == "missing" and s["stages"]["kernels"]["status"] == "missing"
    assert "no benchmark row" in s["stages"]["eager_fast"]["reason"]
    assert "data file is missing" in s["stages"]["kernels"]["reason"]


# --------------------------------------------------------------------------------------------------
# Mutation tests (issue 19): each fault alone turns a green run red (status != ok, exit code 1).
# --------------------------------------------------------------------------------------------------
def _fake_run(fake, tmp_path, **faults):
    py, log, env, wheels = fake
    out = tmp_path / "out"
    r = _run(out, dict(env, **faults), wheels=wheels, python=str(py))
    return r, json.loads((out / "summary.json").read_text())


def test_green_run_without_faults(fake, tmp_path):
    """The control: with every stage measuring, the check says ok and exits 0 (so red is earned)."""
    r, s = _fake_run(fake, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert s["status"] == "ok" and all(v["status"] == "ok" for v in s["stages"].values())


def test_dead_selector_turns_the_summary_red(fake, tmp_path):
    r, s = _fake_run(fake, tmp_path, GPU_CHECK_K_FUSED="no-such-case", FAKE_ABSENT="no-such-case")
    assert r.returncode == 1 and s["status"] == "partial"
    assert s["stages"]["fused"]["status"] == "missing"


def test_missing_data_file_turns_the_summary_red(fake, tmp_path):
    r, s = _fake_run(fake, tmp_path, FAKE_NODATA="memory_gpu.py")
    assert r.returncode == 1 and s["status"] == "failed"      # memory is a headline stage
    assert s["stages"]["memory_24gb"]["status"] == "missing"
    assert "data file is missing" in s["stages"]["memory_24gb"]["reason"]


def test_stage_killed_at_its_limit_turns_the_summary_red(fake, tmp_path):
    r, s = _fake_run(fake, tmp_path, FAKE_SLOW="[sd15-fast-compile]")
    assert r.returncode == 1 and s["status"] == "partial"
    assert s["stages"]["compiled"]["status"] == "timeout" and s["stages"]["compiled"]["rc"] in (124, 137)


@pytest.mark.parametrize("kind,data,lack", [
    ("step", {"benchmarks": [{"name": "x", "median_s": None, "config": "sd15", "step_s": None}]}, "no timing"),
    ("step", {"benchmarks": [{"name": "x", "median_s": 1.0}]}, "no step row"),
    ("step", {"benchmarks": [{"name": "x", "median_s": float("nan"), "config": "c", "step_s": 1.0}]}, "no timing"),
    ("pair", {"benchmarks": [{"name": "x", "median_s": 1.0, "provider": "fast"}]}, "both providers"),
    ("memory", {"json": {"steps": 0, "peak_allocated_bytes": 5}}, "after at least one step"),
    ("tests", {"junit": {"passed": 0, "failed": 0, "errors": 0, "skipped": 3}}, "no test passed"),
    ("tests", {"junit": {"passed": 4, "failed": 1, "errors": 0}}, "1 failed"),
    ("bench", None, "missing or empty"),
])
def test_numbers_a_stage_must_hold(kind, data, lack):
    assert lack in gpu_summary.measured(kind, data)


def _default_selectors() -> dict:
    import re
    text = SCRIPT.read_text()
    return dict(re.findall(r'^K_([A-Z]+)="\$\{GPU_CHECK_K_[A-Z]+:-(.*)\}"$', text, flags=re.M))


# One process collects every selector against the real suites (pytest.main per selector; the suite
# modules are imported once), printing "SELECTOR<TAB>exit code<TAB>ids".
COLLECT = r"""
import sys, pytest
class Ids:
    def __init__(self): self.ids = []
    def pytest_collection_finish(self, session): self.ids = [i.nodeid.split("::")[-1] for i in session.items]
for suite, k in zip(sys.argv[1::2], sys.argv[2::2]):
    plug = Ids()
    rc = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", suite, "-k", k], plugins=[plug])
    print(f"SELECTED\t{suite}\t{k}\t{int(rc)}\t{','.join(plug.ids)}")
"""
SUITES = {"FAST": "bench/bench_step.py", "BASELINE": "bench/bench_step.py", "COMPILED": "bench/bench_step.py",
          "FUSED": "bench/bench_step.py", "DDPM": "bench/bench_ddpm_step.py", "KERNELS": "bench/bench_kernels.py"}


@pytest.fixture(scope="module")
def selected():
    sel = _default_selectors()
    assert set(sel) == set(SUITES), sel
    args = [a for stage in SUITES for a in (SUITES[stage], sel[stage])]
    r = subprocess.run([sys.executable, "-c", COLLECT, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    rows = [line.split("\t") for line in r.stdout.splitlines() if line.startswith("SELECTED\t")]
    assert len(rows) == len(SUITES), r.stdout[-3000:] + r.stderr[-3000:]
    return {stage: (int(row[3]), row[4].split(",") if row[4] else []) for stage, row in zip(SUITES, rows)}


@pytest.mark.parametrize("stage,expected", [
    ("FAST", ["test_sfd_step[sd15-fast]"]),
    ("BASELINE", ["test_sfd_step[sd15-baseline]"]),
    ("COMPILED", ["test_sfd_step[sd15-fast-compile]"]),
    ("FUSED", ["test_sfd_step[sd15-fast-compile-phase]"]),
    ("DDPM", ["test_ddpm_sfd_step[cifar-cuda-fast]", "test_ddpm_sfd_step[cifar-cuda-baseline]"]),
])
def test_default_selectors_select_real_cases(selected, stage, expected):
    """Each stage's default -k, collected against the real suite (no faked case): it selects exactly
    the cases the stage is for."""
    rc, ids = selected[stage]
    assert rc == 0 and ids == expected, (stage, rc, ids)


def test_kernel_selector_selects_only_cuda_cases(selected):
    rc, ids = selected["KERNELS"]
    assert rc == 0 and len(ids) == 4 * 3 * 3 and all("cuda-" in i for i in ids), ids


def test_checkout_records_commit_and_dirty_tree(tmp_path, monkeypatch):
    """A rehearsal or device result names the commit it ran on and whether tracked files were
    edited: from git when the checkout has it, else from the caller's environment (the device
    gets a copy of the working tree that may lack .git)."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    (repo / "bench" / "tracked.py").write_text("x = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    for var in ("GPU_CHECK_COMMIT", "GPU_CHECK_TREE_CLEAN"):
        monkeypatch.delenv(var, raising=False)
    assert gpu_summary.checkout(repo) == {"commit": head, "tree_clean": True, "changed": [], "source": "git"}
    (repo / "bench" / "tracked.py").write_text("x = 2\n")
    (repo / "bench" / "results.json").write_text("{}")   # untracked output does not make the tree dirty
    got = gpu_summary.checkout(repo)
    assert got["commit"] == head and got["tree_clean"] is False and got["changed"] == ["bench/tracked.py"]
    shutil.rmtree(repo / ".git")
    assert gpu_summary.checkout(repo)["commit"] is None and gpu_summary.checkout(repo)["tree_clean"] is None
    monkeypatch.setenv("GPU_CHECK_COMMIT", head)
    monkeypatch.setenv("GPU_CHECK_TREE_CLEAN", "1")
    assert gpu_summary.checkout(repo) == {"commit": head, "tree_clean": True, "changed": [], "source": "environment"}
