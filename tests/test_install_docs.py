"""docs/install.md's matrix table and the README's supported range say what the committed matrix
records (requirements/matrix/*.json, written by requirements/matrix.sh) say."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("matrix_table", ROOT / "requirements" / "matrix_table.py")
matrix_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(matrix_table)


def _between(text, marks):
    return text[text.index(marks[0]) + len(marks[0]):text.index(marks[1])].strip()


def test_records_exist_and_are_complete():
    recs = matrix_table.records()
    envs = {r["environment"] for r in recs}
    assert {"oldest", "newest"} <= envs <= set(matrix_table.ORDER), envs   # locked: CI runs it on every submission
    for r in recs:
        assert r["commit"] and not r["commit"].endswith("-dirty"), f"{r['environment']}: run on a dirty tree"
        assert r["passed"] > 0 or r["status"] != "passed"
        reruns = r.get("reruns", [])
        all_rerun_ok = len(reruns) == r["failed"] + r["errors"] and all(x["passed_on_rerun"] for x in reruns)
        assert (r["status"] == "passed") == (r["exit_code"] == 0 and all_rerun_ok), r["environment"]


def test_install_md_table_matches_the_records():
    doc = (ROOT / "docs" / "install.md").read_text()
    assert _between(doc, matrix_table.TABLE_MARK) == matrix_table.table(matrix_table.records())


def test_readme_range_is_what_passed():
    readme = (ROOT / "README.md").read_text()
    assert _between(readme, matrix_table.RANGE_MARK) == matrix_table.supported_range(matrix_table.records())


def test_range_counts_only_passing_environments():
    base = {"date": "d", "commit": "c", "machine": "m", "failed": 0, "errors": 0, "skipped": 0, "exit_code": 0}
    recs = [dict(base, environment="locked", python="3.11.7", versions={"torch": "2.13.0+cpu"}, passed=5, status="passed"),
            dict(base, environment="device", python="3.12.1", versions={"torch": "2.11.0"}, passed=3, status="passed"),
            dict(base, environment="oldest", python="3.10.1", versions={"torch": "2.4.0"}, passed=1, failed=2,
                 exit_code=1, status="failed")]
    assert matrix_table.supported_range(recs) == "Python 3.11-3.12, torch 2.11-2.13"
    with pytest.raises(SystemExit):
        matrix_table.supported_range([recs[2]])


def test_setup_lower_bounds_are_what_oldest_ran():
    """The oldest environment ran exactly setup.py's lower bounds (a bound changed later must be re-run);
    whether it passed is what the table and the README's range then say."""
    import ast
    import re

    from packaging.version import Version
    path = ROOT / "requirements" / "matrix" / "oldest.json"
    if not path.exists():
        pytest.skip("no oldest record: setup.py's lower bounds are not claimed as tested")
    oldest = json.loads(path.read_text())
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    bounds = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)>=(\S+)", r).groups()
                  for r in kw["install_requires"] + kw["extras_require"]["test"] if ">=" in r)
    checked = 0
    for name, bound in bounds.items():
        if name == "torch" or name not in oldest["versions"]:
            continue
        assert Version(oldest["versions"][name]) == Version(bound), (name, oldest["versions"][name], bound)
        checked += 1
    assert checked >= 10, f"only {checked} lower bounds recorded"
