"""A page opened by headless Chromium over the DevTools protocol, with no dependency beyond the browser.

Chromium is started with `--remote-debugging-pipe`: it reads protocol commands from fd 3 and writes
replies and events to fd 4, each message one JSON object ended by a NUL byte. `open_page(path)`
creates a tab, loads the file, waits for its load event, and returns what a test needs to assert
on: the page's own answer to a JavaScript probe, the console errors and uncaught exceptions it
logged, and a full-page PNG screenshot.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


class DevToolsPipe:
    """One Chromium process driven over fds 3/4 (see the module docstring)."""

    def __init__(self, binary: str, timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="sfd-chromium-")
        to_browser_r, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()
        # the child must see our pipe ends as exactly fds 3 (commands) and 4 (replies): moved above
        # 10 first (either may itself be 3 or 4), then duplicated onto 3 and 4, which pass_fds keeps open
        def child_fds():
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={self.profile}",
             "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4), preexec_fn=child_fds,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            if time.time() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.from_browser, 1 << 16)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace")[-3000:] if self.proc.poll() is not None else ""
                raise RuntimeError(f"Chromium closed the DevTools pipe (exit {self.proc.poll()}): {err}")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self.to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str) -> dict:
        deadline = time.time() + self.timeout
        for ev in self.events:
            if ev.get("method") == method and ev.get("sessionId") == session:
                return ev
        while True:
            ev = self._read_message(deadline)
            self.events.append(ev)
            if ev.get("method") == method and ev.get("sessionId") == session:
                return ev

    def close(self):
        try:
            self.call("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.to_browser, self.from_browser):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)


def open_page(binary: str, page: Path, probe_js: str, width: int = 1400) -> dict:
    """Load `page` (a local file) and return {"probe": the probe's JSON value, "errors": console errors
    and uncaught exceptions, "screenshot": PNG bytes of the whole page}."""
    b = DevToolsPipe(binary)
    try:
        target = b.call("Target.createTarget", url="about:blank")["targetId"]
        s = b.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            b.call(f"{domain}.enable", session=s)
        b.call("Emulation.setDeviceMetricsOverride", session=s, width=width, height=900, deviceScaleFactor=1,
               mobile=False)
        b.call("Page.navigate", session=s, url=Path(page).absolute().as_uri())
        b.wait_event("Page.loadEventFired", s)
        probe = b.call("Runtime.evaluate", session=s, expression=probe_js, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in probe:
            raise RuntimeError(f"the probe failed in the page: {probe['exceptionDetails']}")
        shot = b.call("Page.captureScreenshot", session=s, format="png", captureBeyondViewport=True)
        errors = []
        for ev in b.events:
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                errors.append(p.get("exceptionDetails", {}).get("text", "exception"))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append(p["entry"].get("text", ""))
        return {"probe": probe["result"].get("value"), "errors": errors,
                "screenshot": base64.b64decode(shot["data"])}
    finally:
        b.close()


IMAGES_PROBE = "[...document.images].map(i => i.naturalWidth)"


def main(argv=None) -> None:
    """`python -m tests.headless_browser PAGE.html OUT.png [--max-height PX]`: render a report in
    headless Chromium, refuse a page with a console error or an undecoded image, and save the
    screenshot (cropped to its top PX pixels); how docs/assets/report_digits_chromium.png is made."""
    import argparse
    import io

    from PIL import Image
    p = argparse.ArgumentParser(prog="python -m tests.headless_browser")
    p.add_argument("page")
    p.add_argument("out")
    p.add_argument("--max-height", type=int, default=0)
    args = p.parse_args(argv)
    binary = find_chromium()
    if binary is None:
        raise SystemExit("no chromium on PATH (apt-get install -y chromium)")
    page = open_page(binary, Path(args.page), IMAGES_PROBE)
    if page["errors"] or not page["probe"] or min(page["probe"]) <= 0:
        raise SystemExit(f"the page failed: console errors {page['errors']}, image widths {page['probe']}")
    shot = Image.open(io.BytesIO(page["screenshot"]))
    if args.max_height and shot.height > args.max_height:
        shot = shot.crop((0, 0, shot.width, args.max_height))
    shot.save(args.out, optimize=True)
    print(f"{args.out}: {shot.width}x{shot.height}, {len(page['probe'])} images decoded, no console error")


if __name__ == "__main__":
    main()
