"""Every RNG of a rank as plain tensors, so a checkpoint stores it without pickle and loads it weights-only.

Python's ``random``, numpy's legacy global generator, torch's CPU (and CUDA) generator and megatron's
tensor-parallel RNG tracker. Their native states are tuples and arrays that torch could only store by pickling
them, and unpickling a file from a checkpoint folder runs whatever code the file names. As tensors they travel
as sharded tensors (Megatron path) or in a ``torch.load(..., weights_only=True)`` file (DeepSpeed path).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from megatron.core import tensor_parallel

_TRACKER_PREFIX = "tracker."


def rng_state_tensors() -> dict[str, torch.Tensor]:
    """This rank's RNG states, keyed ``python.*``, ``numpy.*``, ``torch``, ``cuda`` and ``tracker.<name>``."""
    version, words, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python.words": torch.tensor([version, *words], dtype=torch.int64),
        # gauss_next is None or a float: a (present, value) pair keeps the shape fixed across ranks.
        "python.gauss_next": torch.tensor([gauss_next is not None, gauss_next or 0.0], dtype=torch.float64),
        "numpy.keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy.position": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy.cached_gaussian": torch.tensor([cached_gaussian], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, tracker_state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        state[_TRACKER_PREFIX + name] = tracker_state.cpu()
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Set every RNG from :func:`rng_state_tensors` output (saved on a job with the same layout)."""
    version, *words = (int(value) for value in state["python.words"].tolist())
    has_gauss_next, gauss_next = state["python.gauss_next"].tolist()
    random.setstate((version, tuple(words), gauss_next if has_gauss_next else None))
    pos, has_gauss = (int(value) for value in state["numpy.position"].tolist())
    np.random.set_state(("MT19937", state["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy.cached_gaussian"][0])))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8))
    tracker = {key[len(_TRACKER_PREFIX):]: value.to(torch.uint8) for key, value in state.items()
               if key.startswith(_TRACKER_PREFIX)}
    tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
