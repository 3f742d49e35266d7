"""A real ``mlflow server`` for tests, started and stopped through ``tools/mlflow_server.sh``.

``with mlflow_server(state_dir) as server:`` starts a fresh server (sqlite store and artifacts under
``state_dir``) on a free loopback port and always stops it on exit; ``server.kill()`` simulates a crash
mid-run and :func:`silent_port` makes its address hang instead of refusing. Also :func:`free_port` for other
loopback listeners (torchrun's rendezvous store).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

_SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "mlflow_server.sh"
# Another process can take the port between free_port() and the server's bind; a second port is enough.
_START_ATTEMPTS = 2
_BIND_WAIT_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class MlflowServer:
    """A running server: its tracking URI and the state folder of ``tools/mlflow_server.sh``."""

    uri: str
    state_dir: Path

    @property
    def pid_file(self) -> Path:
        """``server.pid``: the server's process-group id (the script starts it with ``setsid``)."""
        return self.state_dir / "server.pid"

    def kill(self) -> None:
        """SIGKILL the whole server process group, as a crashed or preempted tracking host would vanish."""
        os.killpg(int(self.pid_file.read_text()), signal.SIGKILL)


@functools.cache
def _migrated_store() -> Path:
    """An empty sqlite store with MLflow's schema, created once per test process.

    A server on a fresh database first runs MLflow's ~70 schema migrations (about half of a 10-20 s start on
    a busy machine); each server starts on a copy of this one instead.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = Path(tempfile.mkdtemp(prefix="mlflow-store-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    # The artifact root a server with --artifacts-destination gives the Default experiment.
    store = SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", "mlflow-artifacts:/")
    store.engine.dispose()
    return folder / "mlflow.db"


@contextlib.contextmanager
def silent_port(uri: str) -> Iterator[None]:
    """Listen on the address of ``uri`` (its server must be gone) and never answer, until the block exits.

    A killed server on loopback refuses connections at once; a vanished remote host or a hung server instead
    leaves every request waiting for its HTTP timeout. The kernel completes the TCP handshake for up to the
    listen backlog of connections; requests then wait for a reply that never comes (later connects time out).
    """
    address = urlsplit(uri)
    with socket.socket() as sock:
        # The killed server's connections may linger in TIME_WAIT on this port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # SIGKILL is asynchronous: the server's listening socket closes only once its processes are gone.
        deadline = time.monotonic() + _BIND_WAIT_S
        while True:
            try:
                sock.bind((address.hostname, address.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sock.listen(64)
        yield


def _stop(state_dir: Path) -> None:
    # --stop sends SIGTERM to the group, SIGKILL after 10 s; it is a no-op (exit 1) once the pid file is gone.
    subprocess.run([str(_SCRIPT), "--stop", "--dir", str(state_dir)], capture_output=True, timeout=30,
                   check=False)


@contextlib.contextmanager
def mlflow_server(state_dir: Path, *, wait_s: float = 60, keep_store: bool = False) -> Iterator[MlflowServer]:
    """Start a server on a free 127.0.0.1 port with its state in ``state_dir``; stop it on exit, always.

    Starts from an empty store unless ``keep_store`` (a restart after :meth:`MlflowServer.kill`: the runs
    logged so far are still there; the port is a new one). Waits at most ``wait_s`` for ``/health`` per
    attempt (a cold start takes 5-15 s, more on a busy machine). Raises RuntimeError with the script's stderr
    (the server log tail) if it does not come up.
    """
    env = {**os.environ, "MLFLOW_BIN": str(Path(sys.executable).with_name("mlflow"))}
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    if not (keep_store and (Path(state_dir) / "mlflow.db").is_file()):
        shutil.copyfile(_migrated_store(), Path(state_dir) / "mlflow.db")
    errors = []
    try:
        for _ in range(_START_ATTEMPTS):
            command = [str(_SCRIPT), "--dir", str(state_dir), "--port", str(free_port()),
                       "--wait", str(int(wait_s))]
            started = subprocess.run(command, capture_output=True, text=True, timeout=wait_s + 30, env=env,
                                     check=False)
            if started.returncode == 0:
                uri = started.stdout.strip().removeprefix("export MLFLOW_TRACKING_URI=")
                yield MlflowServer(uri=uri, state_dir=Path(state_dir))
                return
            errors.append(started.stderr)
        raise RuntimeError("mlflow server did not start:\n" + "\n---\n".join(errors))
    finally:
        _stop(Path(state_dir))
