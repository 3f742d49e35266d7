#!/usr/bin/env bash
# Set up the environment (tools/setup.sh) and run the default test suite: unit, model and multi-process CPU
# tests. Slow and GPU tests are excluded here; run them with `-m slow` / `-m gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q -m "not slow and not gpu" "$@"
