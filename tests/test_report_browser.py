"""report.html of a digits run, opened by headless Chromium (Debian's `chromium`; .ci/ensure_chromium.sh
installs it in CI) over the DevTools protocol (tests/headless_browser.py).

The page itself is asked, after its load event: every <img> decoded (complete, naturalWidth > 0),
each section the report claims is there with visible content, and the eval and config tables have
rows. The browser's console must hold no error and no uncaught exception. A full-page screenshot is
taken and checked to be a PNG as tall as the page (docs/assets/report_digits_chromium.png is one).

The test must not skip in CI: without a browser it fails there, and skips only on a developer
machine that has none (with the install line).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from sfd_fast import train
from sfd_fast.evaluation.compare import write_comparison

from .headless_browser import find_chromium, open_page
from .helpers import tiny_digits_config

CHROMIUM = find_chromium()
if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI has no chromium: .ci/run must run .ci/ensure_chromium.sh before the tests")
    pytest.skip("no chromium on PATH (apt-get install -y chromium, or .ci/ensure_chromium.sh)", allow_module_level=True)

SECTIONS = ("losses", "throughput", "evaluation", "samples", "final-eval", "plan", "environment", "config")
PLOTTED = ("losses", "throughput", "evaluation", "samples")

PROBE = """(() => {
  const imgs = [...document.images].map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth,
                                               h: i.naturalHeight, section: i.closest('section')?.id}));
  const sections = Object.fromEntries([...document.querySelectorAll('section')].map(s => [s.id, {
    title: s.querySelector('h2')?.textContent, height: s.getBoundingClientRect().height,
    imgs: s.querySelectorAll('img').length, rows: s.querySelectorAll('tr').length,
    text: s.innerText.length}]));
  return {imgs, sections, title: document.title, height: document.documentElement.scrollHeight,
          diffRows: [...document.querySelectorAll('tr.diff')].map(r => r.dataset.key)};
})()"""


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    cfg = tiny_digits_config(tmp, sfd={"forget_classes": [0, 7], "override_classes": [1, 4]},
                             train={"total_steps": 8, "log_every": 2, "checkpoint_every": 4, "sample_every": 2},
                             pretrain={"classifier_epochs": 3},
                             eval={"enabled": True, "every": 2, "during_samples_per_class": 4,
                                   "samples_per_class": 4, "teacher_steps": 2})
    run = tmp / "run"
    train.main(["--config", str(cfg), "--run-dir", str(run)])
    return tmp, cfg, run


def test_report_renders_in_chromium(digits_run, tmp_path):
    _, _, run = digits_run
    page = open_page(CHROMIUM, run / "report.html", PROBE)
    probe, errors = page["probe"], page["errors"]
    assert errors == [], errors
    assert probe["title"].startswith("sfd-fast report")
    imgs = probe["imgs"]
    assert len(imgs) >= 6
    bad = [i for i in imgs if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
    assert bad == [], bad                       # every embedded PNG decoded
    for sid in SECTIONS:
        sec = probe["sections"].get(sid)
        assert sec is not None, f"section {sid} missing"
        assert sec["height"] > 20 and sec["text"] > 0, (sid, sec)
    for sid in PLOTTED:
        assert probe["sections"][sid]["imgs"] >= 1, sid
    assert probe["sections"]["final-eval"]["rows"] > 5 and probe["sections"]["environment"]["rows"] >= 10
    assert probe["sections"]["plan"]["rows"] > 5
    from PIL import Image
    shot = Image.open(io.BytesIO(page["screenshot"]))
    assert shot.format == "PNG" and shot.width == 1400 and shot.height >= probe["height"] - 1
    assert len(set(shot.convert("L").getdata())) > 16    # drawn content, not a blank page
    out = os.environ.get("SFD_REPORT_SCREENSHOT")       # how docs/assets/report_digits_chromium.png is made
    if out:
        Path(out).write_bytes(page["screenshot"])


def test_a_broken_image_and_a_console_error_are_caught(tmp_path):
    """The harness itself: a page with an undecodable image and a console error fails both checks."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><section id="x"><img src="data:image/png;base64,AAAA"></section>'
                   '<script>console.error("planted")</script></body></html>')
    page = open_page(CHROMIUM, bad, PROBE)
    assert page["errors"] == ["planted"]
    assert page["probe"]["imgs"][0]["w"] == 0


def test_comparison_page_renders_with_differences_highlighted(digits_run, tmp_path):
    tmp, cfg, run = digits_run
    other = tmp / "run_lr"
    if not other.exists():
        train.main(["--config", str(cfg), "--run-dir", str(other), "--set", "optim.generator.lr=0.0005",
                    "run.name=tiny_lr", "train.total_steps=6"])
    out = write_comparison([run, other], tmp_path / "compare.html")
    page = open_page(CHROMIUM, out, PROBE)
    assert page["errors"] == []
    probe = page["probe"]
    assert all(i["w"] > 0 for i in probe["imgs"]) and len(probe["imgs"]) == 1
    for sid in ("runs", "curves", "final-eval", "config", "environment"):
        assert probe["sections"][sid]["height"] > 20, sid
    diff = set(probe["diffRows"])
    assert {"optim/generator/lr", "run/name", "train/total_steps"} <= diff
    assert "optim/fake_score/lr" not in diff and "sfd/alpha" not in diff
    assert json.loads((run / "config.json").read_text())["optim"]["generator"]["lr"] == 1e-3
