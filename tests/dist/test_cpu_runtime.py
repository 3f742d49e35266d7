"""The CPU runtime runs stock megatron-core TP, DP + distributed optimizer, PP and dist-checkpointing on gloo.

The multi-rank tests share one ``run_ranks`` spawn of 2 ranks that drives a tiny stock ``GPTModel`` (local
spec, RMSNorm, 2 layers, hidden 32, 4 heads, vocab 128, seq 16, fp32, CPU initialisation). A reference layout
is set up in the same processes after ``destroy_distributed(keep_process_group=True)``: a 2-rank world at
TP=1 is two identical replicas of the single-process model when both ranks get the same data, which avoids a
second spawn.
megatron imports stay inside the rank functions: the pytest process never loads the CPU runtime.
"""

from __future__ import annotations

import math

import pytest
import torch

from mor_megatron.config import ParallelConfig
from tests.dist.launch import run_ranks

SEED = 1234
SEQ_LENGTH = 16
MICRO_BATCH_SIZE = 2
VOCAB_SIZE = 128
LR = 1e-2


def _build_gpt(ctx, *, tie_embeddings: bool = True):
    """The tiny stock GPTModel for this rank's TP slice and PP stage."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, normalization="RMSNorm",
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=ctx.dims.tp, pipeline_model_parallel_size=ctx.dims.pp,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    return GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=VOCAB_SIZE,
        max_sequence_length=SEQ_LENGTH, position_embedding_type="rope",
        share_embeddings_and_output_weights=tie_embeddings, pg_collection=ctx.pg_collection,
        pre_process=ctx.pp_rank == 0, post_process=ctx.pp_rank == ctx.dims.pp - 1,
    )


def _microbatch(index: int) -> dict[str, torch.Tensor]:
    """Microbatch ``index`` (same on every rank): tokens, labels, position_ids, each [b, s]."""
    generator = torch.Generator().manual_seed(100 + index)
    tokens = torch.randint(0, VOCAB_SIZE, (MICRO_BATCH_SIZE, SEQ_LENGTH + 1), generator=generator)
    position_ids = torch.arange(SEQ_LENGTH).expand(MICRO_BATCH_SIZE, SEQ_LENGTH)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": position_ids}


def _lm_loss(model, batch) -> torch.Tensor:
    """Mean next-token loss of ``model`` (full model, PP=1) on ``batch``; causal mask built by megatron."""
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return per_token.float().mean()


def _grad_norm(model, ctx) -> float:
    """L2 norm of the full-model gradient, each TP-split parameter counted once over the TP group."""
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    grads = [p.grad for p in model.parameters()
             if p.grad is not None and param_is_not_tensor_parallel_duplicate(p)]
    return get_grad_norm_fp32(grads, grad_stats_parallel_group=ctx.pg_collection.tp)


def _forward_step(data_iterator, model):
    """megatron ``forward_step_func``: per-token losses [b, s] and a loss function averaging them."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        # clone: the schedule divides the returned loss in place by num_microbatches.
        return loss, {"lm_loss": loss.detach().clone()}

    return output, loss_func


