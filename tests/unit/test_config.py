"""The config tree: presets, YAML + overrides round trip, and one clear error per validation rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mor_megatron.config import (
    PRESET_NAMES,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    layer_layout,
    load_config,
    preset,
    validate,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_builds_validates_and_round_trips(name):
    config = config_from_dict({"preset": name, "train": {"seq_length": 64}})
    validate(config, world_size=1)
    assert config_from_dict(config_to_dict(config)) == config
    import yaml

    assert config_from_dict(yaml.safe_load(dump_config(config))) == config


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_validates(path):
    config = load_config(path)
    validate(config)
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize("name,unique,unrolled", [
    ("360m-vanilla", 32, 32), ("360m-mor-e-r2", 17, 32), ("360m-mor-e-r3", 12, 32),
    ("360m-mor-e-r4", 10, 34), ("135m-mor-e-r3", 12, 32), ("1.7b-mor-e-r3", 10, 26), ("730m-mor-e-r3", 10, 26),
])
def test_presets_follow_the_paper_layouts(name, unique, unrolled):
    model, recursion = preset(name)
    layout = layer_layout(model, recursion)
    assert (layout.num_unique_layers, layout.num_unrolled_layers) == (unique, unrolled)


def test_default_capacities_and_router_defaults():
    _, rec = preset("360m-mor-e-r3")
    assert rec.effective_capacities == pytest.approx((1.0, 2 / 3, 1 / 3))
    assert rec.effective_alpha == 0.1 and rec.effective_aux_loss_coeff == 0.001
    _, token = preset("360m-mor-t-r3")
    assert token.effective_alpha == 1.0 and token.effective_aux_loss_coeff == 0.1


def test_sequence_layout_repeats_each_layer():
    model, rec = preset("tiny-recursive-r2")
    rec = type(rec)(num_recursions=2, sharing="sequence")
    layout = layer_layout(model, rec)
    assert [layout.recursion_layers(r) for r in range(2)] == [[0, 0, 1, 1], [2, 2, 3, 3]]


BAD = [
    (["recursion.shring=cycle"], "unknown config key 'recursion.shring'; did you mean 'recursion.sharing'"),
    (["model.hidden_size=65"], "model.hidden_size=65 must be divisible by model.num_attention_heads=4"),
    (["recursion.routing=expert"], r"recursion.routing='expert' is not one of"),
    (["recursion.kv_mode=paged"], r"recursion.kv_mode='paged' is not one of"),
    (["recursion.capacities=[0.5,1.0,0.2]"], "recursion.capacities must be non-increasing"),
    (["recursion.capacities=[1.0,0.5]"], "recursion.capacities has 2 entries but recursion.num_recursions=3"),
    (["recursion.sharing=sequence"], "recursion.sharing='sequence' cannot be routed"),
    (["model.num_layers=9"], r"model.num_layers=9 does not fit .* use model.num_layers=11"),
    (["parallel.tensor_parallel_size=3"], "model.num_attention_heads=4 is not divisible by parallel.tensor_parallel_size=3"),
    (["train.seq_length=512"], "train.seq_length=512 exceeds model.max_seq_length=256"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], "train.global_batch_size=6 is not divisible"),
    (["train.micro_batch_size=0"], "train.micro_batch_size must be an integer >= 1"),
    (["optim.warmup_steps=500"], "optim.warmup_steps=500 must be smaller than train.train_steps=100"),
    (["model.vocab_size=abc"], "model.vocab_size must be an integer"),
    (["preset=tiny-mor-x-r3"], "unknown preset 'tiny-mor-x-r3'"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel needs parallel.tensor_parallel_size > 1"),
    (["parallel.sequence_parallel=true", "parallel.tensor_parallel_size=2", "train.seq_length=63"],
     "train.seq_length=63 is not divisible by parallel.tensor_parallel_size=2"),
    (["parallel.collective_timeout_s=0"], "parallel.collective_timeout_s must be a number of seconds > 0"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_gets_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config = load_config(None, ["preset=tiny-mor-e-r3", *overrides])
        validate(config, world_size=1)


def test_world_size_must_fit_tp_times_pp():
    config = load_config(None, ["preset=tiny-mor-e-r3", "parallel.tensor_parallel_size=2"])
    with pytest.raises(ConfigError, match="world size 3 is not divisible by parallel.tensor_parallel_size=2"):
        validate(config, world_size=3)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['megatron'] = None; "
            "import mor_megatron.config as c; c.preset('360m-mor-e-r3')")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize(("text", "expected"), [
    ("preset: tiny-mor-e-r3\ntrain:\n  train_steps: 10\n   seq_length: 64\n",
     "is not valid YAML: mapping values are not allowed here at line 4, column 14; fix the syntax there"),
    ("preset: tiny-mor-e-r3\ndata:\n  blend: [a, b\n",
     "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 4, column 1"),
    ("preset: 'tiny-mor-e-r3\n", "is not valid YAML: found unexpected end of stream at line 2, column 1"),
], ids=["indentation", "unclosed-bracket", "unclosed-quote"])
def test_malformed_yaml_is_one_line_naming_file_and_place(tmp_path, text, expected):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert message.startswith(f"config file '{path}' ") and expected in message and "\n" not in message


def test_non_utf8_config_file_names_the_byte_offset(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"preset: tiny-mor-e-r3\noutput_dir: runs/caf\xe9\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xe9 at line 2, byte offset 42\); save it"):
        load_config(path)


def test_malformed_override_value_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'data.blend=\[a,': the value is not valid YAML"):
        load_config(None, ["preset=tiny-mor-e-r3", "data.blend=[a,"])


@pytest.mark.parametrize(("overrides", "save_dir"), [
    ([], "runs/default/checkpoints"),
    (["output_dir=runs/mine"], "runs/mine/checkpoints"),
    (["output_dir=runs/mine", "checkpoint.save_dir=elsewhere/ckpt"], "elsewhere/ckpt"),
    (["output_dir=runs/mine", "checkpoint.save_dir=null"], None),
], ids=["default-output-dir", "follows-output-dir", "explicit", "null-disables"])
def test_save_dir_defaults_under_output_dir(overrides, save_dir):
    config = load_config(None, ["preset=tiny-mor-e-r3", *overrides])
    assert config.checkpoint.save_dir == save_dir
    assert config_from_dict(config_to_dict(config)) == config  # the written config.yaml names the folder used


def test_demo_config_saves_under_whatever_output_dir_a_run_uses():
    assert load_config(REPO / "configs" / "demo.yaml").checkpoint.save_dir == "runs/demo/checkpoints"
    mine = load_config(REPO / "configs" / "demo.yaml", ["output_dir=runs/mine"])
    assert mine.checkpoint.save_dir == "runs/mine/checkpoints"
