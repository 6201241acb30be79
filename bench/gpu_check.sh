#!/usr/bin/env bash
# The one-shot device check of sfd-fast (docs/gpu_check.md):   bash bench/gpu_check.sh [--rehearse] OUT
#
# Runs on a CUDA machine whose Python already has torch/triton (the device image), in stages. Each
# stage is its own process under its own time limit and records its numbers in OUT at once, so a
# stage stopped at its limit loses only its own numbers. OUT/summary.json is rewritten after every
# stage. Files in OUT (4): summary.json, stages.json (raw per-stage data), gpu_check.log (this
# script's progress), stages.log (the stages' output).
#
# --rehearse: the same stages, selectors, code paths and files on CPU at a tiny configuration
# (GPU_CHECK_REHEARSE=1: the tiny SD pipeline for sd15, a tiny DDPM for cifar-cuda, Triton under its
# interpreter; bench/rehearsal.py), in the replica of the device image (`make device-replica`;
# PYTHON defaults to .venv-device/bin/python there). Budgets are the device's times REHEARSE_SCALE
# (default 4: 2 shared CPU cores instead of an H100). Its numbers prove that every stage selects,
# imports, runs and records; they are not performance figures.
#
# Budgets on an H100 (seconds; each stage must END by the sum of the budgets up to it, so time a
# stage leaves unused passes to the stages after it; 540 s = 9 minutes in all; the arithmetic is
# in docs/gpu_check.md). Headline numbers first, compiled variants last:
#
#   stage            budget  what
#   setup                40  wheels from .whl/ into a private folder, imports, bf16 matmul peak
#   eager_fast           75  (a) SFDTrainer.train_step, SD1.5 architecture, random weights, 8 remain +
#                            8 forget, CFG 4.5 x3, bf16 (bench_step.py [sd15-fast])
#   eager_baseline       60  (a) the reference-structured baseline, same configuration ([sd15-baseline])
#   memory_24gb          70  (f) measured peak of the 24 GB configuration (bench/memory_gpu.py)
#   ddpm                 40  (g) ddpm family step, CIFAR-10 network, batch 128 + 128: fast vs baseline
#                            (bench_ddpm_step.py [cifar-cuda-fast], [cifar-cuda-baseline])
#   kernels              45  (d) fused SFD loss micro-benchmarks on CUDA (bench_kernels.py, cuda-* cases)
#   gpu_tests            70  (e) pytest -m gpu tests (the GPU tier), one result line per test as it
#                            ends, GPU_CHECK_TEST_LIMIT (40 s) per test
#   compiled             90  (b) (a)'s fast step with torch.compile ([sd15-fast-compile]), cold cache
#   fused                50  (c) the fused-phase variant: each phase one graph ([sd15-fast-compile-phase])
#   summary               5  OUT/summary.json
#
# Overrides (seconds): GPU_CHECK_T_<STAGE> (upper case, e.g. GPU_CHECK_T_COMPILED=300), GPU_CHECK_KILL_GRACE
# (TERM -> KILL, default 5), GPU_CHECK_MIN_STAGE (a stage with less time left is skipped, default 10).
# Selections: GPU_CHECK_K_FAST, _K_BASELINE, _K_DDPM, _K_COMPILED, _K_FUSED, _K_KERNELS (pytest -k).
# PYTHON (default python3), GPU_CHECK_WHEELS (default .whl). Without CUDA (and without --rehearse):
# every stage "skipped", exit 0. A torch / triton / nvidia-* / cuda-* wheel in the wheel folder:
# refused, nothing runs, exit 2. Exit 0 only when the summary's status is ok (every stage measured).
set -u
REHEARSE=0
if [ "${1:-}" = "--rehearse" ]; then REHEARSE=1; shift; fi
if [ $# -ne 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    echo "usage: bench/gpu_check.sh [--rehearse] OUT   (writes summary.json, stages.json and two logs into OUT)" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $REHEARSE -eq 1 ] && [ -z "${PYTHON:-}" ] && [ ! -x "$ROOT/.venv-device/bin/python" ]; then
    echo "gpu_check --rehearse: no replica of the device image ($ROOT/.venv-device): run \`make device-replica\`" \
         "first, or name an interpreter with PYTHON=" >&2
    exit 2
fi
if [ $REHEARSE -eq 1 ]; then PY="${PYTHON:-$ROOT/.venv-device/bin/python}"; else PY="${PYTHON:-python3}"; fi
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/.whl}"

