#!/usr/bin/env bash
# Launch mor_megatron pretraining with torchrun on one node or many. Run the same command on every node,
# with that node's NODE_RANK; every argument goes to `python -m mor_megatron.pretrain`.
#
# Usage:
#   tools/launch_torchrun.sh --config CONFIG.yaml [key=value ...]
#   tools/launch_torchrun.sh --help
#
# Examples:
#   # one node, all its GPUs
#   tools/launch_torchrun.sh --config configs/360m-mor-e-r3.yaml
#   # two nodes: on node 0 and on node 1 (10.0.0.1 = node 0's address)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 tools/launch_torchrun.sh --config configs/360m-mor-e-r3.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 tools/launch_torchrun.sh --config configs/360m-mor-e-r3.yaml
#   # CPU, 2 gloo processes (what tools/demo.sh does)
#   GPUS_PER_NODE=2 tools/launch_torchrun.sh --config configs/demo.yaml data.blend=[...] data.tokenizer=...
#
# Environment:
#   NNODES          number of nodes (default 1)
#   NODE_RANK       index of this node, 0 .. NNODES-1 (default 0)
#   MASTER_ADDR     address of node 0 that every node can reach (default 127.0.0.1; set it when NNODES > 1)
#   MASTER_PORT     rendezvous port on node 0 (default 29500)
#   MASTER_WAIT_S   how long nodes 1.. wait for node 0's rendezvous port to open (default 300); an unreachable
#                   MASTER_ADDR is an error after 20 s, on node 0 an address that is not its own at once
#   GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME
#                   network interface of the job's sockets; with NNODES > 1 and unset: the interface that
#                   routes to MASTER_ADDR (printed first)
#   GPUS_PER_NODE   processes on this node (default: the visible CUDA devices; 1 when there are none)
#   MLFLOW_TRACKING_URI
#                   tracking server for the job, e.g. the line printed by tools/mlflow_server.sh
#                   --host 0.0.0.0; every rank on this node inherits it, so set the same value on every
#                   node. Unset: the job logs to sqlite:///<output_dir>/mlflow.db, which other nodes reach
#                   only through a shared filesystem (with NNODES > 1 a warning says so).
#   PYTHON          interpreter (default <repo>/.venv/bin/python, else python3); torchrun is run as
#                   `$PYTHON -m torch.distributed.run`.
#   SKIP_CHECK=1    skip the config check below.
#
# Before starting torchrun the script runs `mor_megatron.pretrain --check` with the same arguments and
# WORLD_SIZE = NNODES x GPUS_PER_NODE on this node: config errors (exit status 2) and missing data stop it in
# seconds instead of after the rendezvous. Every node checks its own view of the data paths.
# Paths (config, data, output_dir) are relative to the current directory, usually the repository root; the
# package must be importable from there (tools/setup.sh installs it into .venv).
# Exit status: torchrun's (0 when every rank succeeded), 2 on a config error or a bad variable.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

for arg in "$@"; do
  if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
    usage
    exit 0
  fi
done

repo="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
  python="$PYTHON"
elif [[ -x "$repo/.venv/bin/python" ]]; then
  python="$repo/.venv/bin/python"
else
  python="python3"
fi

die() { echo "launch_torchrun.sh: $*" >&2; exit 2; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

nnodes="${NNODES:-1}"
node_rank="${NODE_RANK:-0}"
master_addr="${MASTER_ADDR:-127.0.0.1}"
master_port="${MASTER_PORT:-29500}"
is_int "$nnodes" && (( nnodes >= 1 )) || die "NNODES=$nnodes must be an integer >= 1"
is_int "$node_rank" && (( node_rank < nnodes )) ||
  die "NODE_RANK=$node_rank must be an integer in [0, $nnodes)"
is_int "$master_port" || die "MASTER_PORT=$master_port must be an integer"
if (( nnodes > 1 )) && [[ -z "${MASTER_ADDR:-}" ]]; then
  die "NNODES=$nnodes needs MASTER_ADDR, the address of node 0 that every node can reach"
fi

if (( nnodes > 1 )); then
  source "$repo/tools/rendezvous_lib.sh"
  rendezvous_interfaces launch_torchrun.sh "$master_addr" "$master_port" "$node_rank" "$nnodes"
fi

if [[ -n "${GPUS_PER_NODE:-}" ]]; then
  gpus_per_node="$GPUS_PER_NODE"
else
  # torch's count honours CUDA_VISIBLE_DEVICES, unlike `nvidia-smi -L`.
  gpus_per_node="$("$python" -c 'import torch; print(torch.cuda.device_count())')"
  (( gpus_per_node >= 1 )) || gpus_per_node=1
fi
is_int "$gpus_per_node" && (( gpus_per_node >= 1 )) ||
  die "GPUS_PER_NODE=$gpus_per_node must be an integer >= 1"
world_size=$(( nnodes * gpus_per_node ))

if [[ -n "${MLFLOW_TRACKING_URI:-}" ]]; then
  export MLFLOW_TRACKING_URI
  echo "launch_torchrun.sh: MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI (inherited by every rank on this" \
       "node)" >&2
elif (( nnodes > 1 )); then
  echo "launch_torchrun.sh: warning: MLFLOW_TRACKING_URI is not set; the job logs to sqlite in its" \
       "output_dir, which nodes 1..$(( nnodes - 1 )) reach only through a shared filesystem (and sqlite" \
       "over NFS is unreliable). Start a server with tools/mlflow_server.sh --host 0.0.0.0 and export" \
       "the URI it prints on every node." >&2
fi

if [[ "${SKIP_CHECK:-0}" != "1" ]]; then
  WORLD_SIZE="$world_size" "$python" -m mor_megatron.pretrain --check "$@"
fi

if (( nnodes > 1 && node_rank > 0 )); then
  # torchrun's agent would wait 10 minutes in silence for a rendezvous port that never opens.
  "${rendezvous[@]}" --wait || exit 2
fi
echo "launch_torchrun.sh: node $node_rank of $nnodes, $gpus_per_node processes, world size $world_size," \
     "rendezvous $master_addr:$master_port" >&2
exec "$python" -m torch.distributed.run \
  --nnodes "$nnodes" --node-rank "$node_rank" --nproc-per-node "$gpus_per_node" \
  --master-addr "$master_addr" --master-port "$master_port" \
  -m mor_megatron.pretrain "$@"
