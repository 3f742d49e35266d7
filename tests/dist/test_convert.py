"""Checkpoint conversion: Megatron (TP=1, TP=2) -> Hugging Face, logits matching; Llama -> MoR up-training.

Checkpoints are made cheaply: tiny models are built on gloo ranks, their routers widened so routing varies,
saved with the trainer's ``Checkpointer``, and their causal-routing (and top-k) logits recorded on the same
ranks (gathered over the vocabulary at TP=2). All conversions run in one 1-rank job (process start-up
dominates the cost); the HF models are loaded and compared in the pytest process, which never joins a
process group.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist.launch import run_ranks

VOCAB, SEQ, BATCH = 512, 24, 2
VARIANTS = {  # name -> (preset, recursion overrides, model overrides)
    "vanilla": ("tiny-vanilla", {}, {}),
    "recursive": ("tiny-recursive-r2", {}, {}),
    "mor_e": ("tiny-mor-e-r3", {}, {}),
    "mor_e_kvshare": ("tiny-mor-e-r3-kvshare", {}, {}),
    "mor_e_untied": ("tiny-mor-e-r2", {}, {"tie_embeddings": False}),
    "mor_t": ("tiny-mor-t-r3", {"token_balancing": "loss_free"}, {}),
}
ROUTED = ("mor_e", "mor_e_kvshare", "mor_e_untied", "mor_t")
PP2_VARIANTS = ("vanilla", "mor_e", "mor_t")  # shared blocks that split evenly over 2 stages
LLAMA_SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=8,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   rms_norm_eps=1e-5, tie_word_embeddings=True)
BROKEN = ("missing_shard", "partial_shard", "config_mismatch", "layout_mismatch", "incomplete")


def _tokens() -> torch.Tensor:
    return torch.randint(4, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))


# ------------------------------------------------------------------------------------------------------------
# Rank-side work
# ------------------------------------------------------------------------------------------------------------

def _job(variant: str, tokenizer: str, *, tp: int = 1, pp: int = 1):
    from mor_megatron.config import config_from_dict, validate

    name, recursion, model_overrides = VARIANTS[variant]
    config = config_from_dict({"preset": name, "model": {"vocab_size": VOCAB, "max_seq_length": 64,
                                                         **model_overrides},
                               "recursion": recursion, "train": {"seq_length": SEQ},
                               "parallel": {"tensor_parallel_size": tp, "pipeline_parallel_size": pp},
                               "data": {"tokenizer": tokenizer}})
    validate(config)
    return config


def _build(cfg, ctx, *, parallel=None):
    from mor_megatron.model.builder import build_model, transformer_config

    parallel = parallel or cfg.parallel
    mcore = transformer_config(cfg.model, cfg.recursion, parallel)
    return build_model(cfg.model, cfg.recursion, mcore, pg_collection=ctx.pg_collection, provider="local",
                       pipeline_seq_length=SEQ if parallel.pipeline_parallel_size > 1 else None)


def _widen_router(model) -> None:
    """Routing that varies across tokens; the same draw on every rank (routers are replicated)."""
    router = model.decoder.router
    if router is None:  # routing none, or a pipeline rank after the first
        return
    with torch.no_grad():
        draw = torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(9))
        router.weight.copy_(3.0 * draw)
        if hasattr(router, "depth_bias"):  # small enough to shift, not decide, the depth choice
            router.depth_bias.copy_(torch.tensor([0.02, -0.01, 0.0]))


def _save(model, cfg, ctx, folder: Path) -> None:
    from mor_megatron.config import config_to_dict
    from mor_megatron.checkpoint.loop_state import LoopState
    from mor_megatron.checkpoint.megatron import Checkpointer

    Checkpointer(save_dir=str(folder), load_dir=None, keep_last=1, ctx=ctx).save(
        5, model_chunks=[model], optimizer=None, scheduler=None, loop=LoopState(step=5),
        config_dict=config_to_dict(cfg))


def _logits(model, ctx) -> dict[str, torch.Tensor]:
    """Causal and top-k routing logits ``[b, s, V]`` on the fixed tokens, gathered over tensor parallelism."""
    model.eval()
    refs = {}
    with torch.no_grad():
        for mode in ("causal", "topk"):
            logits = model(_tokens(), torch.arange(SEQ).expand(BATCH, -1), None, routing_mode=mode)
            shards = [torch.empty_like(logits) for _ in range(ctx.dims.tp)]
            torch.distributed.all_gather(shards, logits.contiguous(), group=ctx.pg_collection.tp)
            refs[mode] = torch.cat(shards, dim=-1)
    return refs


def _make_checkpoints(rank: int, world_size: int, *, tp: int, workdir: str, tokenizer: str) -> dict:
    """Save one checkpoint per variant at this TP size; return its causal and top-k logits."""
    from mor_megatron.config import ParallelConfig
    from mor_megatron.runtime import destroy_distributed, init_distributed

    ctx = init_distributed(ParallelConfig(tensor_parallel_size=tp), seed=11)
    refs = {}
    for variant in VARIANTS:
        cfg = _job(variant, tokenizer, tp=tp)
        model = _build(cfg, ctx)
        _widen_router(model)
        _save(model, cfg, ctx, Path(workdir) / f"tp{tp}" / variant)
        refs[variant] = _logits(model, ctx)
    destroy_distributed(keep_process_group=True)
    return refs


def _make_pp2_checkpoints(workdir: str, tokenizer: str) -> None:
    """Save PP=2 checkpoints (each rank holds a slice of the shared block); no logits: see _pp2_references."""
    from mor_megatron.model.builder import virtual_pipeline_size
    from mor_megatron.runtime import destroy_distributed, init_distributed

    for variant in PP2_VARIANTS:
        cfg = _job(variant, tokenizer, pp=2)
        ctx = init_distributed(cfg.parallel, seed=11,
                               virtual_pipeline_size=virtual_pipeline_size(cfg.recursion, cfg.parallel))
        model = _build(cfg, ctx)
        _widen_router(model)
        _save(model, cfg, ctx, Path(workdir) / "pp2" / variant)
        destroy_distributed(keep_process_group=True)


def _two_rank_work(rank: int, world_size: int, *, workdir: str, tokenizer: str) -> dict:
    refs = _make_checkpoints(rank, world_size, tp=2, workdir=workdir, tokenizer=tokenizer)
    _make_pp2_checkpoints(workdir, tokenizer)
    return refs


def _pp2_references(root: Path) -> dict:
    """Logits of each PP=2 checkpoint loaded into a single-rank model (checkpoints reshard across PP)."""
    from megatron.core import dist_checkpointing

    from mor_megatron.config import ParallelConfig, config_from_dict
    from mor_megatron.checkpoint.megatron import Checkpointer
    from mor_megatron.runtime import destroy_distributed, init_distributed

    ctx = init_distributed(ParallelConfig(), seed=0)
    refs = {}
    for variant in PP2_VARIANTS:
        folder = root / "ckpt" / "pp2" / variant
        common = dist_checkpointing.load_common_state_dict(str(folder / "step_00000005"))
        cfg = config_from_dict(common["config"])
        model = _build(cfg, ctx, parallel=ParallelConfig())
        Checkpointer(save_dir=None, load_dir=str(folder), keep_last=1, ctx=ctx).load(
            model_chunks=[model], optimizer=None, scheduler=None)
        refs[variant] = _logits(model, ctx)
    destroy_distributed(keep_process_group=True)
    return refs


def _export_all(root: Path) -> None:
    """Every TP=1/TP=2 checkpoint -> HF (the first through the CLI), plus one sharded export."""
    from mor_megatron.cli.convert import main
    from mor_megatron.convert.to_hf import to_hf

    jobs = [(root / "ckpt" / f"tp{tp}" / v, root / f"hf_tp{tp}_{v}") for tp in (1, 2) for v in VARIANTS]
    jobs += [(root / "ckpt" / "pp2" / v, root / f"hf_pp2_{v}") for v in PP2_VARIANTS]
    (first_ckpt, first_out), *rest = jobs
    if main(["to-hf", str(first_ckpt), str(first_out)]) != 0:
        raise RuntimeError("mor-convert to-hf failed")
    for ckpt, out in rest:
        to_hf(ckpt, out)
    to_hf(root / "ckpt" / "tp1" / "mor_e" / "step_00000005", root / "hf_sharded", max_shard_size=200_000,
          include_tokenizer=False)


def _convert_errors(root: Path) -> dict[str, str]:
    from mor_megatron.convert import ConversionError
    from mor_megatron.convert.to_hf import to_hf

    messages = {}
    for case in BROKEN:
        try:
            to_hf(root / "broken" / case / "step_00000005", root / "broken_out" / case,
                  include_tokenizer=False)
        except ConversionError as err:
            messages[case] = str(err)
    return messages


def _round_trips(root: Path, llama: Path) -> dict:
    """Llama -> MoR (vanilla) -> HF, and Megatron -> HF -> Megatron; returns the Megatron-side comparison."""
    from megatron.core import dist_checkpointing

    from mor_megatron.convert.from_hf import from_hf
    from mor_megatron.convert.megatron_ckpt import lone_process_group
    from mor_megatron.convert.to_hf import to_hf

    from_hf(llama, root / "llama_mor", preset="tiny-vanilla")
    to_hf(root / "llama_mor", root / "llama_back", include_tokenizer=False)
    from_hf(root / "hf_tp1_vanilla", root / "megatron_back", preset="tiny-vanilla")
    with lone_process_group():
        original = dist_checkpointing.load_plain_tensors(
            str(root / "ckpt" / "tp1" / "vanilla" / "step_00000005"))
        back = dist_checkpointing.load_plain_tensors(str(root / "megatron_back" / "step_00000000"))
    # The trainer's checkpoint also holds per-rank RNG state tensors; the round trip concerns the model.
    keys = {k for k, v in original.items() if isinstance(v, torch.Tensor) and not k.startswith("rng_state.")}
    return {"keys_equal": keys == {k for k, v in back.items() if isinstance(v, torch.Tensor)},
            "max_diff": max((original[k] - back[k]).abs().max().item() for k in keys)}


def _uptrain(root: Path, llama: Path) -> dict:
    """Llama -> MoR-E R=2 (average init); load it as the trainer would, check the init, train a few steps."""
    from megatron.core import dist_checkpointing
    from safetensors.torch import load_file

    from mor_megatron.config import ParallelConfig, config_from_dict
    from mor_megatron.convert.from_hf import from_hf
    from mor_megatron.model.builder import build_model, transformer_config
    from mor_megatron.runtime import init_distributed
    from mor_megatron.checkpoint.megatron import Checkpointer

    out = root / "uptrain"
    summary = from_hf(llama, out, preset="tiny-mor-e-r2", init="average")
    ctx = init_distributed(ParallelConfig(), seed=0)
    common = dist_checkpointing.load_common_state_dict(str(out / "step_00000000"))
    cfg = config_from_dict(common["config"])
    model = build_model(cfg.model, cfg.recursion, transformer_config(cfg.model, cfg.recursion, cfg.parallel),
                        pg_collection=ctx.pg_collection, provider="local")
    loop = Checkpointer(save_dir=None, load_dir=str(out), keep_last=1, ctx=ctx).load(
        model_chunks=[model], optimizer=None, scheduler=None)
    source = load_file(str(llama / "model.safetensors"))
    down = [source[f"model.layers.{i}.mlp.down_proj.weight"] for i in range(8)]
    params = dict(model.named_parameters())

    def fc2(layer: int) -> torch.Tensor:
        return params[f"decoder.layers.{layer}.mlp.linear_fc2.weight"]

    init_errors = {"prefix": (fc2(0) - down[0]).abs().max().item(),
                   "shared0": (fc2(1) - (down[1] + down[4]) / 2).abs().max().item(),
                   "suffix": (fc2(4) - down[7]).abs().max().item()}
    tokens = torch.randint(4, VOCAB, (4, 33), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(32).expand(4, -1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "init_errors": init_errors, "step": loop.step,
            "weights_only": common["weights_only"], "plan": summary.source_layers,
            "num_layers": summary.num_layers}


def _single_rank_work(rank: int, world_size: int, *, root: str, tokenizer: str, llama: str) -> dict:
    root_path, llama_path = Path(root), Path(llama)
    refs = _make_checkpoints(rank, world_size, tp=1, workdir=str(root_path / "ckpt"), tokenizer=tokenizer)
    refs_pp2 = _pp2_references(root_path)
    _export_all(root_path)
    return {"refs_tp1": refs, "refs_pp2": refs_pp2, "errors": _convert_errors(root_path),
            "round_trip": _round_trips(root_path, llama_path), "uptrain": _uptrain(root_path, llama_path)}


# ------------------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A randomly initialised 8-layer LlamaForCausalLM saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama") / "tiny_llama"
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_SHAPE, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


def _break_copies(source: Path, root: Path) -> None:
    """Copies of a good step folder under ``root/<case>/``, each with one defect."""
    from megatron.core import dist_checkpointing

    from mor_megatron.checkpoint.integrity import write_manifest

    for case in BROKEN:
        shutil.copytree(source, root / case / source.name)
    sorted((root / "missing_shard" / source.name).glob("*.distcp"))[-1].unlink()
    partial = sorted((root / "partial_shard" / source.name).glob("*.distcp"))[0]
    partial.write_bytes(partial.read_bytes()[: partial.stat().st_size // 2])
    for case, section, edits in (("config_mismatch", "model", {"hidden_size": 128, "num_attention_heads": 8}),
                                 # 1 + 3 x 2 + 1 layers: one more unique layer than were saved
                                 ("layout_mismatch", "recursion", {"num_recursions": 2})):
        common = dist_checkpointing.load_common_state_dict(str(root / case / source.name))
        common["config"][section].update(edits)
        # A legacy common.pt takes precedence over the common state megatron-core >= 0.19 keeps in the shards.
        torch.save(common, root / case / source.name / "common.pt")
        # As if saved so (its checksums agree): the shape and layout checks are under test, not the checksums.
        write_manifest(root / case / source.name)
    (root / "incomplete" / source.name / "metadata.json").unlink()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_data, tiny_llama):
    """TP=2 checkpoints (2 ranks), then one rank: TP=1 checkpoints, all exports, error cases, from-hf runs."""
    root = tmp_path_factory.mktemp("convert")
    tokenizer = str(tiny_data.tokenizer)
    refs_tp2 = run_ranks(_two_rank_work, 2, root / "run_tp2", timeout_s=420, workdir=str(root / "ckpt"),
                         tokenizer=tokenizer)[0]
    _break_copies(root / "ckpt" / "tp2" / "mor_e" / "step_00000005", root / "broken")
    (result,) = run_ranks(_single_rank_work, 1, root / "run_tp1", timeout_s=480, root=str(root),
                          tokenizer=tokenizer, llama=str(tiny_llama))
    result["refs"] = {"tp1": result.pop("refs_tp1"), "tp2": refs_tp2, "pp2": result.pop("refs_pp2")}
    result["root"] = root
    return result


def _load_hf(path: Path, remote_code: bool):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=remote_code).eval()


# ------------------------------------------------------------------------------------------------------------
# to-hf
# ------------------------------------------------------------------------------------------------------------

EXPORTS = [("tp1", v) for v in VARIANTS] + [("tp2", v) for v in VARIANTS] + [("pp2", v) for v in PP2_VARIANTS]


@pytest.mark.dist
@pytest.mark.parametrize("layout,variant", EXPORTS, ids=[f"{v}-{layout}" for layout, v in EXPORTS])
def test_export_logits_match_megatron(converted, layout, variant):
    refs = converted["refs"][layout][variant]
    model = _load_hf(converted["root"] / f"hf_{layout}_{variant}", remote_code=variant != "vanilla")
    with torch.no_grad():
        out = model(_tokens(), **({"output_recursion_masks": True} if variant in ROUTED else {}))
        assert (out.logits - refs["causal"]).abs().max() <= 1e-4
        if variant.startswith("mor_e"):
            topk = model(_tokens(), routing_mode="topk").logits
            assert (topk - refs["topk"]).abs().max() <= 1e-4
    if variant in ROUTED:
        later = torch.stack(out.recursion_masks[1:])
        assert later.any() and not later.all(), "routing must vary for the comparison to mean something"


@pytest.mark.dist
@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_vanilla_export_is_a_plain_llama(converted, tiny_data, tp):
    import sentencepiece
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = converted["root"] / f"hf_tp{tp}_vanilla"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert not (folder / "modeling_mor.py").exists()
    model = LlamaForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        logits = model(_tokens()).logits
    assert (logits - converted["refs"][f"tp{tp}"]["vanilla"]["causal"]).abs().max() <= 1e-4
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tiny_data.tokenizer))
    text = "def main():\n    return  sys.exit(0)\n"
    assert tokenizer(text)["input_ids"] == processor.encode(text)
    assert tokenizer.decode(processor.encode(text)) == text


@pytest.mark.dist
def test_large_model_export_is_sharded(converted):
    folder = converted["root"] / "hf_sharded"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((folder / f).is_file() for f in files)
    assert not (folder / "tokenizer.json").exists()
    from transformers import AutoModel

    causal_lm = _load_hf(folder, remote_code=True)
    base = AutoModel.from_pretrained(str(folder), trust_remote_code=True).eval()
    with torch.no_grad():
        logits = causal_lm(_tokens()).logits
        hidden = base(_tokens()).last_hidden_state
    assert (logits - converted["refs"]["tp1"]["mor_e"]["causal"]).abs().max() <= 1e-4
    assert torch.allclose(causal_lm.lm_head(hidden), logits, atol=1e-5)


@pytest.mark.dist
def test_broken_checkpoints_fail_with_clear_errors(converted):
    messages = converted["errors"]
    assert set(messages) == set(BROKEN), f"some broken checkpoints converted: {set(BROKEN) - set(messages)}"
    assert "missing shard file" in messages["missing_shard"]
    assert "truncated" in messages["partial_shard"]
    assert "has shape" in messages["config_mismatch"] and "hidden_size=128" in messages["config_mismatch"]
    assert "missing tensors ['decoder.layers.4." in messages["layout_mismatch"]
    assert "incomplete" in messages["incomplete"]


def test_key_map_splits_fuses_and_names_unknown_keys():
    from mor_megatron.convert import ConversionError
    from mor_megatron.convert.hf_keys import AttentionShape, UnmappedKeyError, hf_to_megatron, megatron_to_hf

    shape = AttentionShape(num_heads=4, num_query_groups=2, head_dim=3)
    qkv = torch.arange(2 * 4 * 3 * 5, dtype=torch.float32).reshape(24, 5)
    fc1 = torch.randn(8, 5)
    tensors = {"decoder.layers.7.self_attention.linear_qkv.weight": qkv,
               "decoder.layers.7.mlp.linear_fc1.weight": fc1}
    hf = megatron_to_hf(tensors, shape)
    # Group 1's first query head sits after group 0's [q, q, k, v] rows of 3.
    assert torch.equal(hf["model.layers.7.self_attn.q_proj.weight"][6:9], qkv[12:15])
    assert torch.equal(hf["model.layers.7.self_attn.k_proj.weight"][:3], qkv[6:9])
    assert torch.equal(hf["model.layers.7.mlp.up_proj.weight"], fc1[4:])
    back = hf_to_megatron(hf, shape)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(UnmappedKeyError, match="model.layers.0.self_attn.q_norm.weight"):
        hf_to_megatron({"model.layers.0.self_attn.q_norm.weight": torch.ones(3)}, shape)
    del hf["model.layers.7.self_attn.v_proj.weight"]
    with pytest.raises(ConversionError, match="v_proj"):
        hf_to_megatron(hf, shape)


def test_cli_help_imports_neither_torch_nor_megatron():
    code = ("import sys; from mor_megatron.cli.convert import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'megatron' not in sys.modules, 'heavy import'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    assert "to-hf" in result.stdout and "from-hf" in result.stdout


def _convert_then_load(root: str, llama: str, out: str) -> None:
    """A user's script: convert both ways, then load the exports with transformers in the same process.

    Saves what it saw to ``out``: logits of the exports loaded after the conversions, device checks, and
    whether the conversion to HF needed megatron's CPU runtime or a process group.
    """
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from mor_megatron.convert.from_hf import from_hf
    from mor_megatron.convert.to_hf import to_hf
    from mor_megatron.runtime import cpu_runtime_enabled

    root_path = Path(root)
    to_hf(root_path / "ckpt" / "tp2" / "mor_e", root_path / "script_mor_e", include_tokenizer=False)
    to_hf_left_alone = not cpu_runtime_enabled() and not dist.is_initialized()
    # from-hf builds a megatron model on CPU, so it turns the (scoped) runtime on.
    from_hf(Path(llama), root_path / "script_llama_mor", preset="tiny-vanilla")
    to_hf(root_path / "script_llama_mor", root_path / "script_llama", include_tokenizer=False)
    logits = {}
    for name, remote_code in (("script_llama", False), ("script_mor_e", True)):
        model = AutoModelForCausalLM.from_pretrained(str(root_path / name), trust_remote_code=remote_code)
        with torch.no_grad():
            logits[name] = model.eval()(_tokens()).logits
    with torch.device("meta"):
        meta_context = torch.empty(2).device.type
    torch.save({"logits": logits, "to_hf_left_alone": to_hf_left_alone, "runtime_on": cpu_runtime_enabled(),
                "meta": torch.empty(2, device="meta").device.type, "meta_context": meta_context}, out)


@pytest.mark.dist
def test_exports_load_in_the_converting_process_as_in_a_fresh_one(converted, tiny_llama):
    root = converted["root"]
    out = root / "convert_then_load.pt"
    code = ("import sys; from tests.dist.test_convert import _convert_then_load; "
            "_convert_then_load(*sys.argv[1:])")
    result = subprocess.run([sys.executable, "-c", code, str(root), str(tiny_llama), str(out)],
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    seen = torch.load(out, weights_only=True)
    assert seen["to_hf_left_alone"], "to_hf switched on the CPU runtime or created a process group"
    assert seen["runtime_on"] and seen["meta"] == "meta" and seen["meta_context"] == "meta"
    for name, remote_code in (("script_llama", False), ("script_mor_e", True)):
        with torch.no_grad():
            fresh = _load_hf(root / name, remote_code)(_tokens()).logits
        assert (seen["logits"][name] - fresh).abs().max().item() <= 1e-5, name


# ------------------------------------------------------------------------------------------------------------
# from-hf
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.dist
def test_vanilla_round_trips_are_exact(converted, tiny_llama):
    from safetensors.torch import load_file

    original = load_file(str(tiny_llama / "model.safetensors"))
    back = load_file(str(converted["root"] / "llama_back" / "model.safetensors"))
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    config = json.loads((converted["root"] / "llama_back" / "config.json").read_text())
    assert {k: config[k] for k in LLAMA_SHAPE} == LLAMA_SHAPE
    assert converted["round_trip"] == {"keys_equal": True, "max_diff": 0.0}


@pytest.mark.dist
def test_llama_uptrains_into_mor_e_r2(converted):
    result = converted["uptrain"]
    assert result["plan"] == {"prefix0": [0], "shared0": [1, 4], "shared1": [2, 5], "shared2": [3, 6],
                              "suffix0": [7]}
    assert result["num_layers"] == 8 and result["step"] == 0 and result["weights_only"] is True
    assert max(result["init_errors"].values()) <= 1e-6, result["init_errors"]
    losses = result["losses"]
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("init,shared", [
    ("stepwise", [[1], [3], [6], [8]]),
    ("average", [[1, 5], [2, 6], [3, 7], [4, 8]]),
    ("lower", [[1], [2], [3], [4]]),
    ("upper", [[5], [6], [7], [8]]),
])
def test_relaxed_recursive_init_plans(init, shared):
    from mor_megatron.convert.from_hf import job_config, unique_layer_sources

    config = job_config({**LLAMA_SHAPE, "num_hidden_layers": 10}, "tiny-mor-e-r2", [])
    plan = unique_layer_sources(config, 10, init)
    assert plan == {"prefix0": [0], **{f"shared{j}": s for j, s in enumerate(shared)}, "suffix0": [9]}


def test_uneven_depth_subsamples_the_middle_layers():
    from mor_megatron.convert.from_hf import job_config, unique_layer_sources

    config = job_config({**LLAMA_SHAPE, "num_hidden_layers": 9}, "tiny-mor-e-r2",
                        ["recursion.kv_mode=shared"])
    assert config.model.num_layers == 8 and config.recursion.kv_mode == "shared"
    # 7 middle layers -> 6 via round(linspace(1, 7, 6)) = 1, 2, 3, 5, 6, 7 (as the official code does).
    assert unique_layer_sources(config, 9, "average") == {
        "prefix0": [0], "shared0": [1, 5], "shared1": [2, 6], "shared2": [3, 7], "suffix0": [8]}


def test_from_hf_refuses_non_llama_models_and_shape_overrides(tmp_path, capsys):
    from mor_megatron.cli.convert import main
    from mor_megatron.convert import ConversionError
    from mor_megatron.convert.from_hf import from_hf, job_config

    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                                "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConversionError, match="not a Llama-architecture model"):
        from_hf(tmp_path / "gpt2", tmp_path / "out", preset="tiny-mor-e-r2")
    assert main(["from-hf", str(tmp_path / "gpt2"), str(tmp_path / "out"), "--preset", "tiny-mor-e-r2"]) == 2
    assert "gpt2" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="model.hidden_size"):
        job_config({**LLAMA_SHAPE}, "tiny-mor-e-r2", ["model.hidden_size=128"])

