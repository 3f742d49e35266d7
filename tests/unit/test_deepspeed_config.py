"""The DeepSpeed path's config rules, its JSON merge, its checkpoint folder logic and its entry point's checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mor_megatron.config import ConfigError, config_from_dict, config_to_dict, load_config
from mor_megatron.checkpoint import deepspeed as ds_ckpt
from mor_megatron.checkpoint import layout
from mor_megatron.training.deepspeed_config import build_deepspeed_config, check_deepspeed_job

REPO = Path(__file__).resolve().parents[2]
SHIPPED_JSONS = sorted((REPO / "configs" / "deepspeed").glob("*.json"))


def _config(*overrides: str, json_values: dict | None = None, tmp_path: Path | None = None):
    extra = list(overrides)
    if json_values is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(json_values))
        extra.append(f"deepspeed.config={path}")
    return load_config(None, ["preset=tiny-mor-e-r3", "train.micro_batch_size=2", "train.global_batch_size=16",
                              "optim.lr=0.002", "optim.clip_grad=0.5", *extra])


def test_shipped_deepspeed_jsons_exist_for_every_stage():
    assert [p.name for p in SHIPPED_JSONS] == ["zero1.json", "zero2.json", "zero2_offload.json", "zero3.json",
                                               "zero3_offload.json"]


@pytest.mark.parametrize("path", SHIPPED_JSONS, ids=lambda p: p.name)
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_every_shipped_json_resolves_with_the_projects_values(path, device_type):
    config = _config(f"deepspeed.config={path}")
    ds = build_deepspeed_config(config, data_parallel_size=2, device_type=device_type)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        16, 2, 4)
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": device_type == "cuda"}
    assert "fp16" not in ds and "scheduler" not in ds
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW"
    assert (params["lr"], params["betas"], params["eps"], params["weight_decay"]) == (0.002, [0.9, 0.95], 1e-8, 0.1)
    offloaded = "offload" in path.name
    assert params["torch_adam"] is not offloaded  # torch AdamW needs no C++ build; offload needs DeepSpeedCPUAdam
    assert ds["zero_optimization"]["stage"] == int(path.name[4])
    assert (ds["zero_optimization"].get("offload_optimizer", {}).get("device") == "cpu") is offloaded
    assert json.loads(path.read_text())["train_batch_size"] == "auto"  # the file itself is left alone


def test_no_json_means_zero1_with_the_projects_values():
    ds = build_deepspeed_config(_config(), data_parallel_size=4, device_type="cpu")
    assert ds["zero_optimization"] == {"stage": 1}
    assert ds["gradient_accumulation_steps"] == 2


def test_zero_stage_field_overrides_the_json_and_offload_adds_cpu_offload(tmp_path):
    config = _config("deepspeed.zero_stage=3", "deepspeed.offload=true",
                     json_values={"zero_optimization": {"stage": 1}}, tmp_path=tmp_path)
    ds = build_deepspeed_config(config, data_parallel_size=2, device_type="cpu")
    zero = ds["zero_optimization"]
    assert (zero["stage"], zero["offload_optimizer"]["device"], zero["offload_param"]["device"]) == (3, "cpu", "cpu")
    assert ds["optimizer"]["params"]["torch_adam"] is False


@pytest.mark.parametrize("json_values,field", [
    ({"train_batch_size": 32}, "train.global_batch_size"),
    ({"train_micro_batch_size_per_gpu": 1}, "train.micro_batch_size"),
    ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps"),
    ({"gradient_clipping": 1.0}, "optim.clip_grad"),
    ({"bf16": {"enabled": True}}, "train.precision"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, "optim.lr"),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999]}}}, "optim.adam_beta1"),
    ({"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.0}}}, "optim.weight_decay"),
])
def test_a_json_value_that_disagrees_with_the_config_is_an_error_naming_both(tmp_path, json_values, field):
    config = _config(json_values=json_values, tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_deepspeed_config(config, data_parallel_size=2, device_type="cpu")


def test_a_json_value_equal_to_the_config_is_accepted(tmp_path):
    config = _config(json_values={"train_batch_size": 16, "gradient_clipping": 0.5,
                                  "optimizer": {"type": "AdamW", "params": {"lr": 0.002}}}, tmp_path=tmp_path)
    assert build_deepspeed_config(config, data_parallel_size=2, device_type="cpu")["train_batch_size"] == 16


@pytest.mark.parametrize("json_values,match", [
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' section"),
    ({"fp16": {"enabled": True}}, "'fp16' section"),
    ({"optimizer": {"type": "SGD"}}, "optimizer.type='SGD'"),
    ({"optimizer": {"type": "AdamW", "params": {"adam_w_mode": False}}}, "adam_w_mode"),
    ({"zero_optimization": {"stage": 0}}, "zero_optimization.stage must be 1, 2 or 3"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}},
      "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}, "torch_adam"),
])
def test_refused_json_sections(tmp_path, json_values, match):
    with pytest.raises(ConfigError, match=match):
        build_deepspeed_config(_config(json_values=json_values, tmp_path=tmp_path), data_parallel_size=2,
                               device_type="cpu")


def test_missing_or_malformed_json_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="deepspeed.config=.*does not exist"):
        build_deepspeed_config(_config(f"deepspeed.config={tmp_path / 'nope.json'}"), data_parallel_size=1,
                               device_type="cpu")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        build_deepspeed_config(_config(f"deepspeed.config={bad}"), data_parallel_size=1, device_type="cpu")


def test_deepspeed_section_rules_and_round_trip():
    with pytest.raises(ConfigError, match="deepspeed.zero_stage must be 1, 2 or 3"):
        _config("deepspeed.zero_stage=0")
    with pytest.raises(ConfigError, match="unknown config key 'deepspeed.stage'"):
        _config("deepspeed.stage=2")
    config = _config("deepspeed.zero_stage=2", "deepspeed.config=configs/deepspeed/zero2.json")
    assert config_from_dict(config_to_dict(config)) == config


def test_the_deepspeed_path_refuses_pipeline_parallelism():
    config = _config("parallel.pipeline_parallel_size=2")
    with pytest.raises(ConfigError, match="parallel.pipeline_parallel_size=2: the DeepSpeed path"):
        check_deepspeed_job(config, world_size=4, device_type="cpu")


def test_the_deepspeed_path_refuses_sequence_parallelism():
    config = _config("parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true")
    with pytest.raises(ConfigError, match="parallel.sequence_parallel is not supported on the DeepSpeed path"):
        check_deepspeed_job(config, world_size=2, device_type="cpu")


def test_entry_point_check_exits_2_on_a_deepspeed_config_error(monkeypatch, capsys):
    from mor_megatron.pretrain_deepspeed import main

    monkeypatch.setenv("WORLD_SIZE", "4")
    code = main(["--config", str(REPO / "configs" / "demo.yaml"), "--check", "parallel.pipeline_parallel_size=2",
                 "--local_rank=0"])
    assert code == 2
    assert "parallel.pipeline_parallel_size=2" in capsys.readouterr().err


def test_deepspeed_config_module_needs_no_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['deepspeed'] = None; "
            "import mor_megatron.training.deepspeed_config")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -- checkpoint folders -------------------------------------------------------------------------------------------
def _fake_step(root: Path, step: int, *, complete: bool = True) -> Path:
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (folder / ds_ckpt.META_FILE).write_text(json.dumps({"step": step}))
    return folder


def test_latest_names_a_complete_step_else_the_newest_complete_one_is_used(tmp_path):
    assert layout.find_latest_step(tmp_path, ds_ckpt.META_FILE) is None
    _fake_step(tmp_path, 3)
    _fake_step(tmp_path, 6)
    _fake_step(tmp_path, 9, complete=False)  # a crash before meta.json: never loaded
    (tmp_path / "latest").write_text("step_00000003")
    assert layout.find_latest_step(tmp_path, ds_ckpt.META_FILE) == 3
    (tmp_path / "latest").write_text("step_00000009")
    assert layout.find_latest_step(tmp_path, ds_ckpt.META_FILE) == 6
    assert ds_ckpt.resolve_step_dir(tmp_path) == tmp_path / "step_00000006"
    assert ds_ckpt.resolve_step_dir(tmp_path / "step_00000003") == tmp_path / "step_00000003"


def test_publish_renames_points_latest_and_keeps_the_last_n(tmp_path):
    for step in (1, 2):
        _fake_step(tmp_path, step)
    tmp = tmp_path / layout.tmp_dir_name(3)
    tmp.mkdir()
    final = ds_ckpt.publish(tmp_path, 3, {"step": 3, "layout": {}}, keep_last=2)
    assert final == tmp_path / "step_00000003" and not tmp.exists()
    assert (tmp_path / "latest").read_text() == "step_00000003"  # DeepSpeed's format: the tag
    assert layout.complete_steps(tmp_path, ds_ckpt.META_FILE) == [2, 3]
    assert ds_ckpt.read_meta(final)["step"] == 3


def test_a_folder_without_a_checkpoint_is_a_clear_error(tmp_path):
    from mor_megatron.checkpoint.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no complete DeepSpeed checkpoint"):
        ds_ckpt.resolve_step_dir(tmp_path)
    with pytest.raises(CheckpointError, match="not a complete DeepSpeed checkpoint"):
        ds_ckpt.read_meta(_fake_step(tmp_path, 1, complete=False))


# -- tools/launch_deepspeed.sh (argument checks only; launches are tested in tests/dist) ---------------------------
def _launch_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=2\n\nnode-b slots=2\n")
    environment = {"PATH": "/usr/bin:/bin", "HOSTFILE": str(hostfile), **env}
    return subprocess.run(["bash", str(REPO / "tools" / "launch_deepspeed.sh"), "--config", "c.yaml"], cwd=tmp_path,
                          env=environment, capture_output=True, text=True, timeout=30)


def test_launch_script_help_and_per_node_checks(tmp_path):
    done = subprocess.run(["bash", str(REPO / "tools" / "launch_deepspeed.sh"), "--help"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0 and "NO_SSH=1" in done.stdout
    assert "MASTER_ADDR" in _launch_script(tmp_path, NO_SSH="1", NODE_RANK="0").stderr
    done = _launch_script(tmp_path, NO_SSH="1", NODE_RANK="2", MASTER_ADDR="10.0.0.1")
    assert done.returncode == 2 and "NODE_RANK=2 must be an integer in [0, 2)" in done.stderr
    done = _launch_script(tmp_path, NUM_NODES="3")
    assert done.returncode == 2 and "lists 2 hosts" in done.stderr
