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
