#!/usr/bin/env bash
# The test command (README): builds everything from scratch on a fresh clone and runs every suite,
# on the torch/triton pairs that bracket what the project promises (pyproject.toml: torch >= 2.6,
# triton >= 3.6). Each leg runs only what the others do not already prove:
#   1. the GPU machine's pair — torch 2.11.0 (a CUDA 13.0 build) + triton 3.6.0, the package built
#      with FORCE_CUDA=1 alone (sm_80 + sm_90, the H200's among them): the main suite, the Triton interpreter suite (its
#      own process: TRITON_INTERPRET=1 must precede importing triton) beside the Triton AOT compile
#      check of every kernel for sm_90 with its resource report, the CUDA kernels in CPU emulation
#      against the reference, their static resources for sm_90 (ptxas -v; fails on a spill), and
#      the GPU check's rehearsal;
#   2. the newest — torch 2.15.0 + triton 3.9.0 (what `pip install` gives a new user), built
#      without CUDA (one CUDA build, ~15 min on 2 cores, is what the budget affords): the main
#      suite, the benchmark cases in quick mode, the interpreter suite beside the compile check
#      (sm_80 and sm_90, K = 3);
#   3. the lowest promised — torch 2.6.0 (its triton 3.2 is below the Triton backend's floor,
#      which must then say so): the main suite.
# The interpreter suite and the compile check run side by side (the check is done in 1-2 min). CI gives this 90 minutes on 2 cores; the last line prints each
# step's seconds again, so that a slow step shows before it costs a timeout.
# CONVLSTM_CI_LEGS (e.g. "2 3") runs only those legs.
# Each environment is 5-6 GB (torch and its CUDA libraries): a leg deletes the one it created
# once its suites are done, so the run needs the disk of one at a time (three at once filled CI's
# disk in leg 3); an environment the run found is kept and reused, and CONVLSTM_KEEP_VENVS=1
# keeps them all. pip's wheel cache is off for the same reason (PIP_NO_CACHE_DIR, unless set).
# GPU-marked tests skip themselves (with a reason) on a machine without CUDA.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
status=0
TIMES=()
run() {
  echo "::: $*"
  local started=$SECONDS
  "$@" || { echo "::: FAILED ($?): $*"; status=1; }
  echo "::: $((SECONDS - started)) s"
  TIMES+=("$((SECONDS - started)) s  $*")
}

# A fresh Inductor cache: its keys do not cover a custom op's fake (meta) kernel, so graphs compiled
# against an earlier build of the ops could be replayed with stale output shapes.
TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)"
RESULTS="$(mktemp -d)"
export TORCHINDUCTOR_CACHE_DIR
trap 'rm -rf "$TORCHINDUCTOR_CACHE_DIR" "$RESULTS"' EXIT

# One command in the background (its output kept until it ends), then in the foreground what
# runs beside it; `joined` waits for the background one and prints its output.
beside() {
  local name="$1"; shift
  ( status=0; run "$@"; printf '%s\n' "${TIMES[-1]}" >"$RESULTS/$name.time"; exit "$status" ) \
    >"$RESULTS/$name.log" 2>&1 &
  BESIDE_PID=$!
  BESIDE_NAME=$name
  echo "::: (in the background: $*)"
}
joined() {
  wait "$BESIDE_PID" || status=1
  cat "$RESULTS/$BESIDE_NAME.log"
  [ -f "$RESULTS/$BESIDE_NAME.time" ] && TIMES+=("$(cat "$RESULTS/$BESIDE_NAME.time") (beside)")
}

