"""The dated results table of docs/install.md, and the README's supported range, from the records
that requirements/matrix.sh writes (requirements/matrix/<env>.json).

    python requirements/matrix_table.py            # print the table and the range
    python requirements/matrix_table.py --write    # put them into docs/install.md and README.md

tests/test_install_docs.py checks that both files say what the records say.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["locked", "device", "oldest", "newest"]
TABLE_MARK = ("<!-- matrix-table: generated from requirements/matrix/*.json; tests/test_install_docs.py checks it -->",
              "<!-- /matrix-table -->")
RANGE_MARK = ("<!-- supported-range -->", "<!-- /supported-range -->")
SHOWN = ["transformers", "diffusers", "huggingface-hub", "kernels", "numpy", "triton", "deepspeed", "bitsandbytes"]


def records() -> list[dict]:
    recs = [json.loads(p.read_text()) for p in sorted((ROOT / "requirements" / "matrix").glob("*.json"))]
    return sorted(recs, key=lambda r: ORDER.index(r["environment"]) if r["environment"] in ORDER else 99)


def _version_key(v: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def table(recs: list[dict]) -> str:
    rows = ["| environment | date | commit | machine | Python | torch | key versions | passed | failed | errors | skipped | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        v = r["versions"]
        key = ", ".join(f"{k} {v[k]}" for k in SHOWN if k in v)
        rows.append(f"| {r['environment']} | {r['date']} | {r['commit']} | {r['machine']} | {r['python']} | "
                    f"{v.get('torch', '-')} | {key} | {r['passed']} | {r['failed']} | {r['errors']} | "
                    f"{r['skipped']} | {_status(r)} |")
    return "\n".join(rows)


def _status(r: dict) -> str:
    n = len(r.get("reruns", []))
    if not n:
        return r["status"]
    ok = sum(x["passed_on_rerun"] for x in r["reruns"])
    at = f" at {r['rerun_commit']}" if r.get("rerun_commit") else ""
    return (f"{r['status']} ({n} failed, {ok} of them passed when re-run alone{at}: "
            f"{', '.join(x['test'] for x in r['reruns'])})")


def supported_range(recs: list[dict]) -> str:
    """Python and torch (major.minor) spanned by the environments that passed."""
    ok = [r for r in recs if r["status"] == "passed"]
    if not ok:
        raise SystemExit("no passing environment recorded: nothing can be claimed as supported")
    def span(values):
        mm = sorted({".".join(v.split("+")[0].split(".")[:2]) for v in values}, key=_version_key)
        return mm[0] if len(mm) == 1 else f"{mm[0]}-{mm[-1]}"
    return f"Python {span(r['python'] for r in ok)}, torch {span(r['versions']['torch'] for r in ok)}"


def replace_between(text: str, marks: tuple[str, str], body: str, sep: str) -> str:
    a, b = text.index(marks[0]) + len(marks[0]), text.index(marks[1])
    return text[:a] + sep + body + sep + text[b:]


def main(argv: list[str]) -> int:
    recs = records()
    t, rng = table(recs), supported_range(recs)
    if "--write" in argv:
        doc = ROOT / "docs" / "install.md"
        doc.write_text(replace_between(doc.read_text(), TABLE_MARK, t, "\n"))
        readme = ROOT / "README.md"
        readme.write_text(replace_between(readme.read_text(), RANGE_MARK, rng, ""))
    print(t)
    print(rng)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
