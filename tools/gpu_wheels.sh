#!/usr/bin/env bash
# Download, here (with internet), the wheels a GPU machine without internet lacks, into .gpu_wheels/ (git-ignored;
# carried to the GPU machine with the working tree). The target is the project's GPU machine: Python 3.12,
# manylinux x86_64, torch/transformers/safetensors/sentencepiece/pytest already installed (docs/benchmarks.md).
# No MLflow or DeepSpeed: the GPU check trains with tracking off (JSONL only), which imports neither.
# Usage: bash tools/gpu_wheels.sh [megatron-core version, default 0.19.2]
set -euo pipefail
cd "$(dirname "$0")/.."
MCORE_VERSION="${1:-0.19.2}"
OUT=.gpu_wheels
LIMIT_MIB=40   # the whole tree that travels is limited to 64 MiB
PYTHON="${PYTHON:-.venv/bin/python}"
rm -rf "$OUT"
mkdir -p "$OUT"
# matplotlib and its own dependencies: the trainer draws a depth map (PNG) at each evaluation.
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --dest "$OUT" \
  "megatron-core==$MCORE_VERSION" "pyyaml>=6.0.1" "einops" "psutil>=5.9" "pytest-timeout>=2.3" \
  "matplotlib>=3.11.2" contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil six
size_mib=$(du -sm "$OUT" | cut -f1)
ls -1 "$OUT"
echo "gpu_wheels: ${size_mib} MiB in $OUT"
if [ "$size_mib" -gt "$LIMIT_MIB" ]; then
  echo "gpu_wheels: more than ${LIMIT_MIB} MiB; the working tree sent to the GPU machine must stay under 64 MiB" >&2
  exit 1
fi
