"""Experiment tracking: a JSONL copy of every metric always, and one MLflow run per job when enabled.

:mod:`.metrics` is the key table, :mod:`.sinks` the JSONL, fan-out and null sinks, :mod:`.run_info` a run's
name, tags and params, :mod:`.mlflow` the MLflow run, its sink and system metrics. Imports run one way:
:mod:`.mlflow` builds on :mod:`.sinks`, never the reverse, and :mod:`.start` (:func:`~.start.start_tracking`,
a collective on every rank) is the one module that picks backends; :mod:`.replay` is ``mor-track replay``.
Close the sink a rank gets in a ``finally``, with a :data:`~.sinks.RunStatus`. A dead tracking server never
stops training (:mod:`.mlflow`); sinks raise only for a bad metric key or artifact name, a bug in the caller.
"""
