"""Two "hosts" on one machine: Linux network namespaces joined by a veth pair, each with its own address.

Each namespace has only its loopback and its end of the link, so a job that binds to the hostname's address
(127.0.0.1 on these machines) cannot reach its peer: the launch has to pick the right interface, as on real
hosts. The filesystem stays shared (one checkout, one output folder), as with a shared filesystem on a
cluster. Needs root and iproute2; :func:`netns_unavailable` says why not when they are missing. Everything
made here is removed on exit, processes inside first, also when the test fails; nothing outside the
namespaces is touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

SUBNET = "10.77.0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def netns_unavailable() -> str | None:
    """Why two namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"morprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class Host:
    """One namespace: its name, its end of the link and that end's address."""

    namespace: str
    interface: str
    address: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def pids(self) -> list[int]:
        """Processes running in this namespace."""
        listed = _ip("netns", "pids", self.namespace, check=False).stdout.split()
        return [int(pid) for pid in listed]

    def kill_all(self) -> None:
        """SIGKILL every process in this namespace."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def set_link(self, up: bool) -> None:
        """Take this host's end of the link down (both ends lose their carrier) or bring it back up."""
        _ip("-n", self.namespace, "link", "set", self.interface, "up" if up else "down")


def wait_until_empty(hosts: tuple[Host, ...], timeout_s: float) -> float:
    """Seconds until no process runs in any of ``hosts`` (AssertionError after ``timeout_s``)."""
    started = time.monotonic()
    while any(host.pids() for host in hosts):
        elapsed = time.monotonic() - started
        assert elapsed < timeout_s, {host.namespace: host.pids() for host in hosts}
        time.sleep(0.2)
    return time.monotonic() - started


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Namespaces ``mor<pid>a`` (SUBNET.1) and ``mor<pid>b`` (SUBNET.2) joined by a veth pair, removed on exit."""
    tag = f"mor{os.getpid()}"
    hosts = (Host(f"{tag}a", f"{tag}a", f"{SUBNET}.1"), Host(f"{tag}b", f"{tag}b", f"{SUBNET}.2"))
    try:
        for host in hosts:
            _ip("netns", "add", host.namespace)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
        first, second = hosts
        _ip("link", "add", first.interface, "netns", first.namespace, "type", "veth",
            "peer", "name", second.interface, "netns", second.namespace)
        for host in hosts:
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.interface)
            _ip("-n", host.namespace, "link", "set", host.interface, "up")
        yield hosts
    finally:
        for host in hosts:
            host.kill_all()
        with contextlib.suppress(AssertionError):
            wait_until_empty(hosts, 10)
        for host in hosts:  # deleting a namespace removes its end of the veth pair, and so the pair
            _ip("netns", "del", host.namespace, check=False)
