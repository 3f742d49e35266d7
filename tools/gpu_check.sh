#!/usr/bin/env bash
# The GPU check, one command on a GPU machine without internet (docs/benchmarks.md, "GPU check"): install the wheels
# carried in .gpu_wheels/ (tools/gpu_wheels.sh), run `pytest -m gpu` and the benchmarks at a GPU-sized shape, and
# write one report (versions, pass/fail, ratios, tokens/s, peak memory, MFU) to REPORT_DIR/gpu_report.md.
# Every step has its own time limit; all together stay under 8 minutes on one H100.
# Usage: bash tools/gpu_check.sh [--dry-run] [REPORT_DIR (default runs/gpu_check, or $OUT when set)]
#   --dry-run: on any machine, show what would be installed and run, and the size of the tree that travels.
set -uo pipefail
cd "$(dirname "$0")/.."
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=1
  shift
fi
report_dir="${1:-${OUT:-runs/gpu_check}}"
PYTHON="${PYTHON:-python3}"
wheels=(.gpu_wheels/*.whl)
# name | time limit (s) | command
steps=(
  "gpu tests|200|$PYTHON -m pytest -q -m gpu tests/gpu -rs -p no:cacheprovider"
  "mor-bench model|60|$PYTHON -m mor_megatron.cli.bench model --preset 135m-mor-e-r3 --hidden-size 576 --seq-length 2048 --batch-size 8 --dtype bfloat16 --json"
  "mor-bench train|90|$PYTHON -m mor_megatron.cli.bench train --preset 135m-mor-e-r2 --hidden-size 576 --seq-length 2048 --batch-size 4 --steps 5 --dtype bfloat16 --json"
  "mor-bench infer|60|$PYTHON -m mor_megatron.bench.infer_compare --device cuda --dtype bfloat16 --json"
)

if [ "$dry_run" = 1 ]; then
  echo "gpu_check --dry-run: nothing is installed or run."
  if [ -e "${wheels[0]}" ]; then
    echo "would install without index or dependencies:"
    for wheel in "${wheels[@]}"; do printf '  %6s KiB  %s\n' "$(( $(stat -c %s "$wheel") / 1024 ))" "$wheel"; done
  else
    echo "would install: nothing found in .gpu_wheels/ -- run tools/gpu_wheels.sh first"
  fi
  tracked_kib=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
  wheels_kib=$(du -sk .gpu_wheels 2>/dev/null | cut -f1)
  total_mib=$(( (tracked_kib + ${wheels_kib:-0}) / 1024 ))
  echo "tree that travels: tracked files ${tracked_kib} KiB + .gpu_wheels ${wheels_kib:-0} KiB = ~${total_mib} MiB (limit 64 MiB)"
  echo "would run (PYTHONPATH=$PWD, CUDA visible), report in $report_dir/gpu_report.md:"
  for step in "${steps[@]}"; do
    IFS='|' read -r name limit command <<<"$step"
    printf '  %-16s <= %3ss  %s\n' "$name" "$limit" "$command"
  done
  [ "$total_mib" -lt 64 ]
  exit
fi

mkdir -p "$report_dir"
report="$report_dir/gpu_report.md"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=8
{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PYTHON - <<'EOF' 2>&1
import importlib.metadata as md, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ("megatron-core", "transformers", "transformer-engine", "sentencepiece", "safetensors"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
  echo '```'
} >"$report"
failed=0
# Without CUDA every GPU test would skip and the check would prove nothing.
if ! $PYTHON -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: FAIL: torch sees no CUDA device here" | tee -a "$report"
  failed=1
fi
if [ -e "${wheels[0]}" ]; then
  install=($PYTHON -m pip install --quiet --no-index --no-deps "${wheels[@]}")
  # A system Python marked externally managed (PEP 668) refuses plain installs; the machine is ours for the check.
  if ! "${install[@]}" >>"$report_dir/install.log" 2>&1 \
      && ! "${install[@]}" --break-system-packages >>"$report_dir/install.log" 2>&1; then
    echo "gpu_check: installing the carried wheels failed (see $report_dir/install.log)" | tee -a "$report"
    failed=1
  fi
fi
for step in "${steps[@]}"; do
  IFS='|' read -r name limit command <<<"$step"
  log="$report_dir/${name// /_}.log"
  start=$(date +%s)
  timeout "$limit" $command >"$log" 2>&1
  rc=$?
  [ "$rc" = 0 ] || failed=1
  {
    echo
    echo "## $name: $([ "$rc" = 0 ] && echo PASS || echo "FAIL (exit $rc)") in $(( $(date +%s) - start )) s"
    echo
    echo '```'
    echo "\$ $command"
    tail -n 40 "$log"
    echo '```'
  } >>"$report"
done
echo "gpu_check: report in $report"
exit "$failed"
