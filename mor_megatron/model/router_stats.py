"""Accumulates detached router statistics over micro-batches for logging.

The model only records tensors; reducing across ranks and sending them to a tracker is the trainer's job.
Keys are ``router/<name>`` or, per recursion, ``router/<name>/r<n>`` with a 1-based recursion number (the model
indexes recursions from 0 internally).
"""

from __future__ import annotations

from collections import defaultdict

from torch import Tensor


class RouterStats:
    """Running sums of scalar router statistics; :meth:`pop` returns the means and resets."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = defaultdict(int)

    @staticmethod
    def key(name: str, recursion_idx: int | None = None) -> str:
        """Metric key for ``name`` at 0-based ``recursion_idx`` (None: not per recursion)."""
        return f"router/{name}" if recursion_idx is None else f"router/{name}/r{recursion_idx + 1}"

    def add(self, name: str, value: Tensor, recursion_idx: int | None = None) -> None:
        """Record one scalar (detached)."""
        key = self.key(name, recursion_idx)
        value = value.detach().float()
        self._sums[key] = value if key not in self._sums else self._sums[key] + value
        self._counts[key] += 1

    def add_all(self, values: dict[str, Tensor], recursion_idx: int | None = None) -> None:
        """Record several scalars at once."""
        for name, value in values.items():
            self.add(name, value, recursion_idx)

    def pop(self) -> dict[str, float]:
        """Means since the last pop, as Python floats; clears the accumulator."""
        means = {key: float(total) / self._counts[key] for key, total in self._sums.items()}
        self._sums.clear()
        self._counts.clear()
        return means
