"""ParallelDims and LaunchEnv: layout validation and launcher-environment parsing, no process group needed."""

import pytest

from mor_megatron.config import ConfigError, ParallelConfig
from mor_megatron.runtime import LaunchEnv, ParallelDims


@pytest.mark.parametrize(
    "tp,pp,world_size,dp",
    [(1, 1, 1, 1), (2, 1, 2, 1), (1, 2, 4, 2), (2, 2, 4, 1), (2, 2, 16, 4), (1, 1, 8, 8)],
    ids=["single", "tp2", "pp2dp2", "tp2pp2", "tp2pp2dp4", "dp8"],
)
def test_from_config_derives_dp(tp, pp, world_size, dp):
    config = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    dims = ParallelDims.from_config(config, world_size)
    assert (dims.tp, dims.pp, dims.dp, dims.world_size) == (tp, pp, dp, world_size)


@pytest.mark.parametrize("world_size", [3, 6, 10])
def test_from_config_rejects_world_size_that_tp_pp_do_not_divide(world_size):
    config = ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2)
    with pytest.raises(ConfigError) as excinfo:
        ParallelDims.from_config(config, world_size)
    message = str(excinfo.value)
    for factor in (f"world_size={world_size}", "parallel.tensor_parallel_size=2",
                   "parallel.pipeline_parallel_size=2", "= 4"):
        assert factor in message


@pytest.mark.parametrize("world_size", [0, -4, 2.0], ids=["zero", "negative", "float"])
def test_from_config_rejects_non_positive_world_size(world_size):
    with pytest.raises(ConfigError, match=rf"world_size must be an integer >= 1, got {world_size!r}"):
        ParallelDims.from_config(ParallelConfig(), world_size)


def test_direct_construction_checks_the_product_and_names_every_factor():
    with pytest.raises(ConfigError, match=r"tp=2 x pp=2 x dp=2 = 8, but world_size=4"):
        ParallelDims(tp=2, pp=2, dp=2, world_size=4)


@pytest.mark.parametrize("field", ["tp", "pp", "dp", "world_size"])
def test_direct_construction_rejects_non_positive_sizes(field):
    sizes = {"tp": 1, "pp": 1, "dp": 1, "world_size": 1, field: 0}
    with pytest.raises(ConfigError, match=rf"ParallelDims\.{field} must be an integer >= 1, got 0"):
        ParallelDims(**sizes)


def test_dims_are_frozen():
    dims = ParallelDims(tp=1, pp=1, dp=1, world_size=1)
    with pytest.raises(AttributeError):
        dims.tp = 2


def test_launch_env_without_variables_is_a_single_process():
    env = LaunchEnv.from_environ({})
    assert (env.rank, env.world_size, env.local_rank, env.node_rank, env.num_nodes) == (0, 1, 0, 0, 1)
    assert env.master_addr is None and env.master_port is None


def test_launch_env_torchrun_two_nodes():
    env = LaunchEnv.from_environ({
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
        "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29500",
    })
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.node_rank, env.num_nodes, env.master_addr, env.master_port) == (1, 2, "node0", 29500)


def test_launch_env_deepspeed_launcher():
    env = LaunchEnv.from_environ({"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_SIZE": "4",
                                  "CROSS_RANK": "1", "CROSS_SIZE": "2"})
    assert (env.local_world_size, env.node_rank, env.num_nodes) == (4, 1, 2)


def test_launch_env_srun_without_torchrun():
    env = LaunchEnv.from_environ({"SLURM_PROCID": "7", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3",
                                  "SLURM_NODEID": "1", "SLURM_NNODES": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (7, 8, 3, 4)
    assert (env.node_rank, env.num_nodes) == (1, 2)


def test_launch_env_torchrun_variables_win_over_slurm():
    env = LaunchEnv.from_environ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                  "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"})
    assert (env.rank, env.world_size, env.local_rank) == (1, 2, 1)


def test_launch_env_derives_node_from_local_world_size():
    env = LaunchEnv.from_environ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (env.node_rank, env.num_nodes) == (1, 2)


def test_launch_env_multi_rank_without_local_rank_fails():
    with pytest.raises(RuntimeError, match="no local rank.*LOCAL_RANK"):
        LaunchEnv.from_environ({"RANK": "1", "WORLD_SIZE": "2"})


def test_launch_env_non_integer_variable_names_it():
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE='two' must be an integer"):
        LaunchEnv.from_environ({"WORLD_SIZE": "two"})
