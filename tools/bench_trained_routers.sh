#!/usr/bin/env bash
# Serving throughput with trained routers, as the paper measures it (MoR-E N_r=4 vs the vanilla model of the same
# unrolled depth): trains tiny-mor-e-r4 (1 + 2 x 4 + 1 layers) and a 10-layer vanilla model on the demo data for
# the same steps, exports both to Hugging Face folders and runs `mor-bench infer` on the exports. A few minutes on
# a 2-core CPU. Needs the demo data: run `bash tools/demo.sh` first (or set DATA to a folder with stdlib.bin/.idx
# and tokenizer/). Extra arguments go to mor-bench infer, e.g. --json or --device cuda --dtype bfloat16.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-runs/demo/data}"
OUT="${OUT:-runs/bench_trained}"
STEPS="${STEPS:-300}"
PY=.venv/bin/python
[ -f "$DATA/stdlib.idx" ] || { echo "bench_trained_routers: no $DATA/stdlib.idx; run bash tools/demo.sh first" >&2; exit 2; }
export OMP_NUM_THREADS=1
train() {  # train NAME OVERRIDES...: one model on the demo data, exported to $OUT/NAME/hf
  local name=$1
  shift
  if [ ! -f "$OUT/$name/hf/config.json" ]; then
    .venv/bin/torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-29511}" \
      -m mor_megatron.pretrain --config configs/demo.yaml "data.blend=[$DATA/stdlib]" \
      "data.tokenizer=$DATA/tokenizer/tokenizer.model" "train.train_steps=$STEPS" "output_dir=$OUT/$name" \
      tracking.enabled=false "$@" >"$OUT/$name.train.log" 2>&1
    $PY -m mor_megatron.cli.convert to-hf "$OUT/$name/checkpoints" "$OUT/$name/hf" --overwrite \
      >"$OUT/$name.convert.log" 2>&1
  fi
  echo "bench_trained_routers: $name: $(grep -o 'validation at step [0-9]* | lm loss [0-9.]*' "$OUT/$name.train.log" | tail -1)"
}
mkdir -p "$OUT"
train mor preset=tiny-mor-e-r4
train vanilla preset=tiny-vanilla model.num_layers=10
$PY -m mor_megatron.cli.bench infer --mor-dir "$OUT/mor/hf" --vanilla-dir "$OUT/vanilla/hf" "$@"
