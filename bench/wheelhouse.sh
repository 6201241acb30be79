#!/usr/bin/env bash
# `make wheelhouse`: the wheels of bench/wheelhouse.txt into .whl/ for the device image (CPython 3.12,
# manylinux x86_64), and nothing else: fails if a torch / triton / nvidia-* / cuda-* wheel appears,
# if a wheel is not for cp312 x86_64 (or pure Python), if a package comes twice, or if the folder
# exceeds WHEELHOUSE_MAX_MIB (60: a device call carries 64 MiB with the working tree).
#   PY        python that runs pip (and builds the "build" entries: it needs torch, setuptools)
#   WHEELS    output folder (default .whl)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-python3}"
DEST="${WHEELS:-$ROOT/.whl}"
LIST="${WHEELHOUSE_LIST:-$ROOT/bench/wheelhouse.txt}"
MAX_MIB="${WHEELHOUSE_MAX_MIB:-60}"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/wheels" "$tmp/src"

while read -r line; do
    spec="${line%%#*}"
    read -r pin flag _ <<<"$spec" || true
    [ -z "${pin:-}" ] && continue
    case "$pin" in *==*) ;; *) echo "wheelhouse: '$pin' in $LIST is not pinned (NAME==VERSION)" >&2; exit 2;; esac
    if [ "${flag:-}" = build ]; then
        # source archive only on PyPI: build a pure-Python wheel with this python's torch (no CUDA ops)
        "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp/src" "$pin"
        DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp/wheels" "$tmp"/src/*
        rm -rf "${tmp:?}"/src/*
    else
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" -d "$tmp/wheels" "$pin"
    fi
done <"$LIST"

bad=0
declare -A seen=()
for w in "$tmp"/wheels/*; do
    f="$(basename "$w")"
    dist="$(echo "${f%%-*}" | tr 'A-Z_.' 'a-z--')"
    case "$dist" in
        torch|torch-*|torchvision|torchaudio|triton|pytorch-triton*|nvidia-*|nvidia|cuda-*)
            echo "wheelhouse: REFUSED $f: the device image's torch/triton/CUDA build must not be replaced" >&2; bad=1;;
    esac
    case "$f" in
        *.whl) ;;
        *) echo "wheelhouse: $f is not a wheel" >&2; bad=1;;
    esac
    case "$f" in
        *-py3-none-any.whl|*-py2.py3-none-any.whl|*-cp312-*x86_64*.whl|*-abi3-*x86_64*.whl|*-py3-none-*x86_64*.whl) ;;
        *) echo "wheelhouse: $f is not for CPython 3.12 on x86_64" >&2; bad=1;;
    esac
    [ -n "${seen[$dist]:-}" ] && { echo "wheelhouse: two versions of $dist ($f, ${seen[$dist]})" >&2; bad=1; }
    seen[$dist]="$f"
done
total=$(du -cb "$tmp"/wheels/* | tail -n 1 | cut -f1)
mib=$(( (total + 1048575) / 1048576 ))
if [ "$mib" -gt "$MAX_MIB" ]; then
    echo "wheelhouse: $mib MiB > $MAX_MIB MiB (a device call carries 64 MiB with the working tree); move a big wheel to a separate target" >&2
    bad=1
fi
[ "$bad" -eq 0 ] || { echo "wheelhouse: nothing written to $DEST" >&2; exit 1; }

mkdir -p "$DEST"
rm -f "$DEST"/*.whl               # exactly the listed wheels: no stale versions left beside them
mv "$tmp"/wheels/* "$DEST"/
ls -l "$DEST"/*.whl | awk '{printf "  %8.1f MiB  %s\n", $5 / 1048576, $NF}'
echo "wheelhouse: $(ls "$DEST"/*.whl | wc -l) wheels, $(awk -v b="$total" 'BEGIN{printf "%.1f", b / 1048576}') MiB in $DEST"
