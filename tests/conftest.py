"""Shared pytest setup: one compute thread per process (CI shares two cores), a clean default dtype per test.

Markers (dist, slow, gpu) are registered in pyproject.toml. Multi-rank tests start their own processes through
``tests/dist/launch.py``; the pytest process itself never joins a process group.
"""

import os

# Before torch is imported, so that OpenMP sizes its pool from it; children spawned by tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _reset_default_dtype():
    """Restore torch's default dtype after each test, so a test that changes it cannot leak into the next."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