def _train(ctx, microbatches: list[dict], steps: int, *, tie_embeddings: bool = True):
    """``steps`` optimizer steps of megatron DDP + distributed Adam through the megatron schedule.

    Every step runs the same ``microbatches``. Returns (model, [(loss or None, grad_norm) per step]); loss is
    the mean over microbatches and over the data-parallel group, None off the last pipeline stage.
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    model = _build_gpt(ctx, tie_embeddings=tie_embeddings)
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True),
        model, pg_collection=ctx.pg_collection,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, use_distributed_optimizer=True,
                        clip_grad=1.0),
        # megatron refuses its extra gloo groups together with an explicit pg_collection.
        [ddp], use_gloo_process_groups=False, pg_collection=ctx.pg_collection,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    schedule_kwargs = {"pg_collection": ctx.pg_collection}
    if ctx.dims.pp > 1:
        schedule_kwargs["p2p_communicator"] = P2PCommunicator(pp_group=ctx.pg_collection.pp,
                                                              config=model.config)
    forward_backward = get_forward_backward_func(pp_size=ctx.dims.pp, vp_size=None)
    history = []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(
            forward_step_func=_forward_step, data_iterator=iter(microbatches), model=[ddp],
            num_microbatches=len(microbatches), seq_length=SEQ_LENGTH, micro_batch_size=MICRO_BATCH_SIZE,
            forward_only=False, **schedule_kwargs,
        )
        succeeded, grad_norm, _ = optimizer.step()
        assert succeeded, "optimizer step was skipped"
        loss = None
        if reduced:
            loss = torch.stack([r["lm_loss"] for r in reduced]).mean()
            torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG, group=ctx.pg_collection.dp)
            loss = loss.item()
        history.append((loss, grad_norm))
    return model, history


def _tensor_parallel_and_checkpoint(ckpt_dir: str) -> dict:
    """TP=2 loss/grad-norm and a dist checkpoint; then at TP=1 the same from scratch, and the checkpoint."""
    from megatron.core import dist_checkpointing

    from mor_megatron.runtime import destroy_distributed, init_distributed

    batch = _microbatch(0)
    result = {}
    ctx = init_distributed(ParallelConfig(tensor_parallel_size=2), seed=SEED)
    model = _build_gpt(ctx)
    loss = _lm_loss(model, batch)
    loss.backward()
    result["tp2"] = (loss.item(), _grad_norm(model, ctx))
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    destroy_distributed(keep_process_group=True)

    ctx = init_distributed(ParallelConfig(tensor_parallel_size=1), seed=SEED)
    model = _build_gpt(ctx)
    loss = _lm_loss(model, batch)
    loss.backward()
    result["tp1"] = (loss.item(), _grad_norm(model, ctx))
    # A second model draws later random numbers, so its weights differ until the checkpoint is loaded.
    model = _build_gpt(ctx)
    with torch.no_grad():
        result["tp1_fresh_eval"] = _lm_loss(model, batch).item()
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
        result["tp1_loaded_eval"] = _lm_loss(model, batch).item()
    destroy_distributed(keep_process_group=True)
    return result


def _data_parallel_training() -> dict:
    """Two steps at DP=2 (one microbatch per rank), then the global batch replicated on both ranks (DP=1)."""
    from mor_megatron.runtime import destroy_distributed, init_distributed

    global_batch = [_microbatch(0), _microbatch(1)]
    ctx = init_distributed(ParallelConfig(), seed=SEED)
    _, split = _train(ctx, [global_batch[ctx.dp_rank]], steps=2)
    destroy_distributed(keep_process_group=True)
    ctx = init_distributed(ParallelConfig(), seed=SEED)
    _, replicated = _train(ctx, global_batch, steps=2)
    destroy_distributed(keep_process_group=True)
    return {"dp2": split, "dp1": replicated}


def _pipeline_step() -> dict:
    """One 1F1B step at PP=2 with embeddings tied across the two stages."""
    from mor_megatron.runtime import destroy_distributed, init_distributed

    ctx = init_distributed(ParallelConfig(pipeline_parallel_size=2), seed=SEED)
    model, history = _train(ctx, [_microbatch(0), _microbatch(1)], steps=1)
    tied = model.embedding.word_embeddings.weight if ctx.pp_rank == 0 else model.output_layer.weight
    result = {"pp_rank": ctx.pp_rank, "loss": history[0][0], "grad_norm": history[0][1],
              "tied_weight": tied.detach().clone()}
    destroy_distributed(keep_process_group=True)
    return result


def _calls_from_outside_megatron() -> dict:
    """What the runtime's scoped patches do to calls from code that is not megatron (this test module)."""

    def raises(action) -> bool:
        try:
            action()
        except (AssertionError, RuntimeError):  # CPU-only torch: "Torch not compiled with CUDA enabled"
            return True
        return False

    import megatron.core.pipeline_parallel.schedules as megatron_schedules

    with torch.device("meta"):
        in_meta_context = torch.empty(2).device.type
    return {
        "zeros_cuda_raises": raises(lambda: torch.zeros(1, device="cuda")),
        "to_cuda_raises": raises(lambda: torch.ones(1).to("cuda")),
        "dot_cuda_raises": raises(lambda: torch.ones(1).cuda()),
        "current_stream_raises": raises(torch.cuda.current_stream),
        "type": torch.ones(1).type(),
        "meta": torch.empty(2, device="meta").device.type,
        "meta_context": in_meta_context,
        "torch_untouched": all(getattr(torch, name) is getattr(torch._C._VariableFunctions, name)
                               for name in ("zeros", "empty", "ones", "full", "arange", "tensor")),
        # megatron's own view: CUDA allocations land on the host, streams order nothing.
        "megatron_zeros": megatron_schedules.torch.zeros(1, device="cuda").device.type,
        "megatron_stream": megatron_schedules.torch.cuda.current_stream().query(),
    }


