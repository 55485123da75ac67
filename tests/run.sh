#!/usr/bin/env bash
# The test command (README): builds everything from scratch on a fresh clone and runs every suite,
# on every torch/triton pair the project promises (pyproject.toml: torch >= 2.6, triton >= 3.6).
# Each leg runs only what the others do not already prove:
#   1. main — torch 2.14.1 + triton 3.8 (this machine's wheel cache), package built with
#      FORCE_CUDA=1 alone (sm_80 + sm_90 compile check): the main suite, the benchmark cases in
#      quick mode, the Triton interpreter suite (its own process: TRITON_INTERPRET=1 must precede
#      importing triton), the Triton AOT compile check with its resource report, the CUDA kernels
#      in CPU emulation against the reference, and the GPU check's rehearsal;
#   2. the GPU machine's pair — torch 2.11.0 (a CUDA 13.0 build) + triton 3.6.0: the CUDA sources
#      compiled against it for sm_90, the main suite, the interpreter suite, and the AOT compile
#      check whose resource report (spills, occupancy) is what the H200 will run;
#   3. the newest — torch 2.15.0 + triton 3.9.0 (what `pip install` gives a new user): the main
#      suite and the interpreter suite;
#   4. the lowest promised — torch 2.6.0 (its triton 3.2 is below the Triton backend's floor,
#      which must then say so): the main suite.
# GPU-marked tests skip themselves (with a reason) on a machine without CUDA.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
status=0
run() {
  echo "::: $*"
  local started=$SECONDS
  "$@" || { echo "::: FAILED ($?): $*"; status=1; }
  echo "::: $((SECONDS - started)) s"
}

# A fresh Inductor cache: its keys do not cover a custom op's fake (meta) kernel, so graphs compiled
# against an earlier build of the ops could be replayed with stale output shapes.
TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)"
RESULTS="$(mktemp -d)"
export TORCHINDUCTOR_CACHE_DIR
trap 'rm -rf "$TORCHINDUCTOR_CACHE_DIR" "$RESULTS"' EXIT

# `pytest` (not `python -m pytest`) with --import-mode=importlib (pyproject) keeps the source tree
# off sys.path: the tests import the installed package, compiled _C included; `-P` does the same
# for `python -m`.
main_suite() { run "$VENV/bin/pytest" -q tests --ignore=tests/triton; }
interpreter_suite() { run env TRITON_INTERPRET=1 "$VENV/bin/pytest" -q tests/triton; }
# The AOT compile check with its resource report (registers, spills, occupancy; printed, and as
# a table). Not yet with --gate: the kernels miss the spill/occupancy targets on triton 3.6
# (benchmarks/results/triton-resources-sm90-triton3.6.md). A cold compile of the 113 sm_90
# cases takes ~15-30 min on 2 cores (the spilling kernels are ptxas's slowest), so triton 3.8
# checks K = 3 only (--quick) for sm_80 and sm_90, and the GPU machine's triton 3.6 every K for
# sm_90, the H200's target.
compile_check() {
  local name="$1"; shift
  run "$VENV/bin/python" -P -m convlstm_fast.triton_kernels.compile_check \
    --report "$RESULTS/triton-resources-$name.md" "$@"
}
leg() {
  echo "::: leg: $1"
  CONVLSTM_VENV="$ROOT/$2" CONVLSTM_TOOLCHAIN="$3" CONVLSTM_PYPI="$4" CONVLSTM_CUDA="$5" \
    CONVLSTM_CUDA_ARCHS="${6:-}" source .ci/setup-env || { echo "::: FAILED: setup of $1"; status=1; return 1; }
}

if leg "main, torch 2.14.1 + triton 3.8" .venv "torch==2.14.1 triton==3.8.0 numpy" 0 1; then
  main_suite
  run "$VENV/bin/pytest" -q benchmarks --benchmark-disable
  interpreter_suite
  compile_check triton3.8 --arch 80 90 --quick
  run "$VENV/bin/python" csrc/cuda/emulation_check.py --build-dir "$ROOT/build/cuda-emulation"
  run "$VENV/bin/python" benchmarks/gpu_check.py --rehearse --out "$RESULTS/gpu-check-rehearsal"
fi

if leg "GPU machine, torch 2.11.0 + triton 3.6.0" .venv-torch211 \
    "torch==2.11.0 triton==3.6.0 numpy==2.1.3" 1 1 9.0; then
  main_suite
  interpreter_suite
  compile_check triton3.6 --arch 90
fi

if leg "newest, torch 2.15.0 + triton 3.9.0" .venv-torch215 "torch==2.15.0 triton==3.9.0 numpy" 1 0; then
  main_suite
  interpreter_suite
fi

if leg "lowest, torch 2.6.0" .venv-torch26 "torch==2.6.0 numpy" 1 0; then
  main_suite
fi

if [ "$status" = 0 ]; then echo "::: all suites passed"; else echo "::: some suites failed"; fi
exit "$status"
