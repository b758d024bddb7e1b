#!/usr/bin/env bash
# The GPU check of erpo, for whoever next has an NVIDIA GPU: every GPU test, the benchmark sweep, and the
# measured figures against the static report's predicted ones, in ONE call of at most 10 minutes. From the
# repository root:
#
#     bash bench/gpu_check.sh
#
# Needs: a CUDA build of torch (tested against torch 2.11 + triton 3.6 and later) with a visible GPU, the
# test extras already installed; nvcc on PATH (or CUDA_HOME) for the CUDA extension and the CUDA half of
# the static report (both are skipped, and reported, without it). Nothing is downloaded and torch/triton
# are never replaced: the extension is built with --no-deps --no-build-isolation against the machine's torch.
#
# Time: the whole script keeps to ERPO_GPU_CHECK_BUDGET_S seconds (default 570, under a 10-minute remote
# command). Every long step runs under `timeout` with what is left of the budget, so a slow step is cut and
# reported, never the whole call; the benchmark runs in pieces (most important first) merged into one
# results.json, and a piece that does not fit is listed as not run. Set-up (installing the test extras) is
# not part of this script: `pip install --no-deps -e ".[test]"` beforehand takes about a minute.
#
# Steps, each logged under bench/results/gpu-check-<UTC stamp>/ (override with ERPO_GPU_CHECK_OUT):
#   1. versions                                        -> gpu_check.log, pip_freeze.txt
#   2. in the background (CPU only): the static report for this machine's triton -> static/static.{md,json}
#   3. build the CUDA extension erpo._C for this GPU's architecture only   -> build.log
#   4. GPU tests: tests/ops tests/losses tests/csrc with the fixed Triton configuration (ERPO_TRITON_AUTOTUNE=0:
#      many shapes, no tuning runs), then tests/kernels with autotuning on (the production block, split-V)
#                                                      -> pytest.log, pytest.xml, pytest-kernels.{log,xml}
#   5. benchmark sweep `python -m bench --preset gpu`, in pieces (dtype x V, and the fused-head "linear" kind)
#                                                      -> bench/results.{json,md}, plots
#      Extra arguments go in ERPO_BENCH_ARGS (e.g. "--n 4096,16384" for a shorter sweep).
#   6. measured vs PREDICTED fraction of HBM bandwidth (bench/gpu_compare.py) -> measured_vs_predicted.md
#   7. CUDA op vs Triton op per shape (issue 7: forward+backward within 10%)  -> cuda_vs_triton.md
# Exit status: 0 when every step passed; the number of the first failed step otherwise (later steps still
# run where they can). Commit the output folder with the results.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

START=$(date +%s)
BUDGET=${ERPO_GPU_CHECK_BUDGET_S:-570}
left() { echo $((START + BUDGET - $(date +%s))); }
# run_for RESERVE CMD...: CMD under `timeout`, leaving RESERVE seconds of the budget for the steps after it.
run_for() {
    local reserve=$1; shift
    local t=$(( $(left) - reserve ))
    if [ "$t" -lt 10 ]; then echo "SKIPPED (budget): $*"; return 124; fi
    timeout --signal=INT --kill-after=15 "$t" "$@"
}

OUT="${ERPO_GPU_CHECK_OUT:-bench/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
failed=0
fail() { echo "FAILED: $2"; [ "$failed" -ne 0 ] || failed=$1; }
step() { echo; echo "=== $(date -u +%H:%M:%S) (+$(( $(date +%s) - START ))s of ${BUDGET}s) $*"; }

step "1. versions"
git log -1 --format='commit %H %cd' 2>/dev/null || true
nvidia-smi || echo "nvidia-smi not available (torch decides below whether a GPU is visible)"
nvcc --version || echo "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset}); the build needs it"
python - <<'EOF' || { echo "this check needs a CUDA build of torch with a visible GPU"; exit 1; }
import sys
import torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuda available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as err:
    print("triton not importable:", err)
if not (torch.version.cuda and torch.cuda.is_available()):
    sys.exit(1)
print("GPU", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
python -m pip freeze 2>/dev/null | grep -iE '^(torch|triton|nvidia-|numpy|setuptools|ninja)' \
    > "$OUT/pip_freeze.txt" || true

step "2. static report (background, CPU only)"
static_args=()
command -v nvcc >/dev/null || static_args=(--no-cuda)
env -u TRITON_INTERPRET timeout 300 python -m bench.static --out "$OUT/static" "${static_args[@]}" \
    > "$OUT/static.log" 2>&1 &
static_pid=$!

step "3. build erpo._C"
# This GPU's architecture only: a build for every architecture would take minutes of the budget.
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
export TORCH_CUDA_ARCH_LIST MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# --no-deps: keep the machine's torch and triton; --no-build-isolation: build against that torch.
if ERPO_BUILD_CUDA=1 run_for 420 python -m pip install -v -e . --no-deps --no-build-isolation > "$OUT/build.log" 2>&1 \
    && python -c "import erpo._C as c; print('built', c.__file__)"; then
    grep -E "ptxas|warning" "$OUT/build.log" | head -40 || true
else
    tail -60 "$OUT/build.log"
    fail 3 "the extension did not build or import (full log: $OUT/build.log)"
fi

step "4. GPU tests"
# ERPO_BUILD_CUDA=0: tests that pip-install erpo elsewhere need not compile the extension again.
ERPO_BUILD_CUDA=0 ERPO_TRITON_AUTOTUNE=0 run_for 300 python -m pytest tests/ops tests/losses tests/csrc -q -ra \
    -p no:cacheprovider --junitxml="$OUT/pytest.xml" > "$OUT/pytest.log" 2>&1
status=$?
tail -25 "$OUT/pytest.log"
[ "$status" -eq 0 ] || fail 4 "tests/ops, tests/losses, tests/csrc (see $OUT/pytest.log)"
ERPO_BUILD_CUDA=0 run_for 240 python -m pytest tests/kernels -q -ra -p no:cacheprovider \
    --ignore=tests/kernels/test_static_report.py \
    --junitxml="$OUT/pytest-kernels.xml" > "$OUT/pytest-kernels.log" 2>&1
status=$?
tail -15 "$OUT/pytest-kernels.log"
[ "$status" -eq 0 ] || fail 4 "tests/kernels with autotuning (see $OUT/pytest-kernels.log)"
python - <<'EOF' | tee -a "$OUT/pytest.log"
import importlib.util
import torch
ops = importlib.util.find_spec("erpo._C") is not None and torch.cuda.is_available()
print("backend='cuda' was", "INCLUDED in" if ops else "NOT included in", "tests/ops")
EOF

step "5. benchmark sweep (python -m bench --preset gpu ${ERPO_BENCH_ARGS:-}), in pieces"
not_run=()
for piece in bfloat16:151936 bfloat16:32000 linear float32:151936 bfloat16:128256 float32:32000 float32:128256; do
    if [ "$piece" = linear ]; then  # the fused-head (linear) cases, on the preset's own shapes
        run_for 45 python -m bench --preset gpu --kinds linear --out "$OUT/bench" --merge --no-plots
    else
        dtype=${piece%%:*}; vocab=${piece##*:}
        # shellcheck disable=SC2086  # ERPO_BENCH_ARGS is a list of arguments
        run_for 45 python -m bench --preset gpu --dtypes "$dtype" --v "$vocab" --out "$OUT/bench" --merge \
            --no-plots ${ERPO_BENCH_ARGS:-}
    fi
    status=$?
    if [ "$status" -eq 124 ] || [ "$status" -eq 130 ]; then
        not_run+=("$piece"); echo "cut by the budget: $piece"
    elif [ "$status" -ne 0 ]; then
        fail 5 "the benchmark sweep (piece $piece)"
    fi
done
[ "${#not_run[@]}" -eq 0 ] || fail 5 "benchmark pieces not run within the budget: ${not_run[*]} (rerun them with --merge)"
if [ -f "$OUT/bench/results.json" ]; then
    timeout 30 python -c "import json, sys; from bench import report; s = json.load(open(sys.argv[1])); report.plots(s, sys.argv[2])" \
        "$OUT/bench/results.json" "$OUT/bench" || echo "plots not written"
fi

step "6. measured vs predicted"
wait "$static_pid"
static_status=$?
tail -3 "$OUT/static.log"
[ "$static_status" -eq 0 ] || fail 6 "the static report failed (spills or errors; see $OUT/static.log)"
if [ -f "$OUT/bench/results.json" ] && [ -f "$OUT/static/static.json" ]; then
    python -m bench.gpu_compare predicted "$OUT/bench/results.json" "$OUT/static/static.json" \
        | tee "$OUT/measured_vs_predicted.md"
    [ "${PIPESTATUS[0]}" -eq 0 ] || fail 6 "measured below 70% of the prediction at N >= 4096 (see $OUT/measured_vs_predicted.md)"
else
    fail 6 "no $OUT/bench/results.json or $OUT/static/static.json to compare"
fi

step "7. cuda vs triton"
if [ -f "$OUT/bench/results.json" ]; then
    python -m bench.gpu_compare cuda "$OUT/bench/results.json" | tee "$OUT/cuda_vs_triton.md"
    [ "${PIPESTATUS[0]}" -eq 0 ] || fail 7 "the CUDA op is not within 10% of Triton everywhere (see $OUT/cuda_vs_triton.md)"
else
    fail 7 "no $OUT/bench/results.json to compare"
fi

step "done: results in $OUT (exit status $failed)"
exit "$failed"
