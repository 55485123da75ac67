#!/usr/bin/env bash
# GPU check of convlstm_fast on a fresh GPU machine (torch + triton preinstalled, no internet).
#
# usage: benchmarks/gpu_check.sh [OUT_DIR] [STAGE ...]
#   OUT_DIR  folder for logs, JSON and PNG (default: $OUT if set, else ./gpu_check_out)
#   STAGE    build | sanitizer | bench | all (default: all, in that order)
#
# Stages (each under a 10-minute timeout, all three within 20 minutes; a failing stage does not
# stop the next one; the exit status is 1 if any stage failed):
#   build      pip install --no-deps --no-build-isolation -e . (CUDA kernels compiled for this
#              GPU's architecture), then `pytest -m gpu` (JUnit XML in OUT_DIR)
#   sanitizer  compute-sanitizer memcheck, then racecheck, each ONE process running
#              benchmarks/sanitizer_cases.py (small cases of every CUDA op, forward + backward)
#   bench      python -m convlstm_fast.bench --paper --out OUT_DIR (JSON, markdown, PNG)
# Environment: PYTHON (default python), STAGE_TIMEOUT (seconds, default 590),
# SANITIZER_BACKENDS (default cuda; e.g. cuda,triton).
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${1:-}" in
  ""|build|sanitizer|bench|all) OUT_DIR="${OUT:-$PWD/gpu_check_out}" ;;
  *) OUT_DIR="$1"; shift ;;
esac
STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ] || [ "${STAGES[0]}" = "all" ]; then
  STAGES=(build sanitizer bench)
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PYTHON="${PYTHON:-python}"
STAGE_TIMEOUT="${STAGE_TIMEOUT:-590}"
SUMMARY="$OUT_DIR/summary.txt"
cd "$REPO" || exit 1

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$SUMMARY"; }

# Runs "$@" with the stage timeout, output to OUT_DIR/<name>.log; records the status.
run_stage() {
  local name="$1"; shift
  local started=$SECONDS
  log "stage $name: start"
  timeout --kill-after=10 "$STAGE_TIMEOUT" "$@" > "$OUT_DIR/$name.log" 2>&1
  local status=$?
  local verdict=ok
  if [ $status -eq 124 ] || [ $status -eq 137 ]; then verdict="TIMEOUT"; elif [ $status -ne 0 ]; then verdict="FAILED"; fi
  log "stage $name: $verdict (exit $status, $((SECONDS - started)) s, log $OUT_DIR/$name.log)"
  [ "$verdict" = ok ]
}

stage_build() {
  local arch
  arch="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" FORCE_CUDA=1
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  echo "== environment"; nvidia-smi || true
  "$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
  echo "== pip install (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  "$PYTHON" -m pip install --no-deps --no-build-isolation -e . || return 1
  "$PYTHON" -m convlstm_fast.info || true
  echo "== pytest -m gpu"
  # From OUT_DIR, so that the source tree is not first on sys.path (ENVIRONMENT.md).
  cd "$OUT_DIR" && "$PYTHON" -m pytest "$REPO/tests" -m gpu -q -ra --import-mode=importlib \
    -p no:cacheprovider --junitxml="$OUT_DIR/pytest-gpu.xml"
}

stage_sanitizer() {
  local sanitizer
  sanitizer="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
  local backends="${SANITIZER_BACKENDS:-cuda}"
  local status=0
  echo "== memcheck ($sanitizer)"
  "$sanitizer" --tool memcheck --error-exitcode 1 --leak-check no \
    "$PYTHON" "$REPO/benchmarks/sanitizer_cases.py" --backends "$backends" || status=1
  echo "== racecheck"
  "$sanitizer" --tool racecheck --error-exitcode 1 --racecheck-report hazard \
    "$PYTHON" "$REPO/benchmarks/sanitizer_cases.py" --backends "$backends" || status=1
  return $status
}

stage_bench() {
  # The suite stops starting new cases after --time-budget seconds, so it writes its JSON and
  # plots before the stage timeout.
  cd "$OUT_DIR" && "$PYTHON" -m convlstm_fast.bench --paper --out "$OUT_DIR" --no-progress \
    --time-budget $(( STAGE_TIMEOUT > 180 ? STAGE_TIMEOUT - 90 : STAGE_TIMEOUT / 2 ))
}

failed=0
for stage in "${STAGES[@]}"; do
  case "$stage" in
    build) run_stage build bash -c "$(declare -f stage_build); PYTHON='$PYTHON' OUT_DIR='$OUT_DIR' REPO='$REPO' stage_build" || failed=1 ;;
    sanitizer) run_stage sanitizer bash -c "$(declare -f stage_sanitizer); PYTHON='$PYTHON' REPO='$REPO' stage_sanitizer" || failed=1 ;;
    bench) run_stage bench bash -c "$(declare -f stage_bench); PYTHON='$PYTHON' OUT_DIR='$OUT_DIR' STAGE_TIMEOUT='$STAGE_TIMEOUT' stage_bench" || failed=1 ;;
    *) log "unknown stage $stage (build | sanitizer | bench | all)"; failed=1 ;;
  esac
done
log "done; outputs in $OUT_DIR"
exit $failed
