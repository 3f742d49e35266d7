"""Child processes of a training worker die with it, also when it is killed with SIGKILL.

megatron's ``torch_dist`` save starts two kinds of helpers (``dist_checkpointing/strategies/filesystem_async.py``):

* writer processes, forked per rank and save (``write_preloaded_data_multiproc``, a copy of the worker each);
* once per process, a ``multiprocessing`` manager server, *spawned* (a fresh interpreter that imports the
  job's modules, ~350 MiB), which holds the queue the writers report to (``_get_write_results_queue``).

Nothing ends them when the worker is killed during a save: the manager server never exits on its own and
writers could block forever on their queues (3 of 25 kill -9 trials left such processes). The kernel can end
them instead: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` in a child makes its parent's death deliver SIGKILL.

* Forked children: a fork hook arms every child forked by this process (DataLoader workers too, which equally
  have nothing to do once the worker is gone). ``subprocess`` and ``spawn`` start programs through
  ``fork_exec``, which runs no fork hooks.
* megatron's manager server: its queue is created here instead, by a manager whose server arms itself first.
  multiprocessing's resource tracker, the other spawned helper, exits by itself once every process that holds
  its pipe has ended, i.e. once these have.

Linux only (elsewhere this is a no-op). The signal fires when the *thread* that created the child ends, so only
children created from the main thread, whose end is the process's end, are armed.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1
_installed = False
_parent_pid: int | None = None
_forked_from_main_thread = False
_manager: SyncManager | None = None


def die_with_parent(expected_parent_pid: int) -> None:
    """In a child: get SIGKILL when the parent dies; exit now if it already has (the signal would never come)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # without the guarantee the child behaves as before; nothing to report from a fresh child
    if os.getppid() != expected_parent_pid:
        os._exit(1)


def _before_fork() -> None:
    global _parent_pid, _forked_from_main_thread
    _parent_pid = os.getpid()
    _forked_from_main_thread = threading.current_thread() is threading.main_thread()


def _arm_forked_child() -> None:
    if _forked_from_main_thread and _parent_pid is not None:
        die_with_parent(_parent_pid)


def arm_forked_children() -> None:
    """Install the fork hook once per process (idempotent; a no-op outside Linux)."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return
    os.register_at_fork(before=_before_fork, after_in_child=_arm_forked_child)
    _installed = True


def _armed_write_results_queue(mp_mode: str = "spawn"):
    """megatron's write-results queue getter, with a manager server that dies with this process."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        _manager = SyncManager(ctx=multiprocessing.get_context(mp_mode))  # spawn by default, as megatron's own
        _manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = _manager.Queue()
    return filesystem_async._results_queue


def stop_checkpoint_helpers() -> None:
    """End the writers' manager server that a save started here, if any (a later save starts another)."""
    global _manager
    if _manager is not None:
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        filesystem_async._results_queue = None
        _manager.shutdown()
        _manager = None


def arm_checkpoint_helpers() -> None:
    """Arm forked children and megatron's checkpoint-writer manager (a no-op outside Linux)."""
    if not sys.platform.startswith("linux"):
        return
    arm_forked_children()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # Checked, not assumed: 0.16 names the getter _get_write_results_queue, 0.19 get_write_results_queue (its
    # writers are threads, the manager server remains); a megatron-core with neither starts no manager to arm.
    for name in ("_get_write_results_queue", "get_write_results_queue"):
        if hasattr(filesystem_async, name):
            setattr(filesystem_async, name, _armed_write_results_queue)
