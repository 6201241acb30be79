#!/usr/bin/env bash
# Installs Debian's chromium when no headless Chromium is on PATH: tests/test_report_browser.py
# renders report.html in it (CI must run that test, never skip it).
set -euo pipefail
for b in chromium chromium-browser google-chrome; do
  if command -v "$b" >/dev/null 2>&1; then echo "chromium: $(command -v "$b")"; exit 0; fi
done
if [ "$(id -u)" != 0 ]; then
  echo "ensure_chromium: no chromium on PATH and not root; install it with 'apt-get install -y chromium'" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium
