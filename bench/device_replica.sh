#!/usr/bin/env bash
# `make device-replica`: a replica of the GPU device image on this machine (docs/gpu_check.md).
#
#   1. DEVICE_VENV (default .venv-device/) with Python 3.12 and exactly the packages of
#      bench/device_image.txt (torch 2.11, triton 3.6, transformers 5.17, ...; pip resolves their own
#      dependencies, nothing else is added). torch: PyPI's default cp312 build (CUDA 13.0) with its
#      nvidia-* libraries, because no CPU build of 2.11 for cp312 is reachable from here
#      (download.pytorch.org is not); `import torch` fails without libcudnn etc., so they are needed,
#      and it runs on CPU (torch.cuda.is_available() is False). About 4.7 GB on disk, ~3.2 GB of
#      downloads on a fresh machine (pip's cache keeps them: PIP_CACHE_DIR).
#   2. the wheelhouse (.whl/, bench/wheelhouse.sh) built with THIS interpreter and torch (the
#      DeepSpeed wheel is built against torch 2.11, without JIT-built ops).
#   3. .whl/ installed exactly as bench/gpu_check.sh installs it (`pip install --no-index --no-deps
#      --target`) into DEVICE_VENV/wheel-site, so other targets can use the replica:
#      PYTHONPATH=DEVICE_VENV/wheel-site:<checkout> DEVICE_VENV/bin/python ...
#   4. the check that the image list plus the wheels are enough: every module a stage imports
#      (bench/gpu_summary.py's STAGE_MODULES) imports in that environment, or this script fails.
#
# Environment: PY312 (a python3.12; default: python3.12 on PATH, else pyenv's 3.12.*), DEVICE_VENV,
# WHEELS (default .whl). Re-running reuses the venv when device_image.txt has not changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DEVICE_VENV:-$ROOT/.venv-device}"
WHEELS="${WHEELS:-$ROOT/.whl}"
LIST="$ROOT/bench/device_image.txt"
t0=$(date +%s)
say() { echo "[device-replica $(( $(date +%s) - t0 ))s] $*"; }

is_312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }
find_py312() {
    if [ -n "${PY312:-}" ]; then echo "$PY312"; return; fi
    # a pyenv shim named python3.12 may exist without a usable 3.12 behind it: each candidate must run
    for p in "$(command -v python3.12 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12; do
        [ -n "$p" ] && [ -x "$p" ] && is_312 "$p" && { echo "$p"; return; }
    done
    echo "device-replica: no Python 3.12 found (the device runs 3.12); set PY312=/path/to/python3.12" >&2
    exit 2
}

stamp="$(sha256sum "$LIST" | cut -c1-16)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.image" 2>/dev/null)" = "$stamp" ]; then
    say "reusing $VENV (bench/device_image.txt unchanged)"
else
    PY312="$(find_py312)"
    say "creating $VENV with $("$PY312" --version 2>&1) ($PY312)"
    rm -rf "$VENV"
    "$PY312" -m venv "$VENV"
    mapfile -t pins < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$LIST" | awk '{print $1}')
    say "installing the image list: ${pins[*]}"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}"
    echo "$stamp" >"$VENV/.image"
fi
"$VENV/bin/python" -m pip freeze --disable-pip-version-check >"$VENV/image-freeze.txt"
say "image: $(wc -l <"$VENV/image-freeze.txt") distributions ($VENV/image-freeze.txt)"

say "wheelhouse for this interpreter and torch -> $WHEELS"
PY="$VENV/bin/python" WHEELS="$WHEELS" bash "$ROOT/bench/wheelhouse.sh"

say "installing $WHEELS as gpu_check.sh does (--no-index --no-deps --target $VENV/wheel-site)"
rm -rf "$VENV/wheel-site"
"$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$VENV/wheel-site" "$WHEELS"/*.whl

say "checking that every module a stage imports is importable (image + wheels only)"
( cd "$ROOT" && PYTHONPATH="$VENV/wheel-site:$ROOT" "$VENV/bin/python" bench/gpu_summary.py imports )
say "done: $VENV ($(du -sh "$VENV" | cut -f1)); python: $VENV/bin/python, wheels: $VENV/wheel-site"
