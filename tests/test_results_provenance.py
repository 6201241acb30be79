"""Committed numbers come from committed code (issue #20 item 4).

* every bench/results file the README or docs cite was recorded from a clean tree (pytest-benchmark's
  commit_info, and our sfd_fast_tree where present);
* the benches refuse to record from a dirty tree, and --allow-dirty marks the file (a throwaway git
  repository with bench/conftest.py and a one-line benchmark, run in a subprocess);
* the README's figures equal the committed files they cite (test_readme_figures_*).
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _cited_bench_files() -> set[Path]:
    cited = set()
    for doc in DOCS:
        for m in re.finditer(r"bench/results/([\w.\-]+\.json)", doc.read_text()):
            cited.add(ROOT / "bench" / "results" / m.group(1))
    return cited


def test_cited_bench_results_exist_and_come_from_a_clean_tree():
    cited = _cited_bench_files()
    assert cited
    for f in sorted(cited):
        assert f.is_file(), f"{f.name} is cited but not committed"
        d = json.loads(f.read_text())
        info = d.get("commit_info", {})
        assert re.fullmatch(r"[0-9a-f]{40}", info.get("id", "")), f"{f.name}: no commit recorded"
        assert info.get("dirty") is False, f"{f.name} was recorded from a dirty tree and is cited"
        assert "DIRTY_TREE" not in d and not d.get("sfd_fast_tree", {}).get("dirty", False), f.name


BENCH = "import time\n\ndef test_tiny(benchmark):\n    benchmark(time.sleep, 0)\n"


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"})


@pytest.fixture
def bench_repo(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    (tmp_path / "bench").mkdir()
    shutil.copy(ROOT / "bench" / "conftest.py", tmp_path / "bench" / "conftest.py")
    (tmp_path / "bench" / "bench_tiny.py").write_text(BENCH)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "c")
    return tmp_path


def _bench(repo, *extra):
    return subprocess.run([sys.executable, "-m", "pytest", "bench/bench_tiny.py", "-q", "-p", "no:cacheprovider",
                           "--benchmark-json=out.json", *extra], cwd=repo, capture_output=True, text=True, timeout=300)


def test_bench_records_the_commit_of_a_clean_tree(bench_repo):
    out = _bench(bench_repo)
    assert out.returncode == 0, out.stdout + out.stderr
    d = json.loads((bench_repo / "out.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=bench_repo, capture_output=True, text=True).stdout.strip()
    assert d["sfd_fast_tree"]["commit"] == head and d["sfd_fast_tree"]["dirty"] is False
    assert "DIRTY_TREE" not in d


def test_bench_refuses_a_dirty_tree_and_marks_it_when_allowed(bench_repo):
    (bench_repo / "bench" / "bench_tiny.py").write_text(BENCH + "# changed\n")
    out = _bench(bench_repo)
    assert out.returncode == 2 and "dirty tree" in out.stdout + out.stderr, out.stdout + out.stderr
    assert "bench_tiny.py" in out.stdout + out.stderr
    assert not (bench_repo / "out.json").exists()
    out = _bench(bench_repo, "--allow-dirty")
    assert out.returncode == 0, out.stdout + out.stderr
    d = json.loads((bench_repo / "out.json").read_text())
    assert d["sfd_fast_tree"]["dirty"] is True and "DIRTY_TREE" in d


# ------------------------------------------------------------------------------- README figures = files

def _bench_medians(name: str) -> dict:
    d = json.loads((ROOT / "bench" / "results" / name).read_text())
    return {b["name"].split("[", 1)[1].rstrip("]"): b for b in d["benchmarks"]}


def _in_readme(*snippets):
    for s in snippets:
        assert s in README, f"README does not say {s!r} (the cited file says so)"


def test_readme_figures_compat_match_the_cited_file():
    name = "2026-12-06_cpu-intel-xeon-2core-loaded_compat-denoise-ceiling.json"
    assert f"bench/results/{name}" in README
    b = _bench_medians(name)
    ms = {k: v["stats"]["median"] * 1e3 for k, v in b.items()}
    stub = ms["baseline-tiny-sd-stub"] / ms["fast-tiny-sd-stub"]
    whole = ms["baseline-tiny-sd"] / ms["fast-tiny-sd"]
    ceiling = ms["baseline-tiny-sd"] / ms["unet-floor-tiny-sd"]
    _in_readme(f"{stub:.1f}x faster than the reference structure ({ms['fast-tiny-sd-stub']:.2f} vs "
               f"{ms['baseline-tiny-sd-stub']:.2f} ms)",
               f"call {whole:.2f}x ({ms['fast-tiny-sd']:.2f} vs {ms['baseline-tiny-sd']:.2f} ms)",
               f"takes {ms['unet-floor-tiny-sd']:.2f} ms alone", f"capped near {ceiling:.2f}x")


def test_readme_figures_performance_table_match_the_cited_file():
    name = "2026-11-28_cpu-amd-2core_tiny-sd-product.json"
    assert f"bench/results/{name}" in README
    b = _bench_medians(name)
    fast, base = b["tiny-sd-fast"]["extra_info"], b["tiny-sd-baseline"]["extra_info"]
    _in_readme(f"| {fast['samples_per_s']:.2f} ({fast['step_s']:.3f} s/step) | "
               f"{base['samples_per_s']:.2f} ({base['step_s']:.3f} s/step) | "
               f"{fast['samples_per_s'] / base['samples_per_s']:.2f}x |",
               f"{fast['peak_mem_bytes'] / 1e9:.2f} GB (process peak RSS)")


RECORDED = re.compile(r"docs/results/([\w.\-]+)/eval\.json")
METRIC_ROW = re.compile(r"^\| `(\w+)`[^|]*\| *([^|]*?) *\|", re.M)


def _section_of(text: str, heading: str) -> str:
    start = text.index(heading)
    nxt = re.search(r"^#{2,3} ", text[start + len(heading):], re.M)
    return text[start:start + len(heading) + (nxt.start() if nxt else len(text))]


def test_readme_demo_table_values_come_from_a_recorded_run():
    """Every value in the demo's metric table equals the recorded eval.json that section cites (rounded
    as written); with no recorded run cited, the table holds no value at all."""
    section = _section_of(README, "### The digits demo, measured")
    rows = METRIC_ROW.findall(section)
    assert rows, "the demo table is gone"
    cited = RECORDED.findall(section)
    written = [(key, value) for key, value in rows if value not in ("", "–", "-")]
    if not cited:
        assert not written, f"values without a recorded run: {written}"
        return
    recorded = ROOT / "docs" / "results" / cited[0]
    ev = json.loads((recorded / "eval.json").read_text())
    provenance = json.loads((recorded / "provenance.json").read_text())
    assert provenance["dirty"] is False and re.fullmatch(r"[0-9a-f]{40}", provenance["commit"])
    for key, value in written:
        decimals = len(value.split(".", 1)[1]) if "." in value else 0
        assert value == f"{ev[key]:.{decimals}f}", f"README {key} = {value}, {recorded.name}/eval.json: {ev[key]}"


def test_recorded_runs_name_their_provenance():
    for d in sorted((ROOT / "docs" / "results").glob("*")) if (ROOT / "docs" / "results").is_dir() else []:
        p = json.loads((d / "provenance.json").read_text())
        assert {"command", "commit", "machine", "finished_utc", "wall_s"} <= p.keys(), d.name
        assert p["dirty"] is False, d.name


def test_record_run_refuses_a_dirty_tree_and_records_a_clean_one(bench_repo, tmp_path_factory):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import record_run
    finally:
        sys.path.remove(str(ROOT / "bench"))
    tmp_path = tmp_path_factory.mktemp("recorded")    # outside the repository under test
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"ua": 0.5}))
    (run / "config.json").write_text(json.dumps({"run": {"seed": 3}}))
    argv = [str(run), "--name", "demo", "--tree", str(bench_repo), "--command", "make demo", "--wall-s", "12",
            "--out-root", str(tmp_path / "results")]
    out = record_run.main(argv)
    p = json.loads((out / "provenance.json").read_text())
    assert p["dirty"] is False and len(p["commit"]) == 40 and p["command"] == "make demo" and p["seed"] == 3
    assert json.loads((out / "eval.json").read_text()) == {"ua": 0.5}
    (bench_repo / "bench" / "bench_tiny.py").write_text(BENCH + "# changed\n")
    with pytest.raises(SystemExit, match="uncommitted changes"):
        record_run.main(argv)
