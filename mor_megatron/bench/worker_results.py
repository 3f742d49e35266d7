"""Results from benchmark worker processes (torchrun ranks, one-model processes) back to their launcher: one JSON
object per stdout line, after a prefix that tells them apart from library chatter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence


def emit(prefix: str, result: Mapping) -> None:
    """In a worker: write ``result`` as one line. One write per line: torchrun's workers share the pipe, and
    print() writes the newline apart (under PYTHONUNBUFFERED two ranks' lines could join)."""
    sys.stdout.write(prefix + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_for_results(command: Sequence[str], prefix: str, *, timeout_s: float, what: str,
                    env: Mapping[str, str] | None = None) -> list[dict]:
    """Run ``command`` (``OMP_NUM_THREADS`` 1 unless set; ``env`` adds variables) and return the objects its
    workers emitted; RuntimeError with the tail of stderr, naming ``what``, if it fails."""
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    out = subprocess.run(list(command), env=environment, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return [json.loads(line[len(prefix):]) for line in out.stdout.splitlines() if line.startswith(prefix)]
