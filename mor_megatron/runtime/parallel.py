"""Process-group start-up: parallel layout, launcher environment, device, megatron-core model parallel state.

This is the only place in ``mor_megatron`` that touches megatron-core's ``parallel_state`` globals. Everything
downstream receives the :class:`DistributedContext` and passes ``ctx.pg_collection`` to megatron-core
constructors explicitly.

Launchers supported: torchrun and the DeepSpeed launcher (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT``), ``srun`` without torchrun (``SLURM_PROCID``/``SLURM_NTASKS``/
``SLURM_LOCALID``, with ``MASTER_ADDR``/``MASTER_PORT`` exported by the batch script), a plain single process,
and a process group that someone else (tests, DeepSpeed) has already initialised.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from mor_megatron.config import ConfigError, ParallelConfig
from mor_megatron.runtime.child_processes import arm_checkpoint_helpers
from mor_megatron.runtime.cpu import enable_cpu_runtime
from mor_megatron.runtime.network import use_route_interfaces

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

_BACKENDS = ("nccl", "gloo")


@dataclass(frozen=True)
class ParallelDims:
    """Parallel layout of one job: ``tp * pp * dp == world_size``. Needs no process group.

    Attributes:
        tp: tensor-parallel size.
        pp: pipeline-parallel size.
        dp: data-parallel size (derived by :meth:`from_config`).
        world_size: number of ranks in the job.
    """

    tp: int
    pp: int
    dp: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ParallelDims.{name} must be an integer >= 1, got {value!r}")
        if self.tp * self.pp * self.dp != self.world_size:
            raise ConfigError(
                f"parallel layout does not fill the job: tp={self.tp} x pp={self.pp} x dp={self.dp} = "
                f"{self.tp * self.pp * self.dp}, but world_size={self.world_size}"
            )

    @classmethod
    def from_config(cls, parallel_config: ParallelConfig, world_size: int) -> ParallelDims:
        """Derive the layout from the ``parallel`` config section; dp = world_size / (tp * pp).

        Raises:
            ConfigError: world_size is not a positive multiple of tp * pp; the message names every factor.
        """
        tp = parallel_config.tensor_parallel_size
        pp = parallel_config.pipeline_parallel_size
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ConfigError(f"world_size must be an integer >= 1, got {world_size!r}")
        if world_size % (tp * pp) != 0:
            raise ConfigError(
                f"world_size={world_size!r} is not a multiple of parallel.tensor_parallel_size={tp} x "
                f"parallel.pipeline_parallel_size={pp} = {tp * pp}, so the data-parallel size "
                f"world_size / (tp x pp) is not an integer; launch a multiple of {tp * pp} ranks or change "
                f"parallel.tensor_parallel_size / parallel.pipeline_parallel_size"
            )
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp), world_size=world_size)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher describes it through environment variables.

    Attributes:
        rank, world_size: global rank (0-based) and number of ranks.
        local_rank, local_world_size: rank on this node (0-based; selects the GPU) and ranks on this node.
        node_rank, num_nodes: node index (0-based) and number of nodes.
        master_addr, master_port: rendezvous address, None when the launcher did not set it.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str | None
    master_port: int | None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> LaunchEnv:
        """Read torchrun / DeepSpeed launcher / srun variables; no variables at all means a single process.

        Precedence: torchrun/DeepSpeed (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) over Slurm
        (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``). Node layout: ``LOCAL_WORLD_SIZE``
        (torchrun) / ``LOCAL_SIZE`` (DeepSpeed) and ``GROUP_RANK``/``GROUP_WORLD_SIZE`` (torchrun),
        ``CROSS_RANK``/``CROSS_SIZE`` (DeepSpeed), ``SLURM_NODEID``/``SLURM_NNODES``; otherwise all ranks are
        taken to share one node.

        Raises:
            RuntimeError: a variable is not an integer, or a multi-rank job gives no local rank.
        """
        env = os.environ if environ is None else environ
        world_size = _env_int(env, "WORLD_SIZE", "SLURM_NTASKS") or 1
        rank = _env_int(env, "RANK", "SLURM_PROCID") or 0
        local_rank = _env_int(env, "LOCAL_RANK", "SLURM_LOCALID")
        if local_rank is None:
            if world_size > 1:
                raise RuntimeError(
                    f"rank {rank} of {world_size}: no local rank in the environment; launch with torchrun, "
                    "the DeepSpeed launcher or srun, or export LOCAL_RANK"
                )
            local_rank = 0
        num_nodes_slurm = _env_int(env, "SLURM_NNODES")
        local_world_size = _env_int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
        if local_world_size is None:
            homogeneous = num_nodes_slurm and world_size % num_nodes_slurm == 0
            local_world_size = world_size // num_nodes_slurm if homogeneous else world_size
        node_rank = _env_int(env, "GROUP_RANK", "CROSS_RANK", "SLURM_NODEID")
        num_nodes = _env_int(env, "GROUP_WORLD_SIZE", "CROSS_SIZE", "SLURM_NNODES")
        return cls(
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            local_world_size=local_world_size,
            node_rank=rank // local_world_size if node_rank is None else node_rank,
            num_nodes=max(1, world_size // local_world_size) if num_nodes is None else num_nodes,
            master_addr=env.get("MASTER_ADDR"),
            master_port=_env_int(env, "MASTER_PORT"),
        )


def _env_int(env: Mapping[str, str], *names: str) -> int | None:
    """The first of ``names`` that is set, as an int; None when none is set."""
    for name in names:
        value = env.get(name)
        if value is not None and value != "":
            try:
                return int(value)
            except ValueError:
                raise RuntimeError(f"environment variable {name}={value!r} must be an integer") from None
    return None


@dataclass(frozen=True)
class DistributedContext:
    """What the rest of mor_megatron needs to know about the job; built by :func:`init_distributed`.

    Attributes:
        dims: the parallel layout.
        device: where this rank's tensors live (``cuda:<local_rank>`` or ``cpu``).
        pg_collection: megatron-core process groups; pass it to every megatron-core constructor.
        rank: global rank, 0-based.
        local_rank: rank on this node, 0-based.
        node_rank: node index, 0-based.
        num_nodes: number of nodes in the job.
    """

    dims: ParallelDims
    device: torch.device
    pg_collection: ProcessGroupCollection
    rank: int
    local_rank: int
    node_rank: int
    num_nodes: int

    @property
    def tp_rank(self) -> int:
        """This rank's index in its tensor-parallel group."""
        return self.pg_collection.tp.rank()

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage, 0-based."""
        return self.pg_collection.pp.rank()

    @property
    def is_first_stage(self) -> bool:
        """Whether this rank runs the first pipeline stage (embedding, routers); always without a pipeline."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Whether this rank runs the last pipeline stage (output layer, loss); always without a pipeline."""
        return self.pp_rank == self.dims.pp - 1

    @property
    def dp_rank(self) -> int:
        """This rank's index in its data-parallel group."""
        return self.pg_collection.dp.rank()


