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
exec "$VENV/bin/python" -m convlstm_fast.bench "$@"
