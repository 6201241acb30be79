#!/usr/bin/env bash
# The one command that measures sfd-fast on a CUDA machine (docs/performance.md,
# /work/shared/design/PERFORMANCE.md "The GPU check script").
#
#   bench/gpu_check.sh RESULTS_DIR
#
# 1. installs wheels from .whl/ (if present) offline: pip install --no-index --no-deps; reports
#    packages that do not import (e.g. an xformers wheel built for another torch) without failing;
# 2. runs the GPU test tier (pytest tests -m gpu) and the CUDA benchmarks (bench_step.py: sd15
#    fast / fast+compile / baseline; bench_kernels.py: CUDA cases), each under a timeout, all in
#    under 8 minutes;
# 3. writes RESULTS_DIR/summary.json (bench/gpu_summary.py) and the full logs.
# Without CUDA it prints why, writes a summary with status "skipped" and exits 0.
# Environment: PYTHON (default: python3), GPU_CHECK_{INSTALL,TESTS,STEP,KERNELS}_TIMEOUT and
# GPU_CHECK_BUDGET (seconds; each phase gets at most what is left of the budget).
set -u
if [ $# -ne 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    echo "usage: bench/gpu_check.sh RESULTS_DIR   (writes summary.json and logs into RESULTS_DIR)" >&2
    exit 2
fi
OUT="$1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
mkdir -p "$OUT" || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0          # native kernels (tests/conftest.py defaults it to 1 for the CPU tier)
T_INSTALL="${GPU_CHECK_INSTALL_TIMEOUT:-60}"
T_TESTS="${GPU_CHECK_TESTS_TIMEOUT:-120}"
T_STEP="${GPU_CHECK_STEP_TIMEOUT:-230}"
T_KERNELS="${GPU_CHECK_KERNELS_TIMEOUT:-60}"
BUDGET="${GPU_CHECK_BUDGET:-465}"   # seconds for everything (PERFORMANCE.md: under 8 minutes)
start=$(date +%s)
# a phase's timeout: its own limit, or what is left of the budget (at least 10 s)
limit() { local left=$(( BUDGET - ($(date +%s) - start) )); [ $left -lt 10 ] && left=10; [ "$1" -lt $left ] && echo "$1" || echo "$left"; }
log() { echo "[gpu_check $(( $(date +%s) - start ))s] $*" | tee -a "$OUT/gpu_check.log"; }

# 0. CUDA?  (checked before installing anything: a CPU machine's environment is left untouched)
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" >>"$OUT/gpu_check.log" 2>&1; then
    reason="no CUDA device visible to $PY (torch.cuda.is_available() is False or torch does not import); nothing measured"
    log "SKIPPED: $reason"
    "$PY" bench/gpu_summary.py "$OUT" --env-only --no-peak >>"$OUT/gpu_check.log" 2>&1
    "$PY" bench/gpu_summary.py "$OUT" --status skipped --reason "$reason" >>"$OUT/gpu_check.log" 2>&1
    exit 0
fi

# 1. offline wheels
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    log "installing wheels from .whl/ (offline, --no-deps)"
    for w in .whl/*.whl; do
        if ! timeout "$(limit $T_INSTALL)" "$PY" -m pip install --no-index --no-deps --find-links .whl "$w" >>"$OUT/install.log" 2>&1; then
            # read-only or externally managed environment: a side folder on PYTHONPATH instead
            timeout "$T_INSTALL" "$PY" -m pip install --no-index --no-deps --target "$ROOT/.whl-site" "$w" \
                >>"$OUT/install.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:$ROOT/.whl-site" \
                || log "could not install $w (see install.log)"
        fi
    done
else
    log "no .whl/ folder: using the installed packages"
fi
"$PY" bench/gpu_summary.py "$OUT" --env-only >>"$OUT/gpu_check.log" 2>&1
"$PY" -c "import json,sys; e=json.load(open(sys.argv[1])); [print('  not loadable:', k, '-', v) for k, v in e.get('unavailable', {}).items()]; print('  device:', e.get('device'), ' torch', e.get('torch'), ' cuda', e.get('cuda'), ' triton', e.get('triton'), ' peak bf16 TFLOP/s', round(e.get('peak_bf16_tflops') or 0, 1))" "$OUT/env.json" | tee -a "$OUT/gpu_check.log"

# 2. GPU test tier
log "pytest tests -m gpu (timeout ${T_TESTS}s)"
timeout "$(limit $T_TESTS)" "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml" \
    >"$OUT/gpu_tests.log" 2>&1
rc_tests=$?
log "GPU tests exit code $rc_tests ($(tail -n 1 "$OUT/gpu_tests.log"))"

# 3. CUDA benchmarks (the step first: it is the headline number)
log "bench_step.py sd15 (timeout ${T_STEP}s)"
timeout "$(limit $T_STEP)" "$PY" -m pytest bench/bench_step.py -k sd15 -q -p no:cacheprovider \
    --benchmark-json "$OUT/bench_step.json" >"$OUT/bench_step.log" 2>&1
rc_step=$?
log "step benchmark exit code $rc_step"
log "bench_kernels.py cuda (timeout ${T_KERNELS}s)"
timeout "$(limit $T_KERNELS)" "$PY" -m pytest bench/bench_kernels.py -k cuda -q -p no:cacheprovider \
    --benchmark-json "$OUT/bench_kernels.json" >"$OUT/bench_kernels.log" 2>&1
rc_kernels=$?
log "kernel benchmark exit code $rc_kernels"

status=ok
if [ $rc_tests -ne 0 ] || [ $rc_step -ne 0 ] || [ $rc_kernels -ne 0 ]; then status=failed; fi
"$PY" bench/gpu_summary.py "$OUT" --status "$status" \
    --reason "exit codes: tests=$rc_tests step=$rc_step kernels=$rc_kernels (124 = timeout)" | tee -a "$OUT/gpu_check.log"
log "done in $(( $(date +%s) - start ))s"
[ "$status" = ok ]
