#!/usr/bin/env bash
# Launch DeepSpeed ZeRO pretraining (mor_megatron.pretrain_deepspeed) with the DeepSpeed launcher, on one node
# or many; every argument goes to `python -m mor_megatron.pretrain_deepspeed`. See docs/deepspeed.md.
#
# Usage:
#   tools/launch_deepspeed.sh --config CONFIG.yaml [key=value ...]
#   tools/launch_deepspeed.sh --help
#
# Three forms:
#   # one node, all its GPUs (or GPUS_PER_NODE CPU processes)
#   tools/launch_deepspeed.sh --config configs/360m-mor-e-r3.yaml deepspeed.config=configs/deepspeed/zero2.json
#   # many nodes from one shell: the launcher reaches every host of HOSTFILE over passwordless ssh with pdsh
#   HOSTFILE=configs/hostfile tools/launch_deepspeed.sh --config ... deepspeed.config=configs/deepspeed/zero3.json
#   # many nodes, no ssh (Slurm, Kubernetes, ...): run the same command on every node with its NODE_RANK
#   HOSTFILE=configs/hostfile NO_SSH=1 NODE_RANK=0 MASTER_ADDR=10.0.0.1 tools/launch_deepspeed.sh --config ...
#   HOSTFILE=configs/hostfile NO_SSH=1 NODE_RANK=1 MASTER_ADDR=10.0.0.1 tools/launch_deepspeed.sh --config ...
#
# Environment:
#   HOSTFILE        MPI-style hostfile, one `host slots=N` per line (configs/hostfile.example); unset: this node
#   NO_SSH=1        per-node form (deepspeed --no_ssh): needs HOSTFILE, NODE_RANK and MASTER_ADDR
#   NODE_RANK       index of this node in HOSTFILE, 0-based (NO_SSH=1 only)
#   NUM_NODES       use the first NUM_NODES hosts of HOSTFILE (default: all of them)
#   GPUS_PER_NODE   processes per node (default: the hostfile's slots, else the visible CUDA devices, else 1)
#   MASTER_ADDR     address of the first node that every node can reach (required with NO_SSH=1; with pdsh the
#                   launcher asks the first host over ssh when unset; default 127.0.0.1 on one node)
#   MASTER_PORT     rendezvous port on the first node (default 29500)
#   MASTER_WAIT_S   NO_SSH=1: how long nodes 1.. wait for the first node's rendezvous port (default 300); an
#                   unreachable MASTER_ADDR is an error after 20 s, on node 0 an address not its own at once
#   GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME
#                   network interface of the job's sockets; unset: the interface that routes to MASTER_ADDR,
#                   chosen on each node (printed first with NO_SSH=1)
#   MLFLOW_TRACKING_URI and every other MLFLOW_* variable
#                   the job's tracking server; with pdsh the launcher exports MLFLOW_*, PYTHON* (and NCCL* on
#                   GPU) to every node itself; with NO_SSH=1 each node runs this script in its own shell, so
#                   export the same values on every node.
#   FORWARD_ENV     more variable names, space-separated, to export on every node in the pdsh form
#                   (e.g. "HF_HOME NCCL_SOCKET_IFNAME"); they are written, with TORCH_EXTENSIONS_DIR,
#                   OMP_NUM_THREADS and DS_ACCELERATOR, to a per-job DeepSpeed environment file
#                   (<repo>/.cache/deepspeed_env.<pid>, passed as DS_ENV_FILE), which the launcher turns into
#                   `export` statements for every node. A ~/.deepspeed_env of your own is left alone.
#   TORCH_EXTENSIONS_DIR
#                   where DeepSpeed's C++ ops are built and cached (default <repo>/.cache/torch_extensions).
#                   Only deepspeed.offload / *_offload.json builds one (cpu_adam, minutes on first use).
#   PYTHON          interpreter (default <repo>/.venv/bin/python, else python3)
#   SKIP_CHECK=1    skip the config check below.
#
# Before launching, the script runs `mor_megatron.pretrain_deepspeed --check` with the same arguments and
# WORLD_SIZE = nodes x processes per node: config errors (exit status 2) stop it in seconds. Paths (config,
# data, output_dir, checkpoint.save_dir) are relative to the current directory, usually the repository root,
# which must be the same path on every node (the pdsh form runs `cd $PWD` there); checkpoint.save_dir must be
# on a filesystem that every node sees.
# Exit status: the launcher's (0 when every rank succeeded), 2 on a config error or a bad variable.
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

