#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): every CUDA path once, in under 8 minutes, on one GPU.
#   scripts/gpu-check.sh                        # on a machine with one CUDA GPU
#   scripts/gpu-check.sh --device cpu --quick   # the CPU rehearsal (tests/test_gpu_check.py)
# PYTHON picks the interpreter (default: .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
exec "$PYTHON" scripts/gpu_check.py "$@"