def init_distributed(
    parallel_config: ParallelConfig,
    *,
    seed: int,
    virtual_pipeline_size: int | None = None,
    backend: str | None = None,
    timeout_s: float = 600,
) -> DistributedContext:
    """Join the job, set up megatron-core model parallel state and seed every RNG.

    Steps: read :class:`LaunchEnv`; pick the device (``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``
    with :func:`~mor_megatron.runtime.cpu.enable_cpu_runtime`); ``init_process_group`` unless a group
    already exists (one created by a test launcher or DeepSpeed is reused as is);
    ``initialize_model_parallel(tp, pp)``; seed ``random``, numpy and torch with ``seed`` and megatron's TP
    RNG tracker (``model_parallel_cuda_manual_seed``).

    Args:
        parallel_config: the ``parallel`` config section; dp is derived from the world size.
        seed: base seed, the same on every rank (megatron offsets the TP-rank streams itself).
        virtual_pipeline_size: virtual stages per pipeline rank (MoR: one per recursion), None for plain PP.
        backend: ``"nccl"`` or ``"gloo"``; default nccl with CUDA, gloo without.
        timeout_s: collective timeout for the process groups.

    Raises:
        ConfigError: the world size does not fit tp x pp.
        ValueError: unknown backend, nccl without CUDA, or a backend that differs from an existing group's.
        RuntimeError: model parallel state is already initialised (call ``destroy_distributed`` first), or the
            launcher environment is incomplete.
    """
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; use one of {_BACKENDS} or None (automatic)")
    launch = LaunchEnv.from_environ()
    # Before any rendezvous, so that a bad layout fails on every rank at once instead of hanging one.
    dims = ParallelDims.from_config(parallel_config, launch.world_size)
    # Before megatron is imported here: on CPU this switches the runtime on (jit fuser off for later imports).
    device = _select_device(launch.local_rank, backend)

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron model parallel state is already initialised; call destroy_distributed() first"
        )
    _init_process_group(launch, backend, device, timeout_s)
    # megatron's checkpoint save starts writer processes: they must not outlive a killed worker.
    arm_checkpoint_helpers()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size if dims.pp > 1 else None,
        distributed_timeout_minutes=timeout_s / 60,  # into a timedelta: fractions of a minute work
    )
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return DistributedContext(
        dims=dims,
        device=device,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        rank=dist.get_rank(),
        local_rank=launch.local_rank,
        node_rank=launch.node_rank,
        num_nodes=launch.num_nodes,
    )


