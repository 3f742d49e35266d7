"""Pipeline parallelism across recursion blocks (recursions are virtual pipeline stages).

Every layout trains the same model from the same weights on the same batches: PP=2 and TP=2 x PP=2 must give
the losses and grad norms of the single-rank run (KV sharing included), each shared weight must live on exactly
one pipeline rank, and checkpoints must move between PP=2 and PP=1.
"""

from __future__ import annotations

import pytest

from mor_megatron.tracking.metrics import MODEL_PARAMS_TOTAL, parameter_count_metrics
from tests.dist.launch import run_ranks
from tests.dist.pipeline_job import run_variants

STEPS = 5
VARIANTS = {
    "vanilla": {"preset": "tiny-vanilla"},
    "recursive-r3": {"preset": "tiny-recursive-r3"},
    "mor-e-r2": {"preset": "tiny-mor-e-r2", "overrides": {"model": {"num_layers": 10}}},
    "mor-e-r3": {"preset": "tiny-mor-e-r3"},
    "mor-e-r3-cycle": {"preset": "tiny-mor-e-r3",
                       "overrides": {"model": {"num_layers": 6}, "recursion": {"sharing": "cycle"}}},
    "mor-t-r3": {"preset": "tiny-mor-t-r3"},
    # KV sharing: later recursions reuse K/V recorded by chunk 0 of the same micro-batch, several in flight;
    # gates of 1 make the K/V gradient that those recursions send back to chunk 0 weigh in the grad norm.
    "mor-e-r3-kvshare": {"preset": "tiny-mor-e-r3-kvshare", "overrides": {"recursion": {"router_alpha": 1.0}}},
    # Shared weights are used by every recursion chunk: overlapped grad reduce must wait for the last use.
    "mor-e-r3-overlap": {"preset": "tiny-mor-e-r3", "overrides": {"parallel": {"overlap_grad_reduce": True}}},
    "mor-e-r3-plain-ddp": {"preset": "tiny-mor-e-r3",
                           "overrides": {"parallel": {"use_distributed_optimizer": False}}},
}


