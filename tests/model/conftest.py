"""Model tests run in one process with a 1-rank gloo group (megatron layers need parallel state)."""

from __future__ import annotations

import os

import pytest
import torch

from mor_megatron.config import ParallelConfig


@pytest.fixture(scope="module")
def pg_collection(tmp_path_factory):
    """megatron ProcessGroupCollection of a 1-rank world, per test module (torn down after it, so tests
    elsewhere that assert there is no process group are not affected)."""
    from mor_megatron.runtime import destroy_distributed, init_distributed

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rdzv = tmp_path_factory.mktemp("rdzv") / "file"
    torch.distributed.init_process_group("gloo", init_method=f"file://{rdzv}", world_size=1, rank=0)
    context = init_distributed(ParallelConfig(), seed=1234)
    yield context.pg_collection
    destroy_distributed()
