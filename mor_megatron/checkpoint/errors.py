"""What goes wrong with a checkpoint: the project's error type, and what reading one may raise."""

from __future__ import annotations

from torch.distributed.checkpoint.api import CheckpointException

CHECKPOINT_READ_ERRORS = (Exception, CheckpointException)
"""What reading a checkpoint raises. torch's ``CheckpointException`` derives from ``BaseException``, so a plain
``except Exception`` let it past the project's own error message."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model; the message says which and why."""
