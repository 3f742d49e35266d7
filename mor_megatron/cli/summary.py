"""How the data and conversion commands end: one JSON summary line on stdout, or one error line and a status.

Libraries print notes on stdout (MLflow's "View run ... at", transformers on custom code), so while a command
runs its stdout goes to stderr: stdout carries the summary line alone, for scripts to parse.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from typing import Any


def print_summary(prog: str, run: Callable[[], dict[str, Any]], *, bad_input: tuple[type[Exception], ...],
                  failures: tuple[type[Exception], ...] = ()) -> int:
    """Run ``run`` and print its summary; returns the exit status.

    ``bad_input`` errors print ``PROG: error: MESSAGE`` and give 2 (nothing was done: fix the arguments);
    ``failures`` print ``PROG: failed: TYPE: MESSAGE`` and give 1 (the command broke down on the way).
    """
    try:
        with contextlib.redirect_stdout(sys.stderr):
            summary = run()
    except bad_input as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except failures as err:
        print(f"{prog}: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0
