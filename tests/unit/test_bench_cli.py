"""``mor-bench model`` and ``mor-bench train`` at toy sizes: they run, print the documented JSON keys with
positive values, and refuse a bad preset. Speed is not asserted (a benchmark, on a shared machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["--hidden-size", "64", "--seq-length", "32", "--batch-size", "2", "--json"]


def _bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mor_megatron.cli.bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def _json_line(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_prints_times_and_ratios(dtype):
    values = _json_line(_bench("model", *TINY, "--repeats", "1", "--dtype", dtype))
    assert values["device"] == "cpu" and values["dtype"] == dtype
    for key in ("mor_step_s", "vanilla_step_s", "time_ratio", "flops_ratio"):
        assert values[key] > 0, key


def test_train_prints_time_memory_and_ratios():
    values = _json_line(_bench("train", *TINY, "--steps", "2", "--warmup-steps", "0"))
    assert values["device"] == "cpu" and values["steps"] == 2 and values["tokens_per_step"] == 64
    for model in ("mor", "vanilla"):
        for key in ("step_s", "step_cpu_s", "tokens_per_s", "peak_mib", "resident_mib", "step_peak_mib",
                    "final_loss", "parameters"):
            assert values[f"{model}_{key}"] > 0, f"{model}_{key}"
        # Resident: at least the fp32 weights and AdamW's two moments, counted from the parameter total.
        assert values[f"{model}_resident_mib"] * 2**20 >= 3 * 4 * values[f"{model}_parameters"]
    for key in ("time_ratio", "cpu_time_ratio", "memory_ratio", "flops_ratio"):
        assert values[key] > 0, key
    # Same unrolled depth, fewer unique layers: MoR holds fewer parameters and runs fewer FLOPs per token.
    assert values["mor_parameters"] < values["vanilla_parameters"]
    assert values["flops_ratio"] < 1
    assert values["dtype"] == "float32" and values["mor_mfu"] is None  # no peak FLOP/s for a CPU


def test_train_in_bfloat16_holds_bf16_weights_and_learns():
    values = _json_line(_bench("train", *TINY, "--steps", "4", "--warmup-steps", "0", "--dtype", "bfloat16"))
    assert values["dtype"] == "bfloat16"
    fp32 = _json_line(_bench("train", *TINY, "--steps", "4", "--warmup-steps", "0"))
    # bf16 parameters and AdamW state take half the bytes of fp32 ones.
    assert values["mor_resident_mib"] < 0.6 * fp32["mor_resident_mib"]
    assert abs(values["mor_final_loss"] - fp32["mor_final_loss"]) < 0.5


def test_train_refuses_an_unknown_preset():
    result = _bench("train", "--preset", "tiny-mor-e-r9", *TINY, "--steps", "1")
    assert result.returncode == 2
    assert "unknown preset 'tiny-mor-e-r9'" in result.stderr


def test_memory_measures_one_model_at_a_time_and_sequence_parallel_activations():
    values = _json_line(_bench("memory", "--presets", "tiny-mor-e-r2", "--seq-length", "32", "--tensor-parallel", "2",
                               "--tp-preset", "tiny-mor-e-r2", "--tp-seq-length", "32", "--json"))
    mor, vanilla = values["pairs"]["tiny-mor-e-r2"]
    for model in (mor, vanilla):
        # fp32 weights and AdamW's two moments, counted from the parameter total, plus buffers and the batch.
        assert 12 * model["parameters"] <= model["resident_bytes"] < 12.2 * model["parameters"]
        assert model["step_peak_bytes"] > 0 and model["saved_bytes_per_token"] > 0
    assert mor["parameters"] < vanilla["parameters"]
    assert values["paper_memory_ratio"] == 0.75
    # Each TP rank keeps fewer activation bytes per token once norms and residuals hold half the sequence.
    assert [rank["rank"] for rank in values["tp_ranks"]] == [0, 1]
    for rank in values["tp_ranks"]:
        assert rank["mor_sp1"] < rank["mor_sp0"] and rank["vanilla_sp1"] < rank["vanilla_sp0"]


def test_memory_refuses_an_unknown_preset_and_a_shape_tp_cannot_split():
    result = _bench("memory", "--presets", "135m-mor-e-r9")
    assert result.returncode == 2 and "unknown preset '135m-mor-e-r9'" in result.stderr
    result = _bench("memory", "--tensor-parallel", "2", "--tp-preset", "360m-mor-e-r2")
    assert result.returncode == 2
    assert "model.num_attention_heads=15 is not divisible by --tensor-parallel 2" in result.stderr
