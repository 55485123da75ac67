#!/usr/bin/env bash
# The test command (README): builds everything from scratch on a fresh clone and runs every suite.
#   1. main environment: torch 2.14.1 + triton 3.8, package built with the CUDA kernels compiled for
#      sm_80/sm_90 (compile check), then the main suite, the benchmark cases in quick mode, the
#      Triton interpreter suite (its own process: TRITON_INTERPRET=1 must precede importing triton),
#      the Triton ahead-of-time compile check for sm_80/sm_90, and the CUDA kernels run in CPU
#      emulation against the reference;
#   2. the GPU machine's triton (3.6) with the CPU build of torch 2.13: interpreter suite and
#      compile check again.
# GPU-marked tests skip themselves (with a reason) on a machine without CUDA.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
status=0
run() {
  echo "::: $*"
  "$@" || { echo "::: FAILED ($?): $*"; status=1; }
}

# A fresh Inductor cache: its keys do not cover a custom op's fake (meta) kernel, so graphs compiled
# against an earlier build of the ops could be replayed with stale output shapes.
TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)"
export TORCHINDUCTOR_CACHE_DIR
trap 'rm -rf "$TORCHINDUCTOR_CACHE_DIR"' EXIT

CONVLSTM_CUDA=1 source .ci/setup-env || exit 1
PY="$VENV/bin/python"  # with -P for -m: the source tree must not shadow the installed package
# `pytest` (not `python -m pytest`) with --import-mode=importlib (pyproject) keeps the source tree
# off sys.path: the tests import the installed package, compiled _C included.
run "$VENV/bin/pytest" -q tests --ignore=tests/triton
run "$VENV/bin/pytest" -q benchmarks --benchmark-disable
run env TRITON_INTERPRET=1 "$VENV/bin/pytest" -q tests/triton
run "$PY" -P -m convlstm_fast.triton_kernels.compile_check
# The CUDA kernels' host drivers and kernel bodies, built in CPU emulation, against the reference.
run env CUDA_HOME="${CUDA_HOME:-/usr/local/cuda-13.0}" "$PY" csrc/cuda/emulation_check.py \
  --build-dir "$ROOT/build/cuda-emulation"

VENV36="${CONVLSTM_VENV36:-$ROOT/.venv-triton36}"
[ -x "$VENV36/bin/python" ] || python3 -m venv "$VENV36"
run "$VENV36/bin/python" -m pip install -q --disable-pip-version-check \
  torch==2.13.0 triton==3.6.0 numpy==2.1.3 "setuptools>=64" wheel ninja pytest expecttest hypothesis
run env MAX_JOBS=2 TORCH_CUDA_ARCH_LIST= FORCE_CUDA=0 "$VENV36/bin/python" -m pip install -q \
  --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall "$ROOT"
run env TRITON_INTERPRET=1 "$VENV36/bin/pytest" -q tests/triton
run "$VENV36/bin/python" -P -m convlstm_fast.triton_kernels.compile_check

if [ "$status" = 0 ]; then echo "::: all suites passed"; else echo "::: some suites failed"; fi
exit "$status"
