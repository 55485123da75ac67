#!/usr/bin/env bash
# The GPU proof in one call: `bash benchmarks/gpu_check.sh [--rehearse] [--out DIR] [STAGE ...]`.
# Everything is in benchmarks/gpu_check.py (its docstring lists the stages, budget and outputs);
# this wrapper only picks the Python that has torch (PYTHON, else python3).
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/gpu_check.py" "$@"
