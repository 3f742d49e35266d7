"""Tensor parallelism of the MoR model: TP=2 equals TP=1 in loss and every gradient; TP ranks route alike.

Weights travel from the TP=1 model to the TP=2 one through a dist checkpoint (which knows megatron's fused
QKV and SwiGLU layouts), and gradients come back the same way: each rank writes its gradients in place of the
weights into a sharded checkpoint, and a 1-rank job reads both as plain global tensors to compare.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist.launch import run_ranks

VARIANTS = {
    "none": ("tiny-recursive-r2", {}),
    "expert_choice": ("tiny-mor-e-r3", {}),
    "token_choice": ("tiny-mor-t-r3", {}),
    "expert_choice_kvshare": ("tiny-mor-e-r3-kvshare", {}),
}


def _save(model, path: Path, *, grads: bool) -> None:
    """Dist-checkpoint the model's weights, or its gradients under the weights' keys."""
    from megatron.core import dist_checkpointing

    params = list(model.parameters())
    backup = [p.data for p in params]
    if grads:
        for p in params:
            p.data = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p.data)
    try:
        path.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(path))
    finally:
        for p, data in zip(params, backup, strict=True):
            p.data = data


def _run_variants(rank: int, world_size: int, *, tp: int, workdir: str, sequence_parallel: bool = False) -> dict:
    from megatron.core import dist_checkpointing, parallel_state

    from mor_megatron.config import ParallelConfig
    from mor_megatron.model.block import MoRBlock
    from mor_megatron.runtime import init_distributed
    from tests.model.helpers import batch, make_model, tiny

    ctx = init_distributed(ParallelConfig(tensor_parallel_size=tp), seed=7)
    results = {}
    for variant, (name, overrides) in VARIANTS.items():
        model_cfg, recursion = tiny(name, **overrides)
        model = make_model(model_cfg, recursion, ctx.pg_collection, tp=tp, seed=3,
                           sequence_parallel=sequence_parallel)
        init_dir = Path(workdir) / variant / "init"
        if tp == 1:
            if model.decoder.router is not None:  # make routing decisions non-trivial
                with torch.no_grad():
                    model.decoder.router.weight.normal_(0, 1.0)
            _save(model, init_dir, grads=False)
        else:
            state = dist_checkpointing.load(model.sharded_state_dict(), str(init_dir))
            model.load_state_dict(state)

        masks = []
        original = MoRBlock._apply_shared

        def recording(self, recursion_idx, state, *args, **kwargs):
            if state.active is not None:
                masks.append(state.active.mask().clone())
            return original(self, recursion_idx, state, *args, **kwargs)

        MoRBlock._apply_shared = recording
        try:
            # 22 tokens: expert-choice keeps 14 and 7, so sequence parallelism pads the 7 to 8.
            tokens, positions = batch(model_cfg.vocab_size, batch_size=2, seq_length=22)
            loss = model(tokens, positions, None, labels=tokens).mean()
            loss.backward()
            _allreduce_sequence_parallel_grads(model)
        finally:
            MoRBlock._apply_shared = original

        # Every TP rank must have made the same routing decision.
        tp_group = parallel_state.get_tensor_model_parallel_group()
        for mask in masks:
            gathered = [torch.zeros_like(mask) for _ in range(tp)]
            torch.distributed.all_gather(gathered, mask, group=tp_group)
            assert all(torch.equal(g, mask) for g in gathered), f"{variant}: TP ranks routed differently"
        _save(model, Path(workdir) / variant / _grad_dir(tp, sequence_parallel), grads=True)
        results[variant] = {"loss": loss.item(), "masks": [m.tolist() for m in masks]}
    return results


def _allreduce_sequence_parallel_grads(model) -> None:
    """What megatron's finalize_model_grads does under sequence parallelism: sum the partial gradients of the
    parameters marked ``sequence_parallel`` (the norms) over the TP group."""
    from megatron.core import parallel_state

    for param in model.parameters():
        if getattr(param, "sequence_parallel", False) and param.grad is not None:
            torch.distributed.all_reduce(param.grad, group=parallel_state.get_tensor_model_parallel_group())


def _grad_dir(tp: int, sequence_parallel: bool) -> str:
    return f"grad_tp{tp}" + ("_sp" if sequence_parallel else "")


def _compare_grads(rank: int, world_size: int, *, workdir: str, other: str) -> dict:
    from megatron.core import dist_checkpointing

    diffs = {}
    for variant in VARIANTS:
        tp1 = dist_checkpointing.load_plain_tensors(str(Path(workdir) / variant / "grad_tp1"))
        tp2 = dist_checkpointing.load_plain_tensors(str(Path(workdir) / variant / other))
        assert tp1.keys() == tp2.keys()
        tensors = {k: v for k, v in tp1.items() if isinstance(v, torch.Tensor)}
        assert any("router" in k for k in tensors) == (variant != "none")
        diffs[variant] = {k: (tensors[k] - tp2[k]).abs().max().item() for k in tensors}
        diffs[variant]["_max_abs_grad"] = max(v.abs().max().item() for v in tensors.values())
    return diffs


@pytest.fixture(scope="module")
def tp1_reference(tmp_path_factory) -> tuple[str, dict]:
    """Weights, losses, routing and gradients of every variant at TP=1."""
    root = tmp_path_factory.mktemp("tp1")
    workdir = str(root / "ckpt")
    (ref,) = run_ranks(_run_variants, 1, root / "run", tp=1, workdir=workdir)
    return workdir, ref


@pytest.mark.dist
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_matches_tp1_loss_gradients_and_routing(tp1_reference, sequence_parallel, tmp_path):
    workdir, ref = tp1_reference
    tp2 = run_ranks(_run_variants, 2, tmp_path / "tp2", tp=2, workdir=workdir, sequence_parallel=sequence_parallel)
    for variant in VARIANTS:
        for rank_result in tp2:
            assert abs(rank_result[variant]["loss"] - ref[variant]["loss"]) <= 1e-5, variant
            assert rank_result[variant]["masks"] == ref[variant]["masks"], f"{variant}: TP=2 routed unlike TP=1"
    (diffs,) = run_ranks(_compare_grads, 1, tmp_path / "compare", workdir=workdir,
                         other=_grad_dir(2, sequence_parallel))
    for variant, per_key in diffs.items():
        assert per_key.pop("_max_abs_grad") > 1e-4, f"{variant}: gradients are trivially zero"
        worst = max(per_key.items(), key=lambda kv: kv[1])
        assert worst[1] <= 1e-5, f"{variant}: gradient {worst[0]} differs by {worst[1]:.2e}"
