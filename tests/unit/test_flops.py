"""Parameter and FLOPs accounting (mor_megatron.model.flops) and the ``mor-flops`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mor_megatron.cli.flops import main
from mor_megatron.config import PRESET_NAMES, preset
from mor_megatron.model.flops import (count_parameters, flops_per_token, paper_budget_flops_per_token,
                                      paper_budget_tokens, tokens_for_budget, training_flops)

SEQ = 2048
PAPER_TOKENS_PER_STEP = 1024 * 2048  # official configs: 1024 sequences x 2048 tokens


def _run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name,paper_millions", [
    ("360m-vanilla", 315), ("360m-mor-e-r2", 167), ("360m-mor-e-r3", 118), ("360m-mor-e-r4", 98),
    ("135m-mor-e-r3", 42),
    # Further rows of the paper's tables (App. Tab. model_arch, scaling_law, larger_parameters).
    ("135m-vanilla", 106), ("730m-vanilla", 654), ("730m-mor-e-r3", 252), ("1.7b-vanilla", 1610),
    ("1.7b-mor-e-r3", 670), ("1.7b-recursive-r2", 870),
])
def test_unique_non_embedding_params_match_paper(capsys, name, paper_millions):
    out = _run_json(capsys, "--model", name)
    paper = paper_millions * 1e6
    # Within 1%, or within the rounding of the paper's whole-million figure (135M MoR: 42.48M, printed 42M).
    assert abs(out["unique_non_embedding_params"] - paper) <= max(0.01 * paper, 0.5e6)


@pytest.mark.parametrize("name,paper_millions", [
    ("135m-vanilla", 28), ("360m-vanilla", 47), ("730m-vanilla", 75), ("1.7b-vanilla", 101)])
def test_embedding_params_match_paper(capsys, name, paper_millions):
    out = _run_json(capsys, "--model", name)
    assert round(out["embedding_params"] / 1e6) == paper_millions
    assert out["total_params"] == out["unique_non_embedding_params"] + out["embedding_params"]


def test_parameter_count_of_one_layer_by_hand():
    model, rec = preset("360m-vanilla")
    params = count_parameters(model, rec)
    per_layer = (15 + 2 * 5) * 64 * 960 + 960 * 960 + 2 * 2560 * 960 + 2560 * 960 + 2 * 960
    assert params.non_embedding == 32 * per_layer + 960
    assert params.router == 0 and params.output_layer == 0


def test_dense_flops_are_two_per_weight_per_token():
    for name in ("360m-vanilla", "360m-recursive-r4"):
        model, rec = preset(name)
        params = count_parameters(model, rec)
        flops = flops_per_token(model, rec, SEQ)
        matmul_weights = (params.attention + params.mlp) / params.unique_layers  # per layer, GQA-sized K/V
        assert flops.dense_linear == pytest.approx(2 * matmul_weights * params.unrolled_layers, rel=1e-12)
        assert flops.attention == pytest.approx(params.unrolled_layers * 2 * 960 * (SEQ + 1), rel=1e-12)


def test_untied_output_layer_is_embedding(capsys):
    tied = _run_json(capsys, "--model", "360m-vanilla")
    untied = _run_json(capsys, "--model", "360m-vanilla", "model.tie_embeddings=false")
    assert untied["unique_non_embedding_params"] == tied["unique_non_embedding_params"]
    assert untied["embedding_params"] == 2 * tied["embedding_params"]


def test_routers_are_counted_as_non_embedding():
    expert = count_parameters(*preset("360m-mor-e-r3"))
    token = count_parameters(*preset("360m-mor-t-r3"))
    recursive = count_parameters(*preset("360m-recursive-r3"))
    assert expert.router == token.router == 3 * 960
    assert expert.non_embedding == recursive.non_embedding + 3 * 960


def test_recursive_r2_has_vanilla_flops_and_about_half_the_params():
    vanilla, recursive = preset("360m-vanilla"), preset("360m-recursive-r2")
    assert vanilla[0].num_layers == recursive[0].num_layers == 32
    vanilla_flops, recursive_flops = flops_per_token(*vanilla, SEQ), flops_per_token(*recursive, SEQ)
    assert vanilla_flops.forward == pytest.approx(recursive_flops.forward, rel=1e-12)
    assert vanilla_flops.attention == pytest.approx(recursive_flops.attention, rel=1e-12)
    ratio = count_parameters(*recursive).non_embedding / count_parameters(*vanilla).non_embedding
    assert ratio == pytest.approx(17 / 32, rel=1e-3)  # 1 + 15 + 1 unique of 32 layers


def test_mor_expert_flops_scale_with_capacities():
    recursive = flops_per_token(*preset("360m-recursive-r3"), SEQ)
    mor = flops_per_token(*preset("360m-mor-e-r3"), SEQ)
    assert mor.tokens_per_recursion == (2048, 1365, 682)  # max(1, int(c * 2048)) for c = 1, 2/3, 1/3
    # 1 + 10 x 3 + 1 layers: the 2 edge layers see every token, the 10 shared ones sum(k_r) tokens.
    k = mor.tokens_per_recursion
    assert mor.dense_linear / recursive.dense_linear == pytest.approx((2 + 10 * sum(k) / SEQ) / 32, rel=1e-12)
    pairs = [t * (t + 1) for t in k]
    expected_attention = (2 + 10 * sum(pairs) / (SEQ * (SEQ + 1))) / 32
    assert mor.attention / recursive.attention == pytest.approx(expected_attention, rel=1e-12)
    assert mor.dense_linear / recursive.dense_linear == pytest.approx(22 / 32, rel=1e-3)
    assert mor.forward < recursive.forward


def test_router_flops():
    expert = flops_per_token(*preset("360m-mor-e-r3"), SEQ)
    assert expert.router == pytest.approx(2 * 960 * (2048 + 2048 + 1365) / SEQ)
    token = flops_per_token(*preset("360m-mor-t-r3"), SEQ)
    assert token.router == 2 * 960 * 3
    assert token.dense_linear == expert.dense_linear and token.attention == expert.attention
    assert flops_per_token(*preset("360m-recursive-r3"), SEQ).router == 0


def test_kv_shared_attends_over_the_full_sequence():
    recursion_wise = flops_per_token(*preset("360m-mor-e-r3"), SEQ)
    shared = flops_per_token(*preset("360m-mor-e-r3-kvshare"), SEQ)
    k = shared.tokens_per_recursion
    # Recursions 2 and 3: queries k_r over all 2048 keys (~k_r * N / 2 pairs) instead of ~k_r^2 / 2.
    extra_pairs = sum(t * (SEQ + 1) / 2 - t * (t + 1) / 2 for t in k[1:])
    assert shared.attention - recursion_wise.attention == pytest.approx(10 * 4 * 960 * extra_pairs / SEQ)
    assert shared.attention > recursion_wise.attention
    # Our attention still runs the K/V projections of the active tokens (fused QKV GEMM), so dense is equal.
    assert shared.dense_linear == recursion_wise.dense_linear


def test_paper_budget_skips_reused_kv_projections():
    model, rec = preset("360m-mor-e-r3")
    _, shared_rec = preset("360m-mor-e-r3-kvshare")
    skipped = 10 * 2 * 2 * 960 * 960 * (2 / 3 + 1 / 3)  # 10 layers, full-width K and V, recursions 2 and 3
    attention_extra = 10 * 4 * 960 * SEQ / 2 * ((2 / 3 + 1 / 3) - (4 / 9 + 1 / 9))
    difference = (paper_budget_flops_per_token(model, shared_rec, SEQ)
                  - paper_budget_flops_per_token(model, rec, SEQ))
    assert difference == pytest.approx(attention_extra - skipped)


@pytest.mark.parametrize("variant,paper_steps", [
    ("vanilla", 9438), ("recursive-r3", 9438), ("recursive-r4", 8883), ("mor-e-r2", 12619),
    ("mor-e-r3", 14161), ("mor-e-r4", 14216), ("mor-t-r3", 14161), ("mor-e-r3-kvshare", 14672)])
def test_paper_budget_reproduces_official_step_counts(variant, paper_steps):
    model, rec = preset(f"360m-{variant}")
    steps = 16.5e18 / (paper_budget_flops_per_token(model, rec, SEQ) * PAPER_TOKENS_PER_STEP)
    assert abs(steps - paper_steps) < 1.0


@pytest.mark.parametrize("name,budget,paper_billions", [
    ("135m-vanilla", 16.5e18, 53.3), ("135m-recursive-r3", 16.5e18, 50.0), ("135m-mor-e-r3", 16.5e18, 76.2),
    ("135m-mor-e-r3", 2e18, 9.2), ("730m-vanilla", 16.5e18, 10.1), ("730m-mor-e-r3", 16.5e18, 14.9),
    ("1.7b-vanilla", 5e18, 1.5), ("1.7b-mor-e-r3", 16.5e18, 6.5), ("1.7b-mor-e-r2", 68.5e18, 26),
    ("1.7b-mor-e-r3", 68.5e18, 27)])
def test_paper_budget_reproduces_scaling_table_tokens(name, budget, paper_billions):
    tokens = paper_budget_tokens(*preset(name), SEQ, budget) / 1e9
    digits = 0 if budget == 68.5e18 else 1  # the tables' precision
    assert round(tokens, digits) == paper_billions


def test_training_flops_are_three_forwards_and_budget_round_trips():
    model, rec = preset("360m-mor-e-r2")
    breakdown = flops_per_token(model, rec, SEQ)
    assert breakdown.training_flops_per_token == 3 * breakdown.forward
    assert breakdown.forward_with_lm_head == breakdown.forward + 2 * 49152 * 960
    assert training_flops(model, rec, SEQ, 1e9) == pytest.approx(1e9 * breakdown.training_flops_per_token)
    tokens = tokens_for_budget(model, rec, SEQ, 16.5e18)
    assert training_flops(model, rec, SEQ, tokens) <= 16.5e18 < training_flops(model, rec, SEQ, tokens + 1)
    with_head = tokens_for_budget(model, rec, SEQ, 16.5e18, include_lm_head=True)
    assert with_head < tokens


def test_cli_budget_fields(capsys):
    out = _run_json(capsys, "--model", "360m-vanilla", "--flops-budget", "16.5e18")
    assert out["paper_budget_tokens"] // PAPER_TOKENS_PER_STEP == 9438
    assert out["training_flops"] <= 16.5e18
    assert out["tokens"] == pytest.approx(16.5e18 / out["training_flops_per_token"], abs=1)
    out = _run_json(capsys, "--model", "360m-mor-e-r3", "--tokens", "20e9")
    assert out["tokens"] == 20_000_000_000
    assert out["training_flops"] == pytest.approx(20e9 * out["training_flops_per_token"])
    assert out["paper_budget_flops"] == pytest.approx(11.1e18, rel=0.01)  # paper: "11.0" for its 19.8B tokens


def test_cli_seq_length_and_overrides(capsys):
    short = _run_json(capsys, "--model", "360m-vanilla", "--seq-length", "1024")
    full = _run_json(capsys, "--model", "360m-vanilla")
    assert short["seq_length"] == 1024 and short["forward_flops_per_token"] < full["forward_flops_per_token"]
    custom = _run_json(capsys, "--model", "360m-mor-e-r3", "recursion.capacities=[1.0,0.5,0.25]")
    assert custom["tokens_per_recursion"] == [2048, 1024, 512]


def test_cli_config_file(tmp_path: Path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("preset: 135m-mor-e-r3\n")
    from_file = _run_json(capsys, "--config", str(path))
    from_preset = _run_json(capsys, "--model", "135m-mor-e-r3")
    assert from_file == from_preset


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_reports(capsys, name):
    out = _run_json(capsys, "--model", name)
    assert out["preset"] == name
    assert out["unique_non_embedding_params"] > 0 and out["training_flops_per_token"] > 0
    assert out["unique_layers"] <= out["unrolled_layers"]
    assert main(["--model", name, "--tokens", "1e9"]) == 0
    table = capsys.readouterr().out
    assert "unique non-embedding params" in table and "training FLOPs" in table


def test_bad_preset_exits_2_naming_close_matches(capsys):
    assert main(["--model", "360m-mor-e-r5", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "360m-mor-e-r5" in captured.err and "360m-mor-e-r4" in captured.err


@pytest.mark.parametrize("argv,message", [
    (["--model", "360m-vanilla", "--seq-length", "0"], "--seq-length"),
    (["--model", "360m-vanilla", "--flops-budget", "-1"], "--flops-budget"),
    (["--model", "360m-vanilla", "recursion.num_recursions=4"], "model.num_layers"),
    (["--model", "360m-vanilla", "model.hiden_size=8"], "model.hidden_size"),
])
def test_bad_input_exits_2_with_a_message(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_imports_without_torch():
    # A None entry makes any `import torch` raise ImportError.
    code = ("import sys; sys.modules['torch'] = None; "
            "import mor_megatron.cli.flops, mor_megatron.model.flops")
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)