# `pytest` (not `python -m pytest`) with --import-mode=importlib (pyproject) keeps the source tree
# off sys.path: the tests import the installed package, compiled _C included; `-P` does the same
# for `python -m`.
# Both suites run in two pytest-xdist processes of one torch thread each (OMP_NUM_THREADS=1): CI's
# two cores are each busy with a test instead of one process's interpreter or small ops leaving
# the other idle (a rehearsal on 2 cores, triton 3.9: the interpreter suite 930 s beside the
# compile check instead of 1,388 s, the main suite 194 s instead of 277 s). A test that needs
# threads of its own sets them.
PYTEST_PROCESSES="${CONVLSTM_PYTEST_PROCESSES:-2}"
main_suite() {
  run env OMP_NUM_THREADS=1 "$VENV/bin/pytest" -q -n "$PYTEST_PROCESSES" tests --ignore=tests/triton
}
interpreter_suite() {
  run env OMP_NUM_THREADS=1 TRITON_INTERPRET=1 "$VENV/bin/pytest" -q -n "$PYTEST_PROCESSES" \
    tests/triton
}
# The AOT compile check with its resource report (registers, spills, occupancy; printed, and as
# a table), with --gate: a register spill of a 16-bit kernel at K <= 5 or of an fp32 kernel at
# K = 3, or a forward step kernel under 25 % occupancy, on sm_90, fails the leg
# (benchmarks/results/triton-resources-*.md). A cold compile of the 113 sm_90
# cases takes 1-30 min on 2 cores (spilling kernels are ptxas's slowest), so the GPU
# machine's triton 3.6 checks every K for sm_90, the H200's target, and the newest triton K = 3
# (--quick) for sm_80 and sm_90.
compile_check() {
  local name="$1"; shift
  beside "compile-$name" "$VENV/bin/python" -P -m convlstm_fast.triton_kernels.compile_check \
    --gate --report "$RESULTS/triton-resources-$name.md" "$@"
}
LEGS="${CONVLSTM_CI_LEGS:-1 2 3}"
export PIP_NO_CACHE_DIR="${PIP_NO_CACHE_DIR:-1}"
CREATED_VENV=
leg() {
  case " $LEGS " in *" $1 "*) ;; *) return 1 ;; esac
  shift
  echo "::: leg: $1"
  local started=$SECONDS
  CREATED_VENV=
  [ -x "$ROOT/$2/bin/python" ] || [ "${CONVLSTM_KEEP_VENVS:-0}" = 1 ] || CREATED_VENV="$ROOT/$2"
  CONVLSTM_VENV="$ROOT/$2" CONVLSTM_TOOLCHAIN="$3" CONVLSTM_PYPI="$4" CONVLSTM_CUDA="$5" \
    CONVLSTM_CUDA_ARCHS="${6:-}" source .ci/setup-env || { echo "::: FAILED: setup of $1"; status=1; return 1; }
  TIMES+=("$((SECONDS - started)) s  setup of $1")
}
leg_done() {
  if [ -n "$CREATED_VENV" ]; then
    echo "::: removing $CREATED_VENV ($(du -sh "$CREATED_VENV" | cut -f1)), created by this run"
    rm -rf "$CREATED_VENV"
    CREATED_VENV=
  fi
  echo "::: disk: $(df -h --output=avail "$ROOT" | tail -1 | tr -d ' ') free"
}

if leg 1 "GPU machine, torch 2.11.0 + triton 3.6.0" .venv-torch211 \
    "torch==2.11.0 triton==3.6.0 numpy==2.1.3" 1 1; then
  main_suite
  compile_check triton3.6 --arch 90
  interpreter_suite
  joined
  run "$VENV/bin/python" csrc/cuda/emulation_check.py --build-dir "$ROOT/build/cuda-emulation"
  run "$VENV/bin/python" csrc/cuda/resource_report.py --report "$RESULTS/cuda-resources-sm90.md"
  run "$VENV/bin/python" benchmarks/gpu_check.py --rehearse --out "$RESULTS/gpu-check-rehearsal"
fi
leg_done

if leg 2 "newest, torch 2.15.0 + triton 3.9.0" .venv-torch215 "torch==2.15.0 triton==3.9.0 numpy" 1 0; then
  main_suite
  run "$VENV/bin/pytest" -q benchmarks --benchmark-disable
  compile_check triton3.9 --arch 80 90 --quick
  interpreter_suite
  joined
fi
leg_done

if leg 3 "lowest, torch 2.6.0" .venv-torch26 "torch==2.6.0 numpy" 1 0; then
  main_suite
fi
leg_done

echo "::: seconds per step"
printf ':::   %s\n' "${TIMES[@]}"
echo "::: $SECONDS s in all"
if [ "$status" = 0 ]; then echo "::: all suites passed"; else echo "::: some suites failed"; fi
exit "$status"
