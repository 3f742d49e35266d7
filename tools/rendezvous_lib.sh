# Sourced by tools/launch_torchrun.sh and tools/launch_deepspeed.sh (they set $python first): the multi-node
# checks of `python -m mor_megatron.cli.rendezvous`.
#
# rendezvous_interfaces PROG MASTER_ADDR MASTER_PORT NODE_RANK NUM_NODES
#   gloo binds to the hostname's address, often 127.0.0.1 on cluster images: export GLOO_SOCKET_IFNAME and
#   NCCL_SOCKET_IFNAME as the interface that routes to MASTER_ADDR (values already set are kept) and say so on
#   stderr. A bad MASTER_ADDR exits 2 here. Leaves the check's command in the array `rendezvous`, which
#   `"${rendezvous[@]}" --wait` reuses on nodes other than 0 to wait (bounded) for node 0's port.
rendezvous_interfaces() {
  rendezvous=("$python" -m mor_megatron.cli.rendezvous --prog "$1" --master-addr "$2" --master-port "$3"
              --node-rank "$4" --num-nodes "$5")
  local exports
  exports="$("${rendezvous[@]}")" || exit 2
  eval "$exports"
  echo "$1: node $4: sockets over GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-}" \
       "NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-} towards MASTER_ADDR=$2" >&2
}
