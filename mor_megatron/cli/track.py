"""``mor-track``: tracking chores after a job.

    mor-track replay runs/demo                                   # after a tracking-server outage
    mor-track replay runs/demo --tracking-uri http://10.0.0.1:5000

``replay`` uploads every metric point of ``RUN_DIR/metrics.jsonl`` (and of the per-node system-metrics
copies beside it) that the job's MLflow run lacks, adds missing params and sets the run's final status from
the JSONL ``end`` record. A point the server has is never sent again, so replaying twice adds nothing. Prints
one JSON summary line; exit status 2 on bad input (no JSONL, no run in it), 1 when the server fails.
``--help`` imports neither torch nor MLflow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mor_megatron.cli.summary import print_summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mor-track", description="Tracking chores after a job.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    replay = commands.add_parser("replay", help="upload what the MLflow server lacks from a job's JSONL copy",
                                 description="Upload the metric points, params and final status that the "
                                 "job's MLflow run lacks, from its metrics JSONL. Idempotent.")
    replay.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the job's output_dir")
    replay.add_argument("--jsonl", type=Path, help="the metrics JSONL, when tracking.jsonl_path put it "
                        "outside RUN_DIR (default RUN_DIR/metrics.jsonl)")
    replay.add_argument("--tracking-uri", help="server to upload to (default: the one the JSONL names)")
    replay.add_argument("--timeout-s", type=float, default=30.0, help="HTTP timeout per request (default 30)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import requests
    from mlflow.exceptions import MlflowException

    from mor_megatron.tracking.replay import replay

    jsonl = args.jsonl or args.run_dir / "metrics.jsonl"
    return print_summary("mor-track replay",
                         lambda: replay(jsonl, tracking_uri=args.tracking_uri, timeout_s=args.timeout_s),
                         bad_input=(FileNotFoundError, ValueError),
                         failures=(MlflowException, requests.RequestException, OSError))


if __name__ == "__main__":
    sys.exit(main())
