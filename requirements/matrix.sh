#!/usr/bin/env bash
# `make test-matrix [MATRIX_ENVS="locked oldest newest"]`: the CPU test tier in environments other than the lock's
# (docs/install.md). One fresh venv per environment under .matrix/<env>; each writes
# requirements/matrix/<env>.json (date, commit, Python, the versions that matter, passed/failed/skipped)
# and .matrix/<env>/pytest.log; `python requirements/matrix_table.py --write` then updates the table in
# docs/install.md and the README's supported range. "device" is the replica of the GPU machine's image
# (`make device-replica`, docs/gpu_check.md).
#
#   locked   Python 3.11, torch 2.13.0 (CPU build), requirements/test.txt: what `make test` and CI install
#   oldest   Python 3.11, torch 2.13.0 (CPU build), every other direct dependency at the lower bound
#            setup.py states (name>=X becomes name==X); indirect ones resolved by pip
#   newest   Python 3.11, torch: the newest CPU build the machine can install (TORCH_NEWEST, default
#            2.13.0: PyPI's newer torch releases are CUDA builds that do not import without several GB of
#            nvidia-* wheels, which a CPU machine must not pull), every other dependency at its newest
#            release today (pip, no lock, no cap)
#
# Python: MATRIX_PYTHON (default: pyenv's 3.11, else python3.11). CPU torch wheels come from pip's own
# configuration (find-links / an index); TORCH_INDEX as in the Makefile.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ENVS=("${@:-locked oldest newest}")
read -r -a ENVS <<<"${ENVS[*]}"
PYBASE="${MATRIX_PYTHON:-$(ls -d "$HOME"/.pyenv/versions/3.11*/bin/python3 2>/dev/null | tail -n 1)}"
PYBASE="${PYBASE:-python3.11}"
TORCH_OLDEST="${TORCH_OLDEST:-2.13.0}"
TORCH_NEWEST="${TORCH_NEWEST:-2.13.0}"
mkdir -p requirements/matrix .matrix
commit="$(git rev-parse --short HEAD)$([ -n "$(git status --porcelain -- setup.py sfd_fast kernels tests requirements)" ] && echo '-dirty')"
idx=(); [ -n "${TORCH_INDEX:-}" ] && idx=(--index-url "$TORCH_INDEX")

lower_bounds() {  # setup.py's name>=X (install_requires + the test extra) as name==X constraints
    "$1" - <<'PY'
import ast, re
tree = ast.parse(open("setup.py").read())
call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
for req in kw["install_requires"] + kw["extras_require"]["test"]:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][^,;\s]*)", req)
    if m and m.group(1) != "torch":
        print(f"{m.group(1)}=={m.group(2)}")
PY
}

status=0
for env in "${ENVS[@]}"; do
    venv=".matrix/$env"
    rm -rf "$venv"
    echo "== $env: $venv"
    "$PYBASE" -m venv "$venv" || { echo "cannot create $venv with $PYBASE" >&2; exit 2; }
    pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check --progress-bar off)
    case "$env" in
        locked)  # what `make test` installs (the Makefile's steps, in a venv of its own)
            "${pip[@]}" --no-deps "torch==$(sed -n 's/^torch==//p' requirements/constraints.in)" "${idx[@]}" \
              && "${pip[@]}" --no-deps --require-hashes -r requirements/test.txt \
              && "${pip[@]}" --no-deps -e .;;
        oldest)
            lower_bounds "$venv/bin/python" >"$venv/constraints.txt"
            "${pip[@]}" --no-deps "torch==$TORCH_OLDEST" "${idx[@]}" \
              && "$venv/bin/python" -m pip list 2>/dev/null | awk '$1 == "torch" {print "torch==" $2}' >>"$venv/constraints.txt" \
              && "${pip[@]}" -c "$venv/constraints.txt" -e ".[test]";;
        newest)
            # PIP_CONSTRAINT= lifts a machine-wide cap; the constraint on the exact installed torch (local
            # label included, e.g. 2.13.0+cpu) keeps the CPU build installed first
            "${pip[@]}" --no-deps "torch==$TORCH_NEWEST" "${idx[@]}" \
              && "$venv/bin/python" -m pip list 2>/dev/null | awk '$1 == "torch" {print "torch==" $2}' >"$venv/constraints.txt" \
              && PIP_CONSTRAINT= "${pip[@]}" --upgrade --upgrade-strategy eager -c "$venv/constraints.txt" -e ".[test]";;
        *) echo "unknown environment '$env' (locked, oldest, newest; 'device' is make device-replica)" >&2; exit 2;;
    esac
    rc=$?
    if [ $rc -ne 0 ]; then echo "$env: install failed (exit $rc)" >&2; status=1; fi
    "$venv/bin/python" -m pip freeze --exclude-editable >"$venv/freeze.txt" 2>/dev/null
    if [ $rc -eq 0 ]; then
        "$venv/bin/python" -m pip check >"$venv/pip_check.txt" 2>&1 || echo "$env: pip check found problems ($venv/pip_check.txt)" >&2
        # the tier without tests/test_install_docs.py: that test checks the records this script writes
        "$venv/bin/python" -m pytest tests -m "not gpu" -q -p no:cacheprovider --junitxml "$venv/junit.xml" \
            --ignore tests/test_install_docs.py \
            >"$venv/pytest.log" 2>&1
        rc=$?
        tail -n 3 "$venv/pytest.log"
        if [ $rc -ne 0 ] && [ -s "$venv/junit.xml" ]; then  # each failure once more, on its own (matrix_record.py)
            mapfile -t again < <("$venv/bin/python" requirements/matrix_record.py --failed "$venv/junit.xml")
            if [ ${#again[@]} -gt 0 ] && [ ${#again[@]} -le 10 ]; then
                echo "$env: re-running ${#again[@]} failed test(s): ${again[*]}"
                "$venv/bin/python" -m pytest "${again[@]}" -q -p no:cacheprovider --junitxml "$venv/rerun.xml" \
                    >"$venv/rerun.log" 2>&1
                tail -n 1 "$venv/rerun.log"
            fi
        fi
    fi
    "$venv/bin/python" requirements/matrix_record.py "$env" "$venv" "$commit" "$rc" \
        | tee /dev/stderr | grep -q '"status": "passed"' || status=1
done
exit $status
