"""Distributed runtime: launcher environment, parallel layout, megatron-core process groups, CPU runtime.

The only package of mor_megatron that touches megatron-core's ``parallel_state``. Typical use::

    ctx = init_distributed(config.parallel, seed=config.data.seed)
    model = build_model(config, pg_collection=ctx.pg_collection, device=ctx.device)
    ...
    destroy_distributed()
"""

from mor_megatron.runtime.child_processes import stop_checkpoint_helpers
from mor_megatron.runtime.cpu import cpu_runtime_enabled, enable_cpu_runtime
from mor_megatron.runtime.parallel import (
    DistributedContext,
    LaunchEnv,
    ParallelDims,
    destroy_distributed,
    init_distributed,
)

__all__ = [
    "DistributedContext",
    "LaunchEnv",
    "ParallelDims",
    "cpu_runtime_enabled",
    "destroy_distributed",
    "enable_cpu_runtime",
    "init_distributed",
    "stop_checkpoint_helpers",
]