die() { echo "launch_deepspeed.sh: $*" >&2; exit 2; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

hostfile="${HOSTFILE:-}"
no_ssh="${NO_SSH:-0}"
master_port="${MASTER_PORT:-29500}"
is_int "$master_port" || die "MASTER_PORT=$master_port must be an integer"

# Hosts and slots of the hostfile (comments and blank lines skipped, as DeepSpeed does).
hosts=()
slots=()
if [[ -n "$hostfile" ]]; then
  [[ -f "$hostfile" ]] || die "HOSTFILE=$hostfile does not exist (see configs/hostfile.example)"
  while read -r host spec _; do
    [[ -z "$host" || "$host" == \#* ]] && continue
    [[ "$spec" =~ ^slots=([0-9]+)$ ]] || die "HOSTFILE=$hostfile: line '$host $spec' is not 'host slots=N'"
    hosts+=("$host")
    slots+=("${BASH_REMATCH[1]}")
  done < "$hostfile"
  (( ${#hosts[@]} > 0 )) || die "HOSTFILE=$hostfile lists no host"
fi

num_nodes="${NUM_NODES:-$(( ${#hosts[@]} > 0 ? ${#hosts[@]} : 1 ))}"
is_int "$num_nodes" && (( num_nodes >= 1 )) || die "NUM_NODES=$num_nodes must be an integer >= 1"
if (( ${#hosts[@]} > 0 && num_nodes > ${#hosts[@]} )); then
  die "NUM_NODES=$num_nodes but HOSTFILE=$hostfile lists ${#hosts[@]} hosts"
fi
(( num_nodes == 1 || ${#hosts[@]} > 0 )) || die "NUM_NODES=$num_nodes needs HOSTFILE listing the nodes"

if [[ "$no_ssh" == "1" ]]; then
  [[ -n "$hostfile" ]] || die "NO_SSH=1 needs HOSTFILE (the launcher takes the node list from it)"
  [[ -n "${MASTER_ADDR:-}" ]] || die "NO_SSH=1 needs MASTER_ADDR, the address of the first node"
  node_rank="${NODE_RANK:-}"
  is_int "$node_rank" && (( node_rank < num_nodes )) || die "NODE_RANK=$node_rank must be an integer in [0, $num_nodes)"
fi

if [[ "$no_ssh" == "1" ]] && (( num_nodes > 1 )); then
  # (In the pdsh form every worker makes the same choice for itself, in init_distributed.)
  source "$repo/tools/rendezvous_lib.sh"
  rendezvous_interfaces launch_deepspeed.sh "$MASTER_ADDR" "$master_port" "$node_rank" "$num_nodes"
fi

cuda_devices="$("$python" -c 'import torch; print(torch.cuda.device_count())')"
if [[ -n "${GPUS_PER_NODE:-}" ]]; then
  gpus_per_node="$GPUS_PER_NODE"
elif (( ${#slots[@]} > 0 )); then
  gpus_per_node="${slots[0]}"
elif (( cuda_devices > 0 )); then
  gpus_per_node="$cuda_devices"
else
  gpus_per_node=1
fi
is_int "$gpus_per_node" && (( gpus_per_node >= 1 )) || die "GPUS_PER_NODE=$gpus_per_node must be an integer >= 1"
world_size=$(( num_nodes * gpus_per_node ))

if (( cuda_devices == 0 )); then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"  # silences DeepSpeed's accelerator probe; gloo on CPU
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo/.cache/torch_extensions}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # the package from this checkout on every rank

launcher=(--master_port "$master_port" --num_gpus "$gpus_per_node")
if [[ -n "$hostfile" ]]; then
  launcher+=(--hostfile "$hostfile" --num_nodes "$num_nodes")
fi
if [[ "$no_ssh" == "1" ]]; then
  launcher+=(--no_ssh --node_rank "$node_rank" --master_addr "$MASTER_ADDR")
elif [[ -n "${MASTER_ADDR:-}" ]]; then
  launcher+=(--master_addr "$MASTER_ADDR")
fi

if [[ "$no_ssh" != "1" && "$num_nodes" -gt 1 ]]; then
  # pdsh form: the launcher exports these to every node through a DeepSpeed environment file.
  mkdir -p "$repo/.cache"
  env_file="$repo/.cache/deepspeed_env.$$"
  trap 'rm -f "$env_file"' EXIT
  : > "$env_file"
  for name in TORCH_EXTENSIONS_DIR OMP_NUM_THREADS DS_ACCELERATOR ${FORWARD_ENV:-}; do
    if [[ -n "${!name:-}" ]]; then
      printf '%s=%s\n' "$name" "${!name}" >> "$env_file"
    fi
  done
  export DS_ENV_FILE="$env_file"  # an absolute path: DeepSpeed joins it to ~ and . and finds it either way
fi

if [[ -n "${MLFLOW_TRACKING_URI:-}" ]]; then
  echo "launch_deepspeed.sh: MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI" >&2
elif (( num_nodes > 1 )); then
  echo "launch_deepspeed.sh: warning: MLFLOW_TRACKING_URI is not set; node 0 logs to sqlite in the run's" \
       "output_dir and the system metrics of the other nodes are lost. Start a server with" \
       "tools/mlflow_server.sh --host 0.0.0.0 and export the URI it prints (on every node with NO_SSH=1)." >&2
fi

if [[ "${SKIP_CHECK:-0}" != "1" ]]; then
  WORLD_SIZE="$world_size" "$python" -m mor_megatron.pretrain_deepspeed --check "$@"
fi

if [[ -n "${rendezvous+set}" ]] && (( node_rank > 0 )); then
  # Otherwise a wrong MASTER_ADDR leaves this node waiting in silence for the collective timeout.
  "${rendezvous[@]}" --wait || exit 2
fi
echo "launch_deepspeed.sh: $num_nodes node(s) x $gpus_per_node processes, world size $world_size" >&2
if [[ -n "${env_file:-}" ]]; then
  # Not exec: the trap removes the environment file when the launcher returns.
  "$python" -m deepspeed.launcher.runner "${launcher[@]}" --module mor_megatron.pretrain_deepspeed "$@"
else
  exec "$python" -m deepspeed.launcher.runner "${launcher[@]}" --module mor_megatron.pretrain_deepspeed "$@"
fi