def destroy_distributed(*, keep_process_group: bool = False) -> None:
    """Tear down megatron-core model parallel state, then the default process group; safe to call twice.

    Args:
        keep_process_group: keep the default process group, so that :func:`init_distributed` can set up
            another layout on the same ranks (layout sweeps in tests).
    """

    # Not imported means never initialised; importing megatron just to reset it would cost seconds.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None:
        parallel_state.destroy_model_parallel()
    if not keep_process_group and dist.is_initialized():
        dist.destroy_process_group()


def _select_device(local_rank: int, backend: str | None) -> torch.device:
    if not torch.cuda.is_available():
        if backend == "nccl":
            raise ValueError(
                "backend='nccl' needs CUDA, which is not available here; use backend='gloo' or None"
            )
        enable_cpu_runtime()
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible; "
            "start at most one rank per GPU on each node"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _init_process_group(
    launch: LaunchEnv, backend: str | None, device: torch.device, timeout_s: float
) -> None:
    if dist.is_initialized():
        if backend is not None and dist.get_backend() != backend:
            raise ValueError(
                f"the existing process group uses backend {dist.get_backend()!r}, not {backend!r}; "
                "pass backend=None to reuse it"
            )
        if (dist.get_rank(), dist.get_world_size()) != (launch.rank, launch.world_size):
            raise RuntimeError(
                f"the existing process group has rank {dist.get_rank()} of {dist.get_world_size()}, but the "
                f"environment says rank {launch.rank} of {launch.world_size}; set RANK, WORLD_SIZE and "
                "LOCAL_RANK to match the group"
            )
        return
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    timeout = timedelta(seconds=timeout_s)
    # Groups created later without a timeout (DeepSpeed's, megatron's checkpoint helpers) take torch's
    # module-level defaults (30 min gloo, 10 min NCCL): make them the job's timeout too.
    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
    # Binds NCCL communicators to this rank's GPU up front instead of guessing from the current device.
    device_id = device if device.type == "cuda" else None
    if launch.world_size == 1 and launch.master_addr is None:
        # A lone process needs no rendezvous address: an in-memory store does.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                device_id=device_id)
        return
    if launch.master_addr is None or launch.master_port is None:
        raise RuntimeError(
            f"rank {launch.rank} of {launch.world_size}: MASTER_ADDR and MASTER_PORT must be set for the "
            "rendezvous (torchrun and the DeepSpeed launcher set them; with srun, export them in the batch "
            "script)"
        )
    chosen = use_route_interfaces(launch.master_addr)
    if chosen and launch.local_rank == 0:
        print(f"rank {launch.rank}: sockets over {', '.join(f'{k}={v}' for k, v in chosen.items())} (the interface "
              f"that routes to MASTER_ADDR={launch.master_addr})", file=sys.stderr, flush=True)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=timeout,
        device_id=device_id,
    )