def _with_init(tmp_path, variants):
    return {name: {**spec, "init_dir": str(tmp_path / "init" / name)} for name, spec in variants.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-rank run of every variant; also writes the shared initial weights."""
    tmp = tmp_path_factory.mktemp("pp_reference")
    (result,) = run_ranks(run_variants, 1, tmp / "ranks", variants=_with_init(tmp, VARIANTS), tp=1, pp=1,
                          steps=STEPS)
    return tmp, result


def _assert_same_training(reference: dict, results: list[dict], layout: str) -> None:
    for name, ref in reference.items():
        last_stage = [r[name] for r in results if r[name]["pp_rank"] == max(x[name]["pp_rank"] for x in results)]
        assert ref["history"] and last_stage, f"{layout} {name}: nothing to compare"
        for got in last_stage:
            for step, (a, b) in enumerate(zip(ref["history"], got["history"], strict=True), start=1):
                assert abs(a["train/lm_loss"] - b["train/lm_loss"]) <= 1e-5, f"{layout} {name} step {step} loss"
                assert abs(a["optim/grad_norm"] - b["optim/grad_norm"]) <= 1e-5, f"{layout} {name} step {step} norm"


@pytest.mark.dist
def test_pp2_trains_like_pp1_and_holds_each_shared_layer_once(reference, tmp_path):
    ref_dir, ref = reference
    results = run_ranks(run_variants, 2, tmp_path / "ranks", variants=_with_init(ref_dir, VARIANTS), tp=1, pp=2,
                        steps=STEPS)
    _assert_same_training(ref, results, "pp2")
    # Overlapped reduce and plain DDP change nothing numerically (same seed, hence the same initial weights).
    for name in ("mor-e-r3-overlap", "mor-e-r3-plain-ddp"):
        _assert_same_training({name: ref["mor-e-r3"]}, results, f"pp2 {name}")
    for name in VARIANTS:
        per_rank = [r[name] for r in results]
        held = [layer for r in per_rank for layer in r["layers"]]
        assert sorted(held) == ref[name]["layers"], f"{name}: every unique layer on exactly one rank"
        # The largest rank holds at most half the shared block plus its unique layers, embedding/head, routers:
        # far less than the whole model.
        assert max(r["num_params"] for r in per_rank) < 0.75 * ref[name]["num_params"], name
        # Both stages hold the tied word embedding (first as input, last as output layer); counted once, the
        # stages add up to the single-rank model. Without the correction the total is one embedding too big.
        total = parameter_count_metrics([r["held_params"] for r in per_rank])[MODEL_PARAMS_TOTAL]
        assert total == ref[name]["num_params"] < sum(r["num_params"] for r in per_rank), name


@pytest.mark.dist
def test_tp2_pp2_trains_like_single_rank(reference, tmp_path):
    ref_dir, ref = reference
    variants = {k: v for k, v in VARIANTS.items() if k not in ("mor-e-r3-overlap", "mor-e-r3-plain-ddp")}
    results = run_ranks(run_variants, 4, tmp_path / "ranks", variants=_with_init(ref_dir, variants), tp=2, pp=2,
                        steps=STEPS, timeout_s=600)
    _assert_same_training({k: ref[k] for k in variants}, results, "tp2pp2")


@pytest.mark.dist
def test_tp2_pp2_with_sequence_parallel_trains_like_single_rank(reference, tmp_path):
    """Sequence parallelism under TP x PP: the stage tensors travel split over the TP ranks (1/tp of the packed
    rows each), routed recursions gather and re-split; 32 tokens keep 21 and 10 at recursions 2 and 3."""
    ref_dir, ref = reference
    names = ("recursive-r3", "mor-e-r3", "mor-t-r3", "mor-e-r3-kvshare")
    variants = {}
    for name in names:
        spec = VARIANTS[name]
        overrides = spec.get("overrides", {})
        variants[name] = {**spec, "overrides": {**overrides, "parallel": {**overrides.get("parallel", {}),
                                                                          "sequence_parallel": True}}}
    results = run_ranks(run_variants, 4, tmp_path / "ranks", variants=_with_init(ref_dir, variants), tp=2, pp=2,
                        steps=STEPS, timeout_s=600)
    _assert_same_training({k: ref[k] for k in variants}, results, "tp2pp2 sequence-parallel")


@pytest.mark.dist
def test_checkpoint_moves_between_pp2_and_pp1(reference, tmp_path):
    """PP=2 -> PP=1 (resumed, saved again) -> PP=2, the same eval loss at every hop. The last hop reads the PP=1
    checkpoint, so it fails if that save is skipped (a missing checkpoint raises in the job)."""
    ref_dir, _ = reference
    variants = {"mor-e-r3": VARIANTS["mor-e-r3"]}
    saved = run_ranks(run_variants, 2, tmp_path / "save", variants=_with_init(ref_dir, variants), tp=1, pp=2,
                      steps=2, save_dir=str(tmp_path / "ckpt_pp2"))
    (loaded,) = run_ranks(run_variants, 1, tmp_path / "load", variants=_with_init(ref_dir, variants), tp=1, pp=1,
                          steps=0, load_dir=str(tmp_path / "ckpt_pp2"), save_dir=str(tmp_path / "ckpt_pp1"))
    assert abs(saved[1]["mor-e-r3"]["eval_loss"] - loaded["mor-e-r3"]["eval_loss"]) <= 1e-6
    back = run_ranks(run_variants, 2, tmp_path / "back", variants=_with_init(ref_dir, variants), tp=1, pp=2,
                     steps=0, load_dir=str(tmp_path / "ckpt_pp1"))  # the PP=1 re-save, back at PP=2
    assert abs(back[1]["mor-e-r3"]["eval_loss"] - loaded["mor-e-r3"]["eval_loss"]) <= 1e-6
