"""Before a multi-node launch: the socket interface towards MASTER_ADDR, and node 0's rendezvous port reachable.

Used by tools/launch_torchrun.sh, tools/launch_deepspeed.sh and tools/slurm_pretrain.sbatch: without ``--wait``
it checks MASTER_ADDR (resolves, is routed, is node 0's own address on node 0 and not on the others) and prints
``export GLOO_SOCKET_IFNAME=... NCCL_SOCKET_IFNAME=...`` lines (values the user set are kept) for the shell to
eval; with ``--wait``, a node other than 0 waits until node 0's port accepts connections; ``--address-towards
HOST`` prints the address this host reaches HOST from. Errors: one line that names the address, exit status 2. See mor_megatron/runtime/network.py.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from mor_megatron.runtime.network import (
    SOCKET_IFNAME_VARIABLES,
    NetworkError,
    check_rendezvous_address,
    route_to,
    wait_for_rendezvous,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mor_megatron.cli.rendezvous",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--master-addr")
    parser.add_argument("--master-port", type=int)
    parser.add_argument("--address-towards", metavar="HOST",
                        help="print the IPv4 address this host reaches HOST from, and nothing else (Slurm: "
                             "node 0's MASTER_ADDR, whatever its own hostname resolves to)")
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--wait", action="store_true",
                        help="on nodes other than 0: wait until node 0's rendezvous port accepts connections")
    parser.add_argument("--wait-s", type=float, default=float(os.environ.get("MASTER_WAIT_S", 300)),
                        help="how long node 0 may take to start (default: MASTER_WAIT_S, else 300)")
    parser.add_argument("--unreachable-s", type=float, default=20.0,
                        help="how long an unreachable MASTER_ADDR is retried before it is an error")
    parser.add_argument("--prog", default="rendezvous", help="name that starts error lines")
    args = parser.parse_args(argv)
    if args.address_towards is None and (args.master_addr is None or args.master_port is None):
        parser.error("--master-addr and --master-port are required (or --address-towards HOST)")
    try:
        if args.address_towards is not None:
            print(route_to(args.address_towards).local_ip)
            return 0
        route = route_to(args.master_addr)
        check_rendezvous_address(route, node_rank=args.node_rank, num_nodes=args.num_nodes)
        if args.wait and args.node_rank > 0:
            wait_for_rendezvous(route.master_ip, args.master_port, wait_s=args.wait_s,
                                unreachable_s=args.unreachable_s)
    except NetworkError as err:
        print(f"{args.prog}: error: {err}", file=sys.stderr)
        return 2
    if not args.wait:
        for name in SOCKET_IFNAME_VARIABLES:
            print(f"export {name}={shlex.quote(os.environ.get(name) or route.interface)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
