"""`sfd-fast report RUN_A RUN_B ...`: the comparison page (sfd_fast/evaluation/compare.py).

Run folders are written by hand here (config.json, stats.jsonl, eval.json, environment.json) so
each difference is known; tests/test_report_browser.py renders a comparison of two real digits runs
in Chromium."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from sfd_fast import cli

BASE_CFG = {"run": {"name": "a", "seed": 0}, "optim": {"generator": {"lr": 1e-3}, "fake_score": {"lr": 1e-3}},
            "train": {"batch_size": 8, "total_steps": 4}, "sfd": {"forget_classes": [0]}}


def _run(root: Path, name: str, cfg_changes: dict, loss: float, ev: dict | None, torch_version="2.13.0") -> Path:
    run = root / name
    run.mkdir()
    cfg = json.loads(json.dumps(BASE_CFG))
    for dotted, v in cfg_changes.items():
        node = cfg
        *path, last = dotted.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    (run / "config.json").write_text(json.dumps(cfg))
    recs = [{"step": s, "kimg": s / 1000, "samples_per_s": 100.0 + s, "fake_score_loss/remain": loss + s,
             "fake_score_loss/forget": loss, "generator_loss/remain": -loss, "generator_loss/forget": loss / 2}
            for s in (2, 4)]
    recs.append({"step": 4, "eval/ua/0": 0.5, "eval/fd": 10.0})
    (run / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if ev is not None:
        (run / "eval.json").write_text(json.dumps(ev))
    (run / "environment.json").write_text(json.dumps({"starts": [{"step": 0, "torch": torch_version, "device": "cpu"}]}))
    return run


def _rows(page: str, sid: str) -> dict[str, tuple[str, list[str]]]:
    """key -> (row class, cell texts) of a side-by-side table."""
    sec = re.search(rf'<section id="{sid}">(.*?)</section>', page, flags=re.S).group(1)
    rows = {}
    for cls, key, cells in re.findall(r'<tr class="(\w+)" data-key="([^"]+)">(.*?)</tr>', sec, flags=re.S):
        rows[key] = (cls, re.findall(r"<td[^>]*>(.*?)</td>", cells)[1:])
    return rows


@pytest.fixture
def two_runs(tmp_path):
    a = _run(tmp_path, "run_a", {}, 1.0, {"ua": 0.9, "fd_final": 20.0})
    b = _run(tmp_path, "run_b", {"run.name": "b", "optim.generator.lr": 5e-4, "sfd.forget_classes": [0, 7]}, 2.0,
             {"ua": 0.95, "fd_final": 22.5, "ua_per_class": {"7": 1.0}}, torch_version="2.12.0")
    return a, b


def test_cli_writes_one_page_with_configs_side_by_side_and_differences_first(two_runs, tmp_path, capsys):
    a, b = two_runs
    out = tmp_path / "cmp.html"
    cli.main(["report", str(a), str(b), "--out", str(out)])
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    for sid in ("runs", "curves", "final-eval", "config", "environment"):
        assert f'<section id="{sid}">' in page
    cfg = _rows(page, "config")
    differing = [k for k, (cls, _) in cfg.items() if cls == "diff"]
    assert set(differing) == {"run/name", "optim/generator/lr", "sfd/forget_classes"}
    assert list(cfg)[:3] == differing                       # listed first
    assert cfg["optim/generator/lr"][1] == ["0.001", "0.0005"]
    assert cfg["sfd/forget_classes"][1] == ["[0]", "[0, 7]"]
    assert cfg["train/batch_size"] == ("same", ["8", "8"])
    ev = _rows(page, "final-eval")
    assert ev["ua"][1] == ["0.9", "0.95"] and ev["ua_per_class/7"][1] == ["-", "1"]   # missing in run a: "-"
    assert _rows(page, "environment")["torch"] == ("diff", ["2.13.0", "2.12.0"])
    # one overlaid figure, a real PNG
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) == 1 and base64.b64decode(imgs[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:)?//', page)


def test_default_output_and_a_run_without_eval_json(two_runs, tmp_path, monkeypatch):
    a, _ = two_runs
    c = _run(tmp_path, "run_c", {"run.name": "a"}, 3.0, None)   # same name as run a: labels get the folder
    monkeypatch.chdir(tmp_path)
    cli.main(["report", str(a), str(c)])
    page = (tmp_path / "compare.html").read_text()
    assert "a (run_a)" in page and "a (run_c)" in page
    assert _rows(page, "final-eval")["ua"][1] == ["0.9", "-"]


def test_one_run_still_writes_its_own_report(two_runs):
    a, _ = two_runs
    cli.main(["report", str(a)])
    assert '<section id="losses">' in (a / "report.html").read_text()


def test_a_folder_that_is_not_a_run_is_refused(two_runs, tmp_path):
    a, _ = two_runs
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="neither config.json nor stats.jsonl"):
        cli.main(["report", str(a), str(tmp_path / "empty"), "--out", str(tmp_path / "x.html")])
    assert not (tmp_path / "x.html").exists()

