#!/usr/bin/env bash
# The default test suite in a second environment, at one end of the supported matrix (README "Supported versions"):
#
#   tools/test-compat.sh [newest]   Python 3.12, torch 2.13.0 (its CUDA build from the index, run on the CPU with
#                                   CUDA_VISIBLE_DEVICES=""), and the newest megatron-core, transformers, DeepSpeed,
#                                   MLflow ... that pyproject's ranges allow, resolved afresh on every run.
#   tools/test-compat.sh lowest     Python 3.12, torch 2.11.0 (what GPU containers such as this project's GPU
#                                   machine ship), and every other direct dependency at the lower end of its range.
#
# Extra arguments go to pytest. The venv (~5 GB) is kept between runs in $MOR_COMPAT_CACHE (default
# ~/.cache/mor_megatron); only its dependencies are cached: this checkout is installed into it on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="newest"
if [ $# -gt 0 ] && [[ "$1" =~ ^(newest|lowest)$ ]]; then
  profile="$1"
  shift
fi
PYTHON312="${PYTHON312:-}"
if [ -z "$PYTHON312" ]; then
  if PYENV_VERSION=3.12.1 python3.12 -c "" 2>/dev/null; then
    PYTHON312="env PYENV_VERSION=3.12.1 python3.12"
  elif command -v python3.12 >/dev/null; then
    PYTHON312="python3.12"
  else
    echo "test-compat: no Python 3.12 found; set PYTHON312=/path/to/python3.12" >&2
    exit 2
  fi
fi
cache="${MOR_COMPAT_CACHE:-$HOME/.cache/mor_megatron}"
venv="$cache/venv-py312-$profile"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT

if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$cache"
  $PYTHON312 -m venv "$venv"
  "${pip[@]}" install --upgrade pip
fi
if [ "$profile" = "newest" ]; then
  echo "torch==2.13.0" >"$constraints"
  # Eager upgrades: every dependency moves to the newest release its range allows, as a fresh install would.
  "${pip[@]}" install --upgrade --upgrade-strategy eager -c "$constraints" "torch==2.13.0"
  "${pip[@]}" install --upgrade --upgrade-strategy eager -c "$constraints" -e ".[test]"
else
  # torch 2.11.0 and each `name>=X` of pyproject's dependencies pinned to X.
  "$venv/bin/python" - "$constraints" <<'EOF'
import re
import sys
import tomllib

dependencies = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
pins = {"torch": "2.11.0"}
for requirement in dependencies:
    name, lowest = re.match(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", requirement).groups()
    pins.setdefault(name, lowest)
open(sys.argv[1], "w").write("".join(f"{name}=={version}\n" for name, version in pins.items()))
EOF
  "${pip[@]}" install -c "$constraints" "torch==2.11.0"
  "${pip[@]}" install -c "$constraints" -e ".[test]"
fi
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md

names = ("torch", "megatron-core", "transformers", "deepspeed", "mlflow", "numpy", "huggingface_hub")
print("test-compat:", ", ".join(f"{name} {md.version(name)}" for name in names))
EOF
export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
exec "$venv/bin/python" -m pytest -q -m "not slow and not gpu" "$@"
