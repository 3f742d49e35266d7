#!/usr/bin/env bash
# The embedded demo, end to end on CPU: Python-stdlib corpus -> SentencePiece tokenizer -> Megatron .bin/.idx
# -> a tiny MoR-E (N_r = 3) trained on 2 gloo processes with torchrun -> local MLflow run -> greedy samples
# -> Hugging Face export -> generate() with the recursion-wise KV cache.
# Usage: bash tools/demo.sh [key=value overrides for configs/demo.yaml ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export OMP_NUM_THREADS=1
DATA=runs/demo/data
RUN=runs/demo
PY=.venv/bin/python
mkdir -p "$DATA"
[ -f "$DATA/corpus.jsonl" ] || $PY -m mor_megatron.cli.data corpus --output "$DATA/corpus.jsonl" --max-mb 4
[ -f "$DATA/tokenizer/tokenizer.model" ] || \
  $PY -m mor_megatron.cli.data tokenizer --input "$DATA/corpus.jsonl" --output-dir "$DATA/tokenizer" --vocab-size 2048
[ -f "$DATA/stdlib.idx" ] || \
  $PY -m mor_megatron.cli.data preprocess --input "$DATA/corpus.jsonl" --tokenizer "$DATA/tokenizer" \
    --output-prefix "$DATA/stdlib" --workers 2 --quiet
ARGS=(--config configs/demo.yaml "data.blend=[$DATA/stdlib]" "data.tokenizer=$DATA/tokenizer/tokenizer.model" "$@")
$PY -m mor_megatron.pretrain --check "${ARGS[@]}"
# The console (banner, iterations, summary) is also kept in the run folder and uploaded to MLflow under logs/.
export MOR_STDOUT_LOG="$RUN/train.stdout.log"
.venv/bin/torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-29500}" \
  -m mor_megatron.pretrain "${ARGS[@]}" 2> "$RUN/train.stderr.log" | tee "$MOR_STDOUT_LOG"
$PY -m mor_megatron.inference.sample --run-dir "$RUN" --prompt "def " --prompt "import " --max-new-tokens 40 \
  --temperature 0.8 --top-k 40 --seed 0 \
  2> "$RUN/sample.stderr.log"
# Serving format: a Hugging Face folder with the MoR modeling code, then generate() with the recursion-wise KV cache.
$PY -m mor_megatron.cli.convert to-hf "$RUN/checkpoints" "$RUN/hf" --overwrite 2> "$RUN/convert.stderr.log"
$PY - "$RUN/hf" <<'PYEOF' 2> "$RUN/hf_generate.stderr.log"
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = tokenizer(["class "], return_tensors="pt")
cached = model.generate(**ids, max_new_tokens=30, do_sample=False)
print("--- exported model, generate():", repr(tokenizer.decode(cached[0], skip_special_tokens=True)))
recomputed = model.generate(**ids, max_new_tokens=30, do_sample=False, use_cache=False)
if not torch.equal(cached, recomputed):
    sys.exit("demo: generate() with the recursion-wise KV cache differs from use_cache=False decoding")
print("--- the same tokens as use_cache=False greedy decoding (no KV cache)")
PYEOF
# Which tokens got how many recursions (causal routing, as served), from the export's own routing code.
DEPTH_TEXT='def mean(values):
    """Average of a list."""
    return sum(values) / len(values)
'
$PY -m mor_megatron.cli.viz depth --model "$RUN/hf" --text "$DEPTH_TEXT" --out "$RUN/depth" \
  2> "$RUN/depth.stderr.log"
cat <<SUMMARY
================================================================================================
demo finished
  run directory : $RUN   (config.yaml, metrics.jsonl, logs)
  checkpoints   : $RUN/checkpoints   (rerun the same command to resume)
  HF export     : $RUN/hf   (AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))
  depth map     : $RUN/depth/depth.html   (recursions per token; also logged to MLflow at each evaluation)
  MLflow        : .venv/bin/mlflow ui --backend-store-uri sqlite:///$RUN/mlflow.db   -> http://127.0.0.1:5000
================================================================================================
SUMMARY