def _init_errors() -> dict:
    """Messages of init_distributed for a layout that does not fit 2 ranks and for a second init."""
    from mor_megatron.config import ConfigError
    from mor_megatron.runtime import destroy_distributed, init_distributed

    errors = {}
    try:
        init_distributed(ParallelConfig(tensor_parallel_size=4), seed=SEED)
    except ConfigError as error:
        errors["layout"] = str(error)
    init_distributed(ParallelConfig(), seed=SEED)
    try:
        init_distributed(ParallelConfig(), seed=SEED)
    except RuntimeError as error:
        errors["twice"] = str(error)
    destroy_distributed(keep_process_group=True)
    return errors


def _single_process_after_teardown() -> dict:
    """Tear everything down, forget the launcher variables and start again as a lone process."""
    import os

    import torch.distributed as dist

    from mor_megatron.runtime import destroy_distributed, init_distributed

    destroy_distributed()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(name)
    ctx = init_distributed(ParallelConfig(), seed=SEED)
    result = {"dims": ctx.dims, "device": str(ctx.device), "world_size": dist.get_world_size(),
              "backend": dist.get_backend(), "rank": ctx.rank, "num_nodes": ctx.num_nodes}
    destroy_distributed()
    result["group_left"] = dist.is_initialized()
    return result


def _all_layouts(rank: int, world_size: int, ckpt_dir: str) -> dict:
    """Every 2-rank scenario, one after the other on the same two processes; the lone-process one last."""
    return {"tp": _tensor_parallel_and_checkpoint(ckpt_dir), "dp": _data_parallel_training(),
            "pp": _pipeline_step(), "outside": _calls_from_outside_megatron(), "errors": _init_errors(),
            "single": _single_process_after_teardown()}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> list[dict]:
    """Per-rank results of :func:`_all_layouts`. One spawn serves all tests: starting 2 ranks and importing
    megatron-core costs 10-25 s on two busy cores, the scenarios themselves a few seconds."""
    tmp_path = tmp_path_factory.mktemp("layouts")
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    return run_ranks(_all_layouts, world_size=2, tmp_path=tmp_path, ckpt_dir=str(ckpt_dir))


@pytest.mark.dist
def test_tp2_matches_tp1_and_checkpoint_reshards_to_tp1(layouts):
    for result in (rank_result["tp"] for rank_result in layouts):
        (loss_tp2, norm_tp2), (loss_tp1, norm_tp1) = result["tp2"], result["tp1"]
        assert math.isfinite(loss_tp2) and norm_tp2 > 0
        assert loss_tp2 == pytest.approx(loss_tp1, abs=1e-5)
        assert norm_tp2 == pytest.approx(norm_tp1, abs=1e-5)
        # The fresh model really differs, and loading the TP=2 checkpoint restores the TP=2 model exactly.
        assert abs(result["tp1_fresh_eval"] - loss_tp2) > 1e-3
        assert result["tp1_loaded_eval"] == pytest.approx(loss_tp2, abs=1e-5)


