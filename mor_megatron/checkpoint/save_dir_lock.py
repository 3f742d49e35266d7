"""One job per ``checkpoint.save_dir``: a lock file that a second job refuses at startup.

Two jobs publishing into one save_dir overwrite each other's ``step_<N>`` folders and ``latest`` pointer, and
each one's keep-last purge deletes the other's checkpoints. Global rank 0, the only rank that publishes, holds
``<save_dir>/.save_dir.lock`` for the whole job. The file is created atomically (written under a private name,
then hard-linked to the lock name, which fails when the lock exists, also over NFS) and names its holder: host,
pid, the process's start time and the Slurm job id if any. It is removed when the job ends (``release``, also at
interpreter exit).

A job killed with SIGKILL leaves the file behind. A later job takes such a stale lock over, with a warning, when
the holder provably is gone: it ran on this host and that pid is no longer the same process, or it was an
earlier run of this same Slurm job (a requeue). A holder on another host cannot be checked from here; the error
then says which file to delete once that job is known to be dead.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch.distributed as dist

from mor_megatron.checkpoint.errors import CheckpointError

logger = logging.getLogger(__name__)

LOCK_FILE = ".save_dir.lock"


class SaveDirLocked(CheckpointError):
    """Another live job holds the save_dir's lock; the message names it and the way out."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a save_dir lock."""

    host: str
    pid: int
    started: str
    """When the job took the lock (UTC, ISO 8601)."""
    process_start_time: float
    """The holder process's creation time (psutil), which tells a reused pid from the holder."""
    slurm_job_id: str | None

    @classmethod
    def this_process(cls) -> LockHolder:
        return cls(host=socket.gethostname(), pid=os.getpid(),
                   started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   process_start_time=psutil.Process().create_time(), slurm_job_id=os.environ.get("SLURM_JOB_ID"))

    def describe(self) -> str:
        slurm = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"host {self.host}, pid {self.pid}, started {self.started}{slurm}"

    def is_gone(self) -> bool:
        """True when the holder provably no longer runs (see the module docstring)."""
        if self.slurm_job_id is not None and self.slurm_job_id == os.environ.get("SLURM_JOB_ID"):
            return True
        if self.host != socket.gethostname():
            return False
        try:
            return psutil.Process(self.pid).create_time() != self.process_start_time
        except psutil.NoSuchProcess:
            return True


class SaveDirLock:
    """The lock file of one save_dir, held by this process between :meth:`acquire` and :meth:`release`."""

    def __init__(self, save_dir: Path):
        self.path = save_dir / LOCK_FILE
        self.holder: LockHolder | None = None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one with a warning.

        Raises:
            SaveDirLocked: a job that may still run holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = LockHolder.this_process()
        while not self._create(me):
            try:
                holder = self._read_holder()
            except FileNotFoundError:  # released between the attempt and the read: try again
                continue
            if holder is None:
                raise SaveDirLocked(f"{self.path} exists but does not name a holder; if no job writes "
                                    f"{self.path.parent}, delete it and restart")
            if not holder.is_gone():
                raise SaveDirLocked(
                    f"checkpoint.save_dir {self.path.parent} is in use by another job ({holder.describe()}); two "
                    "jobs writing one save_dir delete each other's checkpoints. Choose another checkpoint.save_dir, "
                    f"or, if that job is dead, delete {self.path}")
            logger.warning("taking over the stale lock %s of a job that is gone (%s)", self.path, holder.describe())
            self.path.unlink(missing_ok=True)
        self.holder = me
        atexit.register(self.release)

    def _create(self, me: LockHolder) -> bool:
        """Publish ``me`` as the lock file; False when a lock file exists already."""
        private = self.path.with_name(f"{LOCK_FILE}.{me.host}.{me.pid}")
        private.write_text(json.dumps(asdict(me)) + "\n")
        try:
            os.link(private, self.path)  # atomic, and fails when the lock exists: no half-written lock is seen
            return True
        except FileExistsError:
            return False
        finally:
            private.unlink(missing_ok=True)

    def _read_holder(self) -> LockHolder | None:
        """The holder named by the lock file, None when the file does not name one.

        Raises:
            FileNotFoundError: there is no lock file.
        """
        text = self.path.read_text()
        try:
            return LockHolder(**json.loads(text))
        except (ValueError, TypeError):
            return None

    def release(self) -> None:
        """Remove the lock file if this process still holds it (idempotent)."""
        if self.holder is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if self._read_holder() == self.holder:
                self.path.unlink()
        self.holder = None
        atexit.unregister(self.release)


def lock_save_dir(save_dir: str | None) -> SaveDirLock | None:
    """Rank 0 takes ``save_dir``'s lock; every rank raises the same :class:`SaveDirLocked` when it is held.

    Collective over the default process group. Returns the lock on rank 0 (release it when the job ends), None
    on the other ranks and when ``save_dir`` is None.
    """
    if save_dir is None:
        return None
    lock, refusal = None, None
    if dist.get_rank() == 0:
        lock = SaveDirLock(Path(save_dir))
        try:
            lock.acquire()
        except SaveDirLocked as err:
            lock, refusal = None, str(err)
    box = [refusal]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise SaveDirLocked(box[0])
    return lock
