"""GPU tests: selected with ``-m gpu`` (tools/gpu_check.sh runs them), skipped with a reason without CUDA.

The ``tests/conftest.py`` hook leaves CUDA visible only when ``-m gpu`` selects these tests, so the CPU suite
run on a GPU machine never touches the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from mor_megatron.config import ParallelConfig

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")


@pytest.fixture(scope="module")
def cuda_context():
    """A lone-process job on cuda:0 (NCCL, megatron model-parallel state); torn down after the module."""
    from mor_megatron.runtime import destroy_distributed, init_distributed

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(name, value)
    context = init_distributed(ParallelConfig(), seed=1234)
    yield context
    destroy_distributed()
