#!/usr/bin/env bash
# The main job (README): builds the package on a fresh clone, then runs the benchmark suite.
# Arguments go to `python -m convlstm_fast.bench` (default: the embedded CPU-sized run, results in
# bench-out/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/.ci/setup-env"
cd "$ROOT"
if [ "$#" -eq 0 ]; then
  set -- --out bench-out
fi
# -P: keep the source tree (no compiled _C, no triton_kernels) off sys.path.
exec "$VENV/bin/python" -P -m convlstm_fast.bench "$@"
