#!/usr/bin/env bash
# The pictures in docs/images/, made from the demo run (run `bash tools/demo.sh` first):
#   depth_demo.png       mor-viz depth of a code snippet, from the demo's Hugging Face export (causal routing)
#   depth_demo_html.png  the same depth map's HTML page, as a browser shows it
#   mlflow_runs.png      the demo's experiment in the MLflow UI (Dataset column, metrics)
#   mlflow_run.png       the demo run's page in the MLflow UI
# Screenshots need a headless Chromium (Debian: `apt-get install chromium`); CI never runs this script.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=runs/demo
OUT=docs/images
PY=.venv/bin/python
CHROMIUM="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}"
[ -d "$RUN/hf" ] && [ -f "$RUN/mlflow.db" ] || { echo "docs_pictures: run bash tools/demo.sh first" >&2; exit 2; }
[ -n "$CHROMIUM" ] || { echo "docs_pictures: no chromium found (Debian: apt-get install chromium)" >&2; exit 2; }
mkdir -p "$OUT"
scratch="$(mktemp -d)"
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  rm -rf "$scratch"
}
trap cleanup EXIT

shot() {  # shot URL FILE WIDTH HEIGHT: a page after its scripts ran (the MLflow UI renders client-side)
  "$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --virtual-time-budget=15000 \
    --window-size="$3,$4" --screenshot="$2" "$1" >/dev/null 2>&1
  echo "docs_pictures: $2"
}

$PY -m mor_megatron.cli.viz depth --model "$RUN/hf" --out "$scratch/depth" --text 'def mean(values):
    """Average of a list."""
    return sum(values) / len(values)
' 2>/dev/null
cp "$scratch/depth/depth.png" "$OUT/depth_demo.png"
echo "docs_pictures: $OUT/depth_demo.png"
shot "file://$(realpath "$scratch/depth/depth.html")" "$OUT/depth_demo_html.png" 1100 700

port=$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
.venv/bin/mlflow server --backend-store-uri "sqlite:///$(realpath "$RUN/mlflow.db")" --host 127.0.0.1 \
  --port "$port" --workers 1 >"$scratch/mlflow.log" 2>&1 &
server_pid=$!
for _ in $(seq 60); do
  curl -fs "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 1
done
curl -fs "http://127.0.0.1:$port/health" >/dev/null || { echo "docs_pictures: mlflow server did not start" >&2; exit 1; }
read -r experiment run < <($PY - "$RUN/mlflow.db" <<'EOF'
import sys
from mlflow.tracking import MlflowClient

client = MlflowClient(f"sqlite:///{sys.argv[1]}")
run = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1)[0]
print(run.info.experiment_id, run.info.run_id)
EOF
)
shot "http://127.0.0.1:$port/#/experiments/$experiment/runs" "$OUT/mlflow_runs.png" 1400 700
shot "http://127.0.0.1:$port/#/experiments/$experiment/runs/$run" "$OUT/mlflow_run.png" 1400 1000
