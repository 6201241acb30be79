"""pytest plugin of the GPU tier stage of bench/gpu_check.sh: each test's result as it finishes, and a
per-test time limit, so a stage stopped at its limit keeps every result before the test it stopped in.

    pytest tests -m gpu -p gpu_tier_log --results-jsonl FILE --per-test-limit SECONDS

FILE gets one JSON line when a test starts ({"nodeid", "event": "start"}) and one when it ends
({"nodeid", "event": "end", "outcome": passed | failed | error | skipped, "seconds", "message"}),
each written and flushed at once (line-buffered, then os.fsync). A test still running past
--per-test-limit is interrupted by SIGALRM (the exception surfaces when control is back in Python:
a long CUDA kernel or compile finishes its current call first) and recorded as failed with the
reason; the next test then runs. bench/gpu_summary.py reads the file (a test with a start line and
no end line was running when the stage was killed).
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest


class PerTestTimeLimit(Exception):
    """Raised in the test when it passes --per-test-limit."""


def pytest_addoption(parser):
    g = parser.getgroup("gpu_tier_log")
    g.addoption("--results-jsonl", default=None, help="append one JSON line per test start / end here")
    g.addoption("--per-test-limit", type=float, default=0.0, help="seconds per test (0: no limit)")


class _Log:
    def __init__(self, path: str):
        self.fh = open(path, "a", buffering=1, encoding="utf-8")
        self.reports: dict[str, list] = {}

    def write(self, rec: dict) -> None:
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()
        os.fsync(self.fh.fileno())


def _outcome(reports) -> tuple[str, str]:
    """(outcome, message) of one test from its setup / call / teardown reports."""
    by_when = {r.when: r for r in reports}
    setup, call, teardown = by_when.get("setup"), by_when.get("call"), by_when.get("teardown")
    for rep, failed_as in ((setup, "error"), (call, "failed"), (teardown, "error")):
        if rep is not None and rep.failed:
            crash = getattr(rep.longrepr, "reprcrash", None)   # "<Exception>: <message>" where pytest has it
            text = crash.message if crash is not None else (str(rep.longreprtext).strip().splitlines() or [""])[-1]
            return failed_as, text[:300]
    for rep in (setup, call):
        if rep is not None and rep.skipped:
            reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
            return "skipped", str(reason)[:300]
    return ("passed", "") if call is not None and call.passed else ("error", "no call phase recorded")


_LOG: _Log | None = None   # one pytest session per process


def pytest_configure(config):
    global _LOG
    path = config.getoption("--results-jsonl")
    if path:
        _LOG = _Log(path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    log = _LOG
    limit = item.config.getoption("--per-test-limit")
    t0 = time.monotonic()
    if log:
        log.write({"nodeid": item.nodeid, "event": "start"})
    old = None
    if limit > 0:
        def on_alarm(signum, frame):
            raise PerTestTimeLimit(f"{item.nodeid} passed its per-test limit of {limit:g} s")
        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        if limit > 0:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        if log:
            outcome, message = _outcome(log.reports.pop(item.nodeid, []))
            log.write({"nodeid": item.nodeid, "event": "end", "outcome": outcome,
                       "seconds": round(time.monotonic() - t0, 2), "message": message})


def pytest_runtest_logreport(report):
    if _LOG is not None:
        _LOG.reports.setdefault(report.nodeid, []).append(report)
