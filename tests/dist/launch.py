"""Run a function on several CPU ranks joined by gloo: the one launcher every ``tests/dist`` test uses.

``run_ranks(fn, world_size, tmp_path, **kwargs)`` spawns one process per rank. Each process sets the launcher
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), one compute thread, turns on the
CPU runtime, joins a gloo process group through a rendezvous file (no ports), then calls
``fn(rank=rank, world_size=world_size, **kwargs)``. megatron-core model parallel state is left to ``fn``: it
calls ``mor_megatron.runtime.init_distributed``, which reuses the launcher's process group.

Failures are loud: each failing rank writes its traceback to ``tmp_path/rank{r}.err``; the parent stops the
other ranks shortly after a failure (they would otherwise wait in a collective until the group timeout), kills
ranks still running at the deadline, and raises :class:`RankError` naming the ranks with their tracebacks.
Each rank's return value is pickled back to the parent.
"""

from __future__ import annotations

import os
import pickle
import time
import traceback
from datetime import timedelta
from multiprocessing import get_context
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

# How long a rank may block in one collective; a hung peer fails the test well before pytest-timeout.
_GROUP_TIMEOUT_S = 90.0
# After one rank fails, how long the others get to finish or fail on their own before they are killed.
_GRACE_AFTER_FAILURE_S = 3.0


class RankError(RuntimeError):
    """One or more ranks failed or did not finish; the message names each rank and carries its traceback."""


def run_ranks(fn: Callable[..., Any], world_size: int, tmp_path: Path | str, timeout_s: float = 240,
              **kwargs: Any) -> list[Any]:
    """Run ``fn(rank=r, world_size=world_size, **kwargs)`` on ``world_size`` spawned CPU ranks.

    Args:
        fn: a module-level (picklable) function. It runs with the CPU runtime on and a gloo default process
            group initialised; it sets up megatron-core model parallel state itself (``init_distributed``).
            Its return value must be picklable.
        world_size: number of ranks (processes).
        tmp_path: folder for the rendezvous file, the per-rank ``rank{r}.err`` tracebacks and results.
        timeout_s: deadline for the whole run; ranks still alive then are killed.
        **kwargs: picklable keyword arguments passed to ``fn``.

    Returns:
        The return values of ``fn``, indexed by rank.

    Raises:
        RankError: a rank raised, died or missed the deadline.
    """
    workdir = Path(tmp_path)
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in [workdir / "rdzv", *workdir.glob("rank*.err"), *workdir.glob("rank*.out")]:
        stale.unlink(missing_ok=True)
    # fn and kwargs travel as bytes and are unpickled only after the CPU runtime is on: unpickling fn imports
    # its module, and megatron modules imported there must see the runtime (e.g. its disabled jit fuser).
    payload = pickle.dumps((fn, kwargs))
    ctx = get_context("spawn")
    procs = [
        ctx.Process(target=_rank_main, args=(rank, world_size, str(workdir), payload), name=f"rank{rank}")
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    try:
        any_failed = _wait(procs, deadline=time.monotonic() + timeout_s)
    finally:
        killed = [proc.is_alive() for proc in procs]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
    # The first traceback written leads: the other ranks usually only report the connection it broke.
    err_files = sorted(workdir.glob("rank*.err"), key=lambda path: path.stat().st_mtime_ns)
    first_failure = int(err_files[0].stem.removeprefix("rank")) if err_files else None
    kill_reason = ("killed after another rank failed" if any_failed
                   else f"killed: still running at the {timeout_s:g} s deadline")
    order = sorted(range(world_size), key=lambda rank: rank != first_failure)
    problems = [_describe_failure(rank, procs[rank].exitcode, workdir, kill_reason if killed[rank] else None)
                for rank in order if procs[rank].exitcode != 0]
    if problems:
        raise RankError(f"{len(problems)} of {world_size} ranks failed:\n\n" + "\n\n".join(problems))
    return [pickle.loads((workdir / f"rank{rank}.out").read_bytes()) for rank in range(world_size)]


def _wait(procs: list, deadline: float) -> bool:
    """Wait until all ranks exited, a short grace after the first failure, or the deadline.

    Returns:
        Whether some rank failed.
    """
    running = list(procs)
    failed = False
    while running and time.monotonic() < deadline:
        wait([proc.sentinel for proc in running], timeout=max(0.0, deadline - time.monotonic()))
        for proc in [p for p in running if not p.is_alive()]:
            proc.join()
            running.remove(proc)
            if proc.exitcode != 0 and not failed:
                failed = True
                deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
    return failed


def _describe_failure(rank: int, exitcode: int | None, workdir: Path, kill_reason: str | None) -> str:
    err = workdir / f"rank{rank}.err"
    if err.exists():
        return f"rank {rank} raised:\n{err.read_text()}"
    if kill_reason is not None:
        return f"rank {rank} {kill_reason}"
    return f"rank {rank} exited with code {exitcode} and left no traceback"


def _rank_main(rank: int, world_size: int, workdir: str, payload: bytes) -> None:
    """Body of one spawned rank; see :func:`run_ranks`."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from mor_megatron.runtime import destroy_distributed, enable_cpu_runtime

    torch.set_num_threads(1)
    try:
        enable_cpu_runtime()
        dist.init_process_group(
            "gloo", init_method=f"file://{workdir}/rdzv", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=_GROUP_TIMEOUT_S),
        )
        fn, kwargs = pickle.loads(payload)
        result = fn(rank=rank, world_size=world_size, **kwargs)
        (Path(workdir) / f"rank{rank}.out").write_bytes(pickle.dumps(result))
        if dist.is_initialized():
            # No rank may tear down while a peer still sets up its gloo connections to it.
            dist.barrier()
    except BaseException:
        Path(workdir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1) from None
    finally:
        destroy_distributed()