# --- refuse wheels that would replace the image's torch / triton / CUDA libraries (before anything)
refused=""
for w in "$WHEELS"/*.whl; do
    [ -e "$w" ] || continue
    dist="$(basename "$w" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')"
    case "$dist" in
        torch|torch-*|torchvision|torchaudio|triton|pytorch-triton*|nvidia|nvidia-*|cuda-*) refused="$refused $(basename "$w")";;
    esac
done
if [ -n "$refused" ]; then
    echo "gpu_check: REFUSED:$refused in $WHEELS: the device image's torch/triton/CUDA build must stay;" \
         "remove these wheels (\`make wheelhouse\` never fetches them). Nothing was installed or run." >&2
    exit 2
fi

mkdir -p "$1" || { echo "gpu_check: cannot create $1" >&2; exit 2; }
OUT="$(cd "$1" && pwd)"
cd "$ROOT"
X=1; [ $REHEARSE -eq 1 ] && X="${REHEARSE_SCALE:-4}"   # rehearsal: 2 shared CPU cores, not an H100
T_SETUP="${GPU_CHECK_T_SETUP:-$(( 40 * X ))}"
T_EAGER_FAST="${GPU_CHECK_T_EAGER_FAST:-$(( 75 * X ))}"
T_EAGER_BASELINE="${GPU_CHECK_T_EAGER_BASELINE:-$(( 60 * X ))}"
T_MEMORY_24GB="${GPU_CHECK_T_MEMORY_24GB:-$(( 70 * X ))}"
T_DDPM="${GPU_CHECK_T_DDPM:-$(( 40 * X ))}"
T_KERNELS="${GPU_CHECK_T_KERNELS:-$(( 45 * X ))}"
T_GPU_TESTS="${GPU_CHECK_T_GPU_TESTS:-$(( 70 * X ))}"
T_COMPILED="${GPU_CHECK_T_COMPILED:-$(( 90 * X ))}"
T_FUSED="${GPU_CHECK_T_FUSED:-$(( 50 * X ))}"
TEST_LIMIT="${GPU_CHECK_TEST_LIMIT:-$(( 40 * X ))}"
GRACE="${GPU_CHECK_KILL_GRACE:-5}"
MIN_STAGE="${GPU_CHECK_MIN_STAGE:-10}"
# Exact test ids (the part in brackets); `-k` matches substrings, so [sd15-fast] does not select
# [sd15-fast-compile]. tests/test_gpu_check.py collects each selector against the real suites.
K_FAST="${GPU_CHECK_K_FAST:-[sd15-fast]}"
K_BASELINE="${GPU_CHECK_K_BASELINE:-[sd15-baseline]}"
K_DDPM="${GPU_CHECK_K_DDPM:-cifar-cuda}"
K_COMPILED="${GPU_CHECK_K_COMPILED:-[sd15-fast-compile]}"
K_FUSED="${GPU_CHECK_K_FUSED:-[sd15-fast-compile-phase]}"
K_KERNELS="${GPU_CHECK_K_KERNELS:-cuda-}"

start=$(date +%s)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
: >"$OUT/gpu_check.log"
: >"$OUT/stages.log"
rm -f "$OUT/stages.json" "$OUT/summary.json"
elapsed() { echo $(( $(date +%s) - start )); }
left() { local l=$(( deadline - $(elapsed) - GRACE )); echo $(( l > MIN_STAGE ? l : MIN_STAGE )); }  # never 0 (= no limit)
log() { echo "[gpu_check $(elapsed)s] $*" | tee -a "$OUT/gpu_check.log"; }
summary() { "$PY" bench/gpu_summary.py "$@" >>"$OUT/gpu_check.log" 2>&1; }

# --- CUDA? (torch only; on a machine without it nothing is installed and every stage is skipped)
PROBE_ARGS=(); [ $REHEARSE -eq 1 ] && PROBE_ARGS=(--rehearse)
timeout -k "$GRACE" 60 "$PY" bench/gpu_summary.py probe "$OUT" "${PROBE_ARGS[@]}" >>"$OUT/gpu_check.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
    reason="no CUDA device visible to $PY (probe exit code $rc: torch.cuda.is_available() is False or torch does not import); nothing installed, nothing measured"
    log "SKIPPED: $reason"
    "$PY" bench/gpu_summary.py finish "$OUT" --skip-all "$reason" | tee -a "$OUT/gpu_check.log"
    exit 0
fi

# --- setup: wheels into a private folder (never over the image's packages), the checkout importable
SITE="$WORK/site"
mkdir -p "$SITE"
deadline=$T_SETUP
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    log "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into a private folder (--no-index --no-deps --target)"
    timeout -k "$GRACE" "$(left)" "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --disable-pip-version-check --target "$SITE" "$WHEELS"/*.whl >>"$OUT/stages.log" 2>&1 \
        || log "wheel install failed (exit $?; see stages.log): the stages that need those packages will fail"
else
    log "no wheels in $WHEELS (make wheelhouse): using the installed packages only"
fi
# the checkout itself is importable from its root: sfd_fast/kernels links to kernels/ (docs/install.md)
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ $REHEARSE -eq 1 ]; then
    export GPU_CHECK_REHEARSE=1 TRITON_INTERPRET=1      # CPU: tiny configurations, Triton's interpreter
    # one thread per process: on a shared CPU, OpenMP threads spinning against other jobs made the
    # tiny SD step ~6x slower with 2 threads than with 1 (measured here under a load of 14)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
    # Inductor's CPU backend builds its generated C++ with g++ -O3, the bulk of a cold compile here;
    # -O0 (TORCHINDUCTOR_DEBUG_COMPILE) builds the same generated code several times faster. The device
    # generates Triton instead, so nothing the device runs is changed by this.
    export TORCHINDUCTOR_DEBUG_COMPILE="${TORCHINDUCTOR_DEBUG_COMPILE:-1}"
    log "REHEARSAL on CPU with $PY: tiny configurations, budgets x$X; not performance figures"
else
    export TRITON_INTERPRET=0                          # native kernels (tests/conftest.py defaults it to 1)
fi
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"        # a cold, private compile cache
export TRITON_CACHE_DIR="$WORK/triton"
timeout -k "$GRACE" "$(left)" "$PY" bench/gpu_summary.py env "$OUT" >>"$OUT/gpu_check.log" 2>&1 || log "environment probe failed (exit $?)"
"$PY" -c "import json,sys; e=json.load(open(sys.argv[1])).get('environment', {}); print('  device:', e.get('device'), '| torch', e.get('torch'), '| cuda', e.get('cuda'), '| bf16 peak TFLOP/s', e.get('peak_bf16_tflops')); [print('  not importable:', k, '-', v) for k, v in e.get('unavailable', {}).items()]" \
    "$OUT/stages.json" 2>&1 | tee -a "$OUT/gpu_check.log"

# --- stages: run_stage NAME BUDGET DATA_FILE COMMAND...   (the stage ends by the cumulative deadline)
run_stage() {
    local name=$1 budget=$2 data=$3
    shift 3
    deadline=$(( deadline + budget ))
    local limit=$(( deadline - $(elapsed) - GRACE ))
    if [ $limit -lt "$MIN_STAGE" ]; then
        log "$name: skipped, ${limit}s left of its deadline (< ${MIN_STAGE}s)"
        summary record "$OUT" "$name" --limit "$limit" --reason "skipped: the earlier stages used its time (${limit}s left)"
        return
    fi
    log "$name: start, limit ${limit}s"
    echo "===== $name (limit ${limit}s): $*" >>"$OUT/stages.log"
    local offset t0 rc
    offset=$(stat -c %s "$OUT/stages.log")
    t0=$(date +%s)
    timeout -k "$GRACE" "$limit" "$@" >>"$OUT/stages.log" 2>&1 </dev/null
    rc=$?
    tail -c +$(( offset + 1 )) "$OUT/stages.log" >"$WORK/stage_tail.log"
    summary record "$OUT" "$name" --rc $rc --seconds $(( $(date +%s) - t0 )) --limit "$limit" \
        --data "$data" --log-tail "$WORK/stage_tail.log"
    log "$name: exit code $rc after $(( $(date +%s) - t0 ))s$([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo ' (time limit)')"
}
BENCH=("$PY" -m pytest -q -p no:cacheprovider)
run_stage eager_fast "$T_EAGER_FAST" "$WORK/eager_fast.json" \
    "${BENCH[@]}" bench/bench_step.py -k "$K_FAST" --benchmark-json "$WORK/eager_fast.json"
run_stage eager_baseline "$T_EAGER_BASELINE" "$WORK/eager_baseline.json" \
    "${BENCH[@]}" bench/bench_step.py -k "$K_BASELINE" --benchmark-json "$WORK/eager_baseline.json"
run_stage memory_24gb "$T_MEMORY_24GB" "$WORK/memory_24gb.json" \
    "$PY" bench/memory_gpu.py --json "$WORK/memory_24gb.json"
run_stage ddpm "$T_DDPM" "$WORK/ddpm.json" \
    "${BENCH[@]}" bench/bench_ddpm_step.py -k "$K_DDPM" --benchmark-json "$WORK/ddpm.json"
run_stage kernels "$T_KERNELS" "$WORK/kernels.json" \
    "${BENCH[@]}" bench/bench_kernels.py -k "$K_KERNELS" --benchmark-json "$WORK/kernels.json"
# the GPU tier: one flushed JSON line per test as it ends (bench/gpu_tier_log.py), a per-test limit
run_stage gpu_tests "$T_GPU_TESTS" "$WORK/gpu_tests.jsonl" \
    env PYTHONPATH="$ROOT/bench:$PYTHONPATH" "${BENCH[@]}" tests -m gpu -p gpu_tier_log \
    --results-jsonl "$WORK/gpu_tests.jsonl" --per-test-limit "$TEST_LIMIT"
run_stage compiled "$T_COMPILED" "$WORK/compiled.json" \
    "${BENCH[@]}" bench/bench_step.py -k "$K_COMPILED" --benchmark-json "$WORK/compiled.json"
run_stage fused "$T_FUSED" "$WORK/fused.json" \
    "${BENCH[@]}" bench/bench_step.py -k "$K_FUSED" --benchmark-json "$WORK/fused.json"

"$PY" bench/gpu_summary.py finish "$OUT" | tee -a "$OUT/gpu_check.log"
log "done in $(elapsed)s"
"$PY" -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))['status'] == 'ok' else 1)" "$OUT/summary.json"
