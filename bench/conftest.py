"""pytest configuration of the benchmark suites (pytest-benchmark).

    pytest bench/ --benchmark-json=out.json      # CPU cases; CUDA cases skip with a reason
    bench/gpu_check.sh RESULTS_DIR               # CUDA cases + the GPU test tier (see that script)

The suites record their measurements in each benchmark's `extra_info` (see bench_step.py and
bench_kernels.py). Nothing here queries CUDA at import time.

Committed numbers come from committed code: a run that writes results (`--benchmark-json`,
`--benchmark-save`, `--benchmark-autosave`) from a tree with uncommitted changes (`git status
--porcelain`: modified or untracked files) is refused with exit status 2 before anything runs.
`--allow-dirty` runs it anyway and marks the file: "sfd_fast_tree": {"commit", "dirty": true,
"changes": [...]} and a top-level "DIRTY_TREE" warning (tests/test_results_provenance.py refuses
such a file wherever the README or docs cite it). Every results file records the commit.
"""
from __future__ import annotations

import os
import subprocess
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
for p in (ROOT, BENCH_DIR):  # `import sfd_fast` from a checkout; `import sd_parts` etc.
    if p not in sys.path:
        sys.path.insert(0, p)

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skips with a reason without one)")


def pytest_addoption(parser):
    parser.addoption("--allow-dirty", action="store_true",
                     help="record results from a tree with uncommitted changes (the file is marked DIRTY_TREE)")


def tree_state(root: str = ROOT, ignore: tuple = ()) -> dict:
    """{"commit", "dirty", "changes"} of the checkout at `root` (commit None outside git); `ignore`:
    paths that do not count as changes (the results file this very run writes)."""
    def git(*args):
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    skip = {os.path.realpath(p) for p in ignore}
    changes = [line for line in ((git("status", "--porcelain") or "").splitlines() if commit else [])
               if os.path.realpath(os.path.join(root, line[3:].strip('"'))) not in skip]
    return {"commit": commit, "dirty": bool(changes) or commit is None, "changes": changes[:50]}


def _records_results(config) -> bool:
    opt = config.getoption
    return bool(opt("benchmark_json", None) or opt("benchmark_save", None) or opt("benchmark_autosave", None))


def _results_file(config):
    """The --benchmark-json path (pytest-benchmark 4 opens it as a file at start, 5 keeps the path)."""
    value = config.getoption("benchmark_json", None)
    return getattr(value, "name", value)


def _drop_empty_results_file(config) -> None:
    """pytest-benchmark 4 opens --benchmark-json for writing before any test: a refused run would
    leave an empty file behind. Remove it (only when empty, i.e. created by this run)."""
    value = config.getoption("benchmark_json", None)
    if hasattr(value, "close"):
        value.close()
    path = _results_file(config)
    if isinstance(path, str) and os.path.isfile(path) and os.path.getsize(path) == 0:
        os.remove(path)


def pytest_sessionstart(session):
    config = session.config
    out = _results_file(config)
    state = config._sfd_fast_tree = tree_state(ignore=(out,) if isinstance(out, str) else ())
    if state["dirty"] and _records_results(config):
        what = ("not a git checkout" if state["commit"] is None
                else f"uncommitted changes at {state['commit'][:12]}: {', '.join(state['changes'][:5])}")
        if not config.getoption("allow_dirty"):
            _drop_empty_results_file(config)
            pytest.exit(f"refusing to record benchmark results from a dirty tree ({what}); commit first, "
                        "or pass --allow-dirty to record a file marked DIRTY_TREE", returncode=2)
        print(f"\nWARNING: recording benchmark results from a dirty tree ({what}); the file is marked DIRTY_TREE",
              file=sys.stderr)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    state = getattr(config, "_sfd_fast_tree", None) or tree_state()
    output_json["sfd_fast_tree"] = state
    if state["dirty"]:
        output_json["DIRTY_TREE"] = "recorded with --allow-dirty from uncommitted code: not citable"


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """The tiny random SD pipeline folder, built once per session (a few seconds)."""
    from sfd_fast.sd.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def pytest_collect_file(file_path, parent):
    """Collect the suites `bench_*.py` when a folder is given (`pytest bench/`); python_files keeps
    its default (test_*.py) for the rest of the project. An explicitly named file is already
    collected by pytest itself."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
