"""The GPU path: SDPA attention on CUDA, bf16 training next to fp32, CUDA memory metrics and MFU, resume on CUDA,
the HF export of a checkpoint trained and saved on CUDA, Transformer Engine layers when installed.

Tolerances: fp32 with TF32 off agrees to 1e-4 between kernels (flash/efficient vs dense); bf16 training follows
fp32 within 0.05 in loss over ten steps of a tiny model (bf16 keeps 8 mantissa bits; the loss starts near 7.6).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.dist.mlflow_server import free_port
from tests.dist.pretrain_job import jsonl_metrics, pretrain_command, torchrun_agents, wait_all
from tests.gpu.conftest import requires_cuda
from tests.model.helpers import batch, make_model, tiny

pytestmark = [pytest.mark.gpu, requires_cuda]

STEPS = 10


def _loss_and_grads(context, preset: str, core_attention: str, provider: str = "local"):
    model_cfg, recursion = tiny(preset)
    model = make_model(replace(model_cfg, core_attention=core_attention), recursion, context.pg_collection,
                       seed=7, provider=provider).cuda()
    if model.decoder.router is not None:
        with torch.no_grad():
            model.decoder.router.weight.normal_(0, 2.0, generator=torch.Generator("cuda").manual_seed(3))
    tokens, positions = (t.cuda() for t in batch(model_cfg.vocab_size, seq_length=64))
    loss = model(tokens, positions, None, labels=tokens).mean()
    loss.backward()
    return loss.item(), {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["tiny-mor-e-r3", "tiny-mor-t-r3", "tiny-mor-e-r3-kvshare"])
def test_sdpa_equals_megatron_attention_on_cuda(cuda_context, preset):
    torch.backends.cuda.matmul.allow_tf32 = False
    loss, grads = _loss_and_grads(cuda_context, preset, "sdpa")
    ref_loss, ref_grads = _loss_and_grads(cuda_context, preset, "megatron")
    assert abs(loss - ref_loss) <= 1e-4
    assert max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads) <= 1e-4


@pytest.mark.parametrize("preset", ["tiny-mor-e-r3", "tiny-mor-t-r3", "tiny-mor-e-r3-kvshare"])
def test_transformer_engine_layers_equal_local_ones(cuda_context, preset):
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed")
    loss, _ = _loss_and_grads(cuda_context, preset, "sdpa")
    te_loss, _ = _loss_and_grads(cuda_context, preset, "sdpa", provider="transformer_engine")
    assert abs(loss - te_loss) <= 1e-3


def _train(tiny_data, output_dir: Path, *extra: str) -> dict[int, dict[str, float]]:
    """``STEPS`` steps of the tiny demo model on one GPU under torchrun; the JSONL metrics per step."""
    overrides = [*tiny_data.overrides(), "preset=tiny-mor-e-r3", f"train.train_steps={STEPS}",
                 "train.seq_length=128", "train.micro_batch_size=4", "train.global_batch_size=8",
                 "train.log_interval=1", "train.eval_interval=5", "train.eval_steps=1", "optim.warmup_steps=2",
                 "tracking.enabled=false", f"output_dir={output_dir}", *extra]
    with torchrun_agents([pretrain_command(master_port=free_port(), overrides=overrides)],
                         output_dir / "logs") as agents:
        codes = wait_all(agents, timeout_s=300)
    assert codes == [0], agents[0].stderr.read_text()[-3000:]
    return jsonl_metrics(output_dir)


def test_bf16_training_follows_fp32_and_logs_cuda_memory_and_mfu(tiny_data, tmp_path):
    fp32 = _train(tiny_data, tmp_path / "fp32", "train.precision=fp32", "checkpoint.save_dir=null")
    bf16 = _train(tiny_data, tmp_path / "bf16", "train.precision=bf16", "checkpoint.save_dir=null")
    losses = {name: [run[s]["train/lm_loss"] for s in range(1, STEPS + 1)] for name, run in
              (("fp32", fp32), ("bf16", bf16))}
    assert max(abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"], strict=True)) <= 0.05, losses
    assert losses["bf16"][-1] < losses["bf16"][0], "bf16 training did not learn"
    last = bf16[STEPS]
    assert 0 < last["mem/peak_allocated_gib"] <= last["mem/peak_reserved_gib"]
    assert 0 < last["perf/mfu"] < 1 and last["perf/tflops_per_device"] > 0


def test_resume_on_cuda_continues_the_uninterrupted_run(tiny_data, tmp_path):
    straight = _train(tiny_data, tmp_path / "straight", "train.precision=bf16",
                      f"checkpoint.save_dir={tmp_path / 'straight' / 'ckpt'}")
    stopped_dir = tmp_path / "stopped"
    common = ("train.precision=bf16", f"checkpoint.save_dir={stopped_dir / 'ckpt'}",
              "checkpoint.save_interval=5")
    _train(tiny_data, stopped_dir, *common, "train.train_steps=5")
    resumed = _train(tiny_data, stopped_dir, *common)
    for step in range(6, STEPS + 1):
        assert abs(resumed[step]["train/lm_loss"] - straight[step]["train/lm_loss"]) <= 1e-4, step


def export_matches_the_trained_model(context, device: torch.device, workdir: Path) -> float:
    """Train a tiny MoR-E a few AdamW steps on ``device``, save it, export it to HF, load that on ``device``;
    the largest logit difference (causal routing) between the exported model and the trained one."""
    from mor_megatron.config import config_from_dict, config_to_dict, validate
    from mor_megatron.convert.to_hf import to_hf
    from mor_megatron.checkpoint.loop_state import LoopState
    from mor_megatron.checkpoint.megatron import Checkpointer
    from transformers import AutoModelForCausalLM

    config = config_from_dict({"preset": "tiny-mor-e-r3", "model": {"vocab_size": 256, "max_seq_length": 64},
                               "train": {"seq_length": 64}})
    validate(config)
    model = make_model(config.model, config.recursion, context.pg_collection, seed=5).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens, positions = (t.to(device) for t in batch(config.model.vocab_size, seq_length=64))
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        model(tokens, positions, None, labels=tokens).mean().backward()
        optimizer.step()
    Checkpointer(save_dir=str(workdir / "ckpt"), load_dir=None, keep_last=1, ctx=context).save(
        3, model_chunks=[model], optimizer=None, scheduler=None, loop=LoopState(step=3),
        config_dict=config_to_dict(config))
    to_hf(workdir / "ckpt", workdir / "hf", include_tokenizer=False)
    exported = AutoModelForCausalLM.from_pretrained(str(workdir / "hf"), trust_remote_code=True).to(device).eval()
    model.eval()
    with torch.no_grad():
        expected = model(tokens, positions, None, routing_mode="causal")
        actual = exported(tokens).logits
    return (actual - expected).abs().max().item()


def test_export_of_a_checkpoint_trained_on_cuda_equals_the_model(cuda_context, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    assert export_matches_the_trained_model(cuda_context, torch.device("cuda"), tmp_path) <= 1e-4
