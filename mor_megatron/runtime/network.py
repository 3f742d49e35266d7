"""Which network interface reaches the rendezvous host, and whether it answers: multi-node launches on real hosts.

gloo binds to the address of this host's *hostname* unless ``GLOO_SOCKET_IFNAME`` names an interface, and many
cluster images resolve the hostname to 127.0.0.1 (an ``/etc/hosts`` entry): every rank then listens on
loopback and tells its peers on other hosts to connect there ("connectFullMesh ... Connection refused" on one
node, a silent hang on the other). The interface whose address the kernel uses to reach ``MASTER_ADDR`` is the
one the peers can reach, so :func:`use_route_interfaces` names it for gloo and NCCL unless the user has.

The launch scripts run ``python -m mor_megatron.cli.rendezvous`` before starting workers: it prints the
``export`` lines for the shell and, on nodes other than 0, waits (bounded) until node 0's rendezvous port
accepts connections, so that a wrong ``MASTER_ADDR`` is an error naming it within seconds on every node.
Linux, IPv4.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass

SOCKET_IFNAME_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_SIOCGIFADDR = 0x8915  # linux/sockios.h: an interface's IPv4 address


class NetworkError(RuntimeError):
    """MASTER_ADDR cannot serve as the rendezvous address from this node; the message names it and why."""


@dataclass(frozen=True)
class Route:
    """How this host reaches ``master_ip``: out of ``interface``, from ``local_ip``."""

    master_addr: str
    master_ip: str
    interface: str
    local_ip: str

    @property
    def master_is_loopback(self) -> bool:
        return ipaddress.ip_address(self.master_ip).is_loopback

    @property
    def master_is_this_host(self) -> bool:
        return self.local_ip == self.master_ip or self.master_is_loopback


def interface_addresses() -> dict[str, str]:
    """Each interface that has an IPv4 address, with it (the primary one)."""
    addresses = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                request = struct.pack("256s", name.encode()[:15])
                addresses[name] = socket.inet_ntoa(fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)[20:24])
            except OSError:  # no IPv4 address on this interface
                continue
    return addresses


def route_to(master_addr: str) -> Route:
    """Resolve ``master_addr`` and find the interface the kernel would send to it from (no packet is sent)."""
    try:
        master_ip = socket.getaddrinfo(master_addr, None, socket.AF_INET)[0][4][0]
    except OSError as err:
        raise NetworkError(f"MASTER_ADDR={master_addr} does not resolve to an IPv4 address: {err}") from None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((master_ip, 9))  # a UDP connect only picks the route
        except OSError as err:
            raise NetworkError(f"MASTER_ADDR={master_addr} ({master_ip}): no route from this host: "
                               f"{err.strerror}") from None
        local_ip = probe.getsockname()[0]
    owners = [name for name, address in interface_addresses().items() if address == local_ip]
    if not owners:
        raise NetworkError(f"MASTER_ADDR={master_addr} ({master_ip}) is reached from {local_ip}, which no "
                           "interface of this host holds as its IPv4 address; set GLOO_SOCKET_IFNAME and "
                           "NCCL_SOCKET_IFNAME yourself")
    return Route(master_addr, master_ip, owners[0], local_ip)


def check_rendezvous_address(route: Route, *, node_rank: int, num_nodes: int) -> None:
    """Refuse addresses that cannot work: loopback across nodes, node 0 not holding the address, or a node other
    than 0 holding it."""
    if num_nodes <= 1:
        return
    if route.master_is_loopback:
        raise NetworkError(f"MASTER_ADDR={route.master_addr} resolves to {route.master_ip} (loopback), which the "
                           f"other nodes cannot reach; use node 0's address on the network")
    if node_rank == 0 and not route.master_is_this_host:
        raise NetworkError(f"MASTER_ADDR={route.master_addr} ({route.master_ip}) is not an address of this host "
                           "(node 0, which hosts the rendezvous); use one of: "
                           + ", ".join(f"{ip} ({name})" for name, ip in interface_addresses().items()))
    if node_rank > 0 and route.master_is_this_host:
        raise NetworkError(f"MASTER_ADDR={route.master_addr} ({route.master_ip}) is this host's own address, but "
                           f"this is node {node_rank}; MASTER_ADDR must be node 0's address")


def use_route_interfaces(master_addr: str, environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """Set :data:`SOCKET_IFNAME_VARIABLES` that are unset to the interface routing to ``master_addr``.

    Returns the variables it set. Nothing is set for a loopback ``master_addr`` (a one-host job) or when the
    route cannot be found (the rendezvous will report the address itself).
    """
    missing = [name for name in SOCKET_IFNAME_VARIABLES if not environ.get(name)]
    if not missing:
        return {}
    try:
        route = route_to(master_addr)
    except NetworkError:
        return {}
    if route.master_is_loopback:
        return {}
    chosen = {name: route.interface for name in missing}
    environ.update(chosen)
    return chosen


def wait_for_rendezvous(master_addr: str, port: int, *, wait_s: float, unreachable_s: float) -> float:
    """Block until ``master_addr:port`` accepts a TCP connection; return the seconds waited.

    A refused connection means node 0 has not started yet: wait up to ``wait_s``. An unreachable host (no ARP
    answer, no route, no reply) fails after ``unreachable_s``.
    """
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        try:
            with socket.create_connection((master_addr, port), timeout=3.0):
                return elapsed
        except ConnectionRefusedError:
            if elapsed > wait_s:
                raise NetworkError(f"nothing accepts connections at MASTER_ADDR={master_addr}:{port} after "
                                   f"{wait_s:g} s: start node 0, check MASTER_PORT, or wait longer "
                                   "(MASTER_WAIT_S)") from None
        except OSError as err:
            if elapsed > unreachable_s:
                reason = "no reply" if isinstance(err, TimeoutError) else err.strerror or errno.errorcode[err.errno]
                raise NetworkError(f"MASTER_ADDR={master_addr}:{port} is unreachable from this host after "
                                   f"{unreachable_s:g} s ({reason}); is it node 0's address?") from None
        time.sleep(1.0)