@pytest.mark.dist
def test_ddp_distributed_optimizer_dp2_matches_dp1(layouts):
    rank0, rank1 = (rank_result["dp"] for rank_result in layouts)
    assert rank0 == rank1, "data-parallel ranks disagree on the reduced loss or grad norm"
    for (loss_dp2, norm_dp2), (loss_dp1, norm_dp1) in zip(rank0["dp2"], rank0["dp1"], strict=True):
        assert loss_dp2 == pytest.approx(loss_dp1, abs=1e-5)
        assert norm_dp2 == pytest.approx(norm_dp1, abs=1e-5)
    (first_loss, _), (second_loss, _) = rank0["dp2"]
    assert second_loss < first_loss - 1e-3, "two Adam steps on the same batch did not lower the loss"


@pytest.mark.dist
def test_pp2_one_f_one_b_step_with_tied_embeddings(layouts):
    first, last = sorted((rank_result["pp"] for rank_result in layouts), key=lambda r: r["pp_rank"])
    assert first["loss"] is None and math.isfinite(last["loss"])
    assert first["grad_norm"] == pytest.approx(last["grad_norm"]) and first["grad_norm"] > 0
    # The embedding grads were all-reduced across the stages, so the tied copies stay identical after Adam.
    assert torch.equal(first["tied_weight"], last["tied_weight"])


@pytest.mark.dist
def test_cpu_runtime_leaves_calls_from_outside_megatron_alone(layouts):
    for result in (rank_result["outside"] for rank_result in layouts):
        assert result == {"zeros_cuda_raises": True, "to_cuda_raises": True, "dot_cuda_raises": True,
                          "current_stream_raises": True, "type": "torch.FloatTensor", "meta": "meta",
                          "meta_context": "meta", "torch_untouched": True, "megatron_zeros": "cpu",
                          "megatron_stream": True}


@pytest.mark.dist
def test_init_distributed_rejects_bad_layout_and_second_init(layouts):
    for errors in (rank_result["errors"] for rank_result in layouts):
        assert "world_size=2" in errors["layout"] and "parallel.tensor_parallel_size=4" in errors["layout"]
        assert "destroy_distributed()" in errors["twice"]


@pytest.mark.dist
def test_init_distributed_as_a_lone_process_without_launcher_variables(layouts):
    from mor_megatron.runtime import ParallelDims

    for single in (rank_result["single"] for rank_result in layouts):
        assert single == {"dims": ParallelDims(tp=1, pp=1, dp=1, world_size=1), "device": "cpu",
                          "world_size": 1, "backend": "gloo", "rank": 0, "num_nodes": 1, "group_left": False}


def test_enable_cpu_runtime_does_nothing_when_cuda_is_available(monkeypatch):
    from mor_megatron.runtime import cpu

    if cpu.cpu_runtime_enabled():
        pytest.skip("the CPU runtime is already installed in this process")
    originals = {name: getattr(torch, name) for name in ("zeros", "empty", "tensor", "arange")}
    originals.update({"Tensor.to": torch.Tensor.to, "Tensor.cuda": torch.Tensor.cuda,
                      "Tensor.type": torch.Tensor.type, "cuda.current_device": torch.cuda.current_device,
                      "cuda.synchronize": torch.cuda.synchronize})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu.enable_cpu_runtime() is False
    assert not cpu.cpu_runtime_enabled()
    current = {name: getattr(torch, name) for name in ("zeros", "empty", "tensor", "arange")}
    current.update({"Tensor.to": torch.Tensor.to, "Tensor.cuda": torch.Tensor.cuda,
                    "Tensor.type": torch.Tensor.type, "cuda.current_device": torch.cuda.current_device,
                    "cuda.synchronize": torch.cuda.synchronize})
    assert all(current[name] is originals[name] for name in originals)
