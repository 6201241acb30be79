"""bench/gpu_tier_log.py, the GPU tier's result writer: one JSON line per test start and end, written
as it happens, a per-test limit that stops a stuck test and lets the next one run, and what
bench/gpu_summary.py makes of the lines (a run killed mid-test keeps what ended before)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_stage_data  # noqa: E402

SUITE = '''
import time, pytest
def test_a_passes():
    assert 1 + 1 == 2
def test_b_is_stuck():
    time.sleep(60)
def test_c_fails():
    assert 1 == 2, "c broke"
def test_d_skips():
    pytest.skip("no CUDA here")
def test_e_passes_after_the_stuck_one():
    assert True
'''


def _pytest(tmp_path, *extra, popen=False):
    (tmp_path / "test_suite.py").write_text(SUITE)
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_tier_log",
            str(tmp_path / "test_suite.py"), "--results-jsonl", str(tmp_path / "r.jsonl"), *extra]
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'bench'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if popen:
        return subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_per_test_limit_and_one_line_per_event(tmp_path):
    t0 = time.monotonic()
    r = _pytest(tmp_path, "--per-test-limit", "2")
    assert time.monotonic() - t0 < 50, "the stuck test was not stopped at its limit"
    assert r.returncode == 1
    lines = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(l["event"], l["nodeid"].split("::")[-1]) for l in lines][:4] == [
        ("start", "test_a_passes"), ("end", "test_a_passes"), ("start", "test_b_is_stuck"), ("end", "test_b_is_stuck")]
    ends = {l["nodeid"].split("::")[-1]: l for l in lines if l["event"] == "end"}
    assert {k: v["outcome"] for k, v in ends.items()} == {
        "test_a_passes": "passed", "test_b_is_stuck": "failed", "test_c_fails": "failed",
        "test_d_skips": "skipped", "test_e_passes_after_the_stuck_one": "passed"}
    assert "per-test limit of 2 s" in ends["test_b_is_stuck"]["message"]
    assert 1.5 < ends["test_b_is_stuck"]["seconds"] < 30
    counts = gpu_stage_data.parse_test_lines(tmp_path / "r.jsonl")
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["running"]) == (2, 2, 1, [])


def test_a_killed_tier_keeps_the_finished_tests(tmp_path):
    """SIGKILL while the stuck test runs (no per-test limit): the lines before it are on disk, and
    the summary names the test it was killed in."""
    p = _pytest(tmp_path, popen=True)
    path = tmp_path / "r.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (path.is_file() and "test_b_is_stuck" in path.read_text()):
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    counts = gpu_stage_data.parse_test_lines(path)
    assert counts["passed"] == 1 and counts["tests"] == 1
    assert [n.split("::")[-1] for n in counts["running"]] == ["test_b_is_stuck"]
