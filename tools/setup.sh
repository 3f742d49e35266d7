#!/usr/bin/env bash
# Create .venv and install mor_megatron with its test tools. Idempotent: a second run only checks.
# The package declares ranges (pyproject.toml); the one exact pin is here: torch 2.13.0, which on the project's
# machines is a CPU wheel already on disk, so nothing here downloads a CUDA build. In a GPU container that
# already has torch and megatron-core in range, `pip install -e .` keeps them (tests/unit/test_packaging.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -c "import torch, megatron.core, mor_megatron; print('mor_megatron env ready: torch', torch.__version__)"
