"""Depth maps (``mor_megatron.viz``, ``mor-viz depth``): the recursions each token received, from the models'
own routing, rendered as HTML and a table.

Known depths come from hand-set weights: every layer's output projections are zero, so each layer (prefix and
shared block) is the identity and the router always reads the token embedding, scaled by a positive factor
(expert-choice combines ``h + g * f(h) = (1 + g) h``). Token ``i`` is given the target depth
``t = 1 + i % 3``:

* expert-choice: the embedding holds ``t`` in feature 0 and 1 in feature 1, and recursion r's router row is
  ``e0 - (r + 0.5) e1``, so its logit is a positive multiple of ``t - r - 0.5``: a token passes recursion r
  (r >= 1; recursion 0 keeps every token, capacity 1.0) iff ``t > r`` under causal routing, and top-k keeps
  exactly those when a sequence holds as many tokens of each depth as the capacities select;
* token-choice: the embedding is ``4 * one_hot(t - 1)`` and the router is the identity on those features, so
  the chosen (0-based) depth is ``t - 1``.

Models are built in one process (``lone_process_group``), as ``mor-viz`` itself does.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
import torch

from mor_megatron.cli.viz import main as viz_main
from mor_megatron.config import DataConfig, JobConfig, ModelConfig, ParallelConfig, RecursionConfig, preset
from mor_megatron.convert.megatron_ckpt import lone_process_group
from mor_megatron.model.builder import build_model, transformer_config
from mor_megatron.model.recursion import top_k_counts
from mor_megatron.viz.depth import DepthMap, depth_table, render_html, token_class, token_pieces

from tests.bpe import byte_level_bpe

VOCAB = 300
R = 3
TARGET = 1 + torch.arange(VOCAB) % R
"""Depth each token id is forced to (see the module docstring)."""

# Four tokens of each depth, interleaved: what top-k with capacities (1, 2/3, 1/3) keeps of 12 tokens.
SEQUENCE = torch.tensor([0, 5, 4, 9, 1, 2, 13, 8, 14, 18, 10, 15])
VARIANTS = [("expert_choice", "recursion_wise"), ("expert_choice", "shared"), ("token_choice", "recursion_wise"),
            ("token_choice", "shared")]
VARIANT_IDS = ["mor_e", "mor_e_kvshare", "mor_t", "mor_t_kvshare"]


def _config(routing: str, kv_mode: str = "recursion_wise", tokenizer: Path | None = None) -> JobConfig:
    model, _ = preset("tiny-mor-e-r3")
    model = ModelConfig(**{**model.__dict__, "vocab_size": VOCAB, "max_seq_length": 64})
    recursion = RecursionConfig(num_recursions=R, sharing="middle_cycle", routing=routing, kv_mode=kv_mode)
    return JobConfig(model=model, recursion=recursion,
                     data=DataConfig(tokenizer=None if tokenizer is None else str(tokenizer)))


def _build(config: JobConfig, pg_collection, seed: int = 0):
    """The model the trainer builds (default layer provider), fp32."""
    torch.manual_seed(seed)
    mcore = transformer_config(config.model, config.recursion, ParallelConfig())
    return build_model(config.model, config.recursion, mcore, pg_collection=pg_collection).eval()


@torch.no_grad()
def _force_depths(model, routing: str) -> None:
    """Hand-set weights so that token id ``i`` runs ``TARGET[i]`` recursions (module docstring)."""
    for layer in model.decoder.layers:
        layer.self_attention.linear_proj.weight.zero_()
        layer.mlp.linear_fc2.weight.zero_()
    embedding = model.embedding.word_embeddings.weight
    router = model.decoder.router.weight
    embedding.zero_()
    router.zero_()
    if routing == "expert_choice":
        embedding[:, 0] = TARGET.float()
        embedding[:, 1] = 1.0
        for r in range(R):
            router[r, 0], router[r, 1] = 1.0, -(r + 0.5)
    else:
        embedding[torch.arange(VOCAB), TARGET - 1] = 4.0
        router[torch.arange(R), torch.arange(R)] = 1.0


def _depths(model, ids: torch.Tensor, routing_mode: str) -> list[int]:
    return model.token_depths(ids[None], torch.arange(len(ids))[None], routing_mode=routing_mode)[0].tolist()


def _html_depths(page: str) -> list[int]:
    return [int(d) for d in re.findall(r'<span class="t d\d+" data-depth="(\d+)"', page)]


def test_sequence_holds_what_topk_selects():
    counts = [int(top_k_counts(c, torch.tensor([12]), torch.tensor([12])))
              for c in _config("expert_choice").recursion.effective_capacities]
    targets = TARGET[SEQUENCE]
    assert counts == [int((targets > r).sum()) for r in range(R)] == [12, 8, 4]


@pytest.mark.parametrize("routing,kv_mode", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("routing_mode", ["causal", "topk"])
def test_forced_depths_in_model_html_and_table(routing, kv_mode, routing_mode):
    config = _config(routing, kv_mode)
    with lone_process_group() as ctx:
        model = _build(config, ctx.pg_collection)
        _force_depths(model, routing)
        depths = _depths(model, SEQUENCE, routing_mode)
    expected = TARGET[SEQUENCE].tolist()
    assert depths == expected
    pieces = [f"t{i}" for i in SEQUENCE.tolist()]
    depth_map = DepthMap(pieces=pieces, depths=depths, num_recursions=R, routing=routing, routing_mode=routing_mode,
                         model="hand-set", step=3)
    table = depth_table(depth_map)
    assert _html_depths(render_html(depth_map, table)) == expected
    assert [depth for _, depth in table["tokens"]] == expected
    assert table["share_by_depth"] == pytest.approx({"0": 0.0, "1": 1 / 3, "2": 1 / 3, "3": 1 / 3}, abs=1e-4)
    assert table["mean_depth"] == 2.0
    assert table["by_position"][0] == {"start": 0, "end": 8, "tokens": 8,
                                       "mean_depth": sum(expected[:8]) / 8}


def test_routing_none_runs_every_recursion():
    config = JobConfig(model=_config("expert_choice").model,
                       recursion=RecursionConfig(num_recursions=R, sharing="middle_cycle", routing="none"))
    with lone_process_group() as ctx:
        model = _build(config, ctx.pg_collection)
        assert _depths(model, SEQUENCE, "causal") == [R] * len(SEQUENCE)


@pytest.mark.parametrize("routing,kv_mode", VARIANTS, ids=VARIANT_IDS)
def test_hf_export_routes_as_megatron(routing, kv_mode, tmp_path):
    """Random weights (large router rows so the causal decisions vary): the export gives the same depths, under
    causal routing and, for a whole-sequence prefill, under top-k."""
    from transformers import AutoModelForCausalLM

    from mor_megatron.convert.to_hf import to_hf

    config = _config(routing, kv_mode)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with lone_process_group() as ctx:
        model = _build(config, ctx.pg_collection)
        with torch.no_grad():
            model.decoder.router.weight.normal_(0.0, 2.0)
        expected = {mode: model.token_depths(ids, torch.arange(ids.shape[1]).expand(2, -1), routing_mode=mode)
                    for mode in ("causal", "topk")}
        _save(model, config, ctx, tmp_path / "ckpt")
    assert len(set(expected["causal"].flatten().tolist())) > 1, "uniform depths would make the comparison vacuous"
    to_hf(tmp_path / "ckpt", tmp_path / "hf", include_tokenizer=False)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    for mode, depths in expected.items():
        assert torch.equal(hf.token_depths(ids, routing_mode=mode), depths), mode


def _save(model, config: JobConfig, ctx, save_dir: Path, step: int = 0, run_id: str | None = None) -> Path:
    from mor_megatron.checkpoint.loop_state import LoopState
    from mor_megatron.checkpoint.megatron import Checkpointer
    from mor_megatron.config import config_to_dict

    return Checkpointer(save_dir=str(save_dir), load_dir=None, keep_last=1, ctx=ctx).save(
        step, model_chunks=[model], optimizer=None, scheduler=None,
        loop=LoopState(step=step, mlflow_run_id=run_id),
        config_dict=config_to_dict(config), source={"test": "depth map"})


TEXT = 'def main(x):\n\treturn x + 42  # "<b>" & done\n'


def _run_cli(capsys, *args: str) -> tuple[int, str, str]:
    status = viz_main(["depth", *args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_cli_maps_checkpoint_and_export(routing, tmp_path, capsys):
    from mor_megatron.convert.to_hf import to_hf
    from mor_megatron.data.tokenizer import load_tokenizer

    tokenizer = byte_level_bpe([TEXT * 3, "hello world 123 foo_bar"], tmp_path / "tok", vocab_size=280)
    config = _config(routing, tokenizer=tokenizer)
    with lone_process_group() as ctx:
        model = _build(config, ctx.pg_collection)
        _force_depths(model, routing)
        _save(model, config, ctx, tmp_path / "ckpt", step=7)
    to_hf(tmp_path / "ckpt", tmp_path / "hf")
    ids = load_tokenizer(tokenizer).tokenize(TEXT)
    expected = TARGET[torch.tensor(ids)].tolist()

    (tmp_path / "text.txt").write_text(TEXT)
    for model_path, source, step in [(tmp_path / "ckpt", ["--text", TEXT], 7),
                                     (tmp_path / "hf", ["--input", str(tmp_path / "text.txt")], None)]:
        out_dir = tmp_path / f"out_{model_path.name}"
        status, out, err = _run_cli(capsys, "--model", str(model_path), *source, "--out", str(out_dir))
        assert status == 0, err
        assert "Do you wish to run the custom code" not in err  # a prompt would wait on a terminal
        summary = json.loads(out.strip())
        assert summary["step"] == step and summary["routing_mode"] == "causal"
        table = json.loads((out_dir / "depth.json").read_text())
        assert [depth for _, depth in table["tokens"]] == expected
        assert "".join(piece for piece, _ in table["tokens"]) == TEXT
        page = (out_dir / "depth.html").read_text()
        assert _html_depths(page) == expected
        # Escaped (an unescaped "<b>" would be dropped with the tags) and with whitespace made visible.
        body = re.search(r'<div class="text">(.*?)</div>', page, re.S).group(1)
        shown = html.unescape(re.sub(r"<[^>]+>", "", body))
        assert shown == TEXT.replace(" ", "\u00b7").replace("\t", "\u2192").replace("\n", "\u21b5\n")
        assert (out_dir / "depth.png").stat().st_size > 0


def test_cli_bad_input_is_one_error_line(tmp_path, capsys):
    status, out, err = _run_cli(capsys, "--model", str(tmp_path / "missing"), "--text", "x", "--out",
                                str(tmp_path / "out"))
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "does not exist" in err
    status, _, err = _run_cli(capsys, "--model", str(tmp_path), "--input", str(tmp_path / "none.txt"), "--out",
                              str(tmp_path / "out"))
    assert status == 2 and err.count("\n") == 1 and "cannot read --input" in err


def test_token_pieces_and_classes():
    text = "héllo, x_1 42\n"
    data = text.encode()
    # Byte-level ids: the two bytes of "é" are separate tokens, so the first decodes to U+FFFD alone.
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    pieces = token_pieces(decode, list(data))
    assert "".join(pieces) == text and pieces[1] == "" and pieces[2] == "é"
    assert [token_class(p) for p in ["hello", "x_1", "42", " ", ",\n", "_"]] == [
        "word", "word", "digits", "space/punct", "space/punct", "word"]


# ------------------------------------------------------------------------------------------------------------
# Depth maps at each evaluation of training (Trainer._log_depth_maps).

class _TextTokenizer:
    """Token ids are the positions of SEQUENCE; a token's text says its id (fake, no tokenizer files)."""

    def tokenize(self, text: str) -> list[int]:
        return SEQUENCE.tolist()

    def detokenize(self, ids: list[int]) -> str:
        return "".join(f"t{i} " if i % 2 else f"{i}," for i in ids)


def _trainer(config: JobConfig, ctx, model, sink_path: Path):
    from types import SimpleNamespace

    from mor_megatron.tracking.sinks import JsonlSink
    from mor_megatron.training.trainer import Trainer

    trainer = Trainer(config, ctx, engine_factory=lambda *_: None)
    trainer.engine = SimpleNamespace(model=model, is_logging_rank=True, model_runs_alone=True)
    trainer.sink = JsonlSink(sink_path)
    trainer.loop.step = 100
    trainer.depth_map_input = trainer._depth_map_input(_TextTokenizer())
    return trainer


@pytest.mark.parametrize("routing", ["expert_choice", "token_choice"])
def test_depth_maps_at_evaluation_are_logged_and_leave_training_alone(routing, tmp_path):
    from mor_megatron.tracking import metrics as M
    from mor_megatron.tracking.sinks import read_jsonl

    config = _config(routing)
    with lone_process_group() as ctx:
        model = _build(config, ctx.pg_collection)
        _force_depths(model, routing)
        model.train()
        trainer = _trainer(config, ctx, model, tmp_path / "metrics.jsonl")
        # Router statistics of a training forward not yet logged: the hook must leave them as they are.
        model(SEQUENCE[None], torch.arange(len(SEQUENCE))[None], None)
        stats = model.decoder.router_stats
        before = ({k: v.clone() for k, v in stats._sums.items()}, dict(stats._counts))
        rng = torch.get_rng_state()
        trainer._log_depth_maps()
        assert model.training
        assert torch.equal(torch.get_rng_state(), rng)
        assert model.decoder.router_stats is stats and dict(stats._counts) == before[1]
        assert stats._sums.keys() == before[0].keys()
        assert all(torch.equal(stats._sums[k], v) for k, v in before[0].items())
        trainer.sink.close()

    (record,) = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "metrics"]
    assert record["step"] == 100
    # Depths 1, 2, 3 in turn; odd ids (depths 2 and 1) are words "tN ", even ones digits "N,".
    word = [int(TARGET[i]) for i in SEQUENCE.tolist() if i % 2]
    digits = [int(TARGET[i]) for i in SEQUENCE.tolist() if not i % 2]
    expected = {"depth/mean": 2.0, "depth/word": sum(word) / len(word),
                "depth/digits": sum(digits) / len(digits)}
    assert record["metrics"] == pytest.approx({**expected, **{k.replace("depth/", "depth/causal/"): v
                                                              for k, v in expected.items()}}, abs=1e-4)
    assert set(record["metrics"]) <= set(M.STATIC_KEYS)
    stems = ["step_000100", "step_000100_causal"] if routing == "expert_choice" else ["step_000100"]
    artifacts = tmp_path / "artifacts" / "depth"
    assert sorted(p.name for p in artifacts.iterdir()) == sorted(f"{s}.{ext}" for s in stems
                                                                 for ext in ("html", "json", "png"))
    for stem in stems:
        table = json.loads((artifacts / f"{stem}.json").read_text())
        assert table["step"] == 100 and [d for _, d in table["tokens"]] == TARGET[SEQUENCE].tolist()
        assert _html_depths((artifacts / f"{stem}.html").read_text()) == TARGET[SEQUENCE].tolist()
        assert (artifacts / f"{stem}.png").read_bytes().startswith(b"\x89PNG")


def test_depth_map_input_is_cut_and_switchable(tmp_path):
    config = _config("expert_choice")
    config.tracking.depth_map_tokens = 5
    with lone_process_group() as ctx:
        trainer = _trainer(config, ctx, None, tmp_path / "metrics.jsonl")
        ids, pieces = trainer.depth_map_input
        assert ids == SEQUENCE.tolist()[:5] and len(pieces) == 5
        config.tracking.depth_maps = False
        assert trainer._depth_map_input(_TextTokenizer()) is None
        trainer.sink.close()


def test_hf_export_is_linked_to_its_run(tmp_path, monkeypatch):
    """to-hf tags the checkpoint's MLflow run (the run folder's sqlite store) with the export and stores its
    summary there; a run id whose store is gone leaves the export alone and says why."""
    from mlflow.tracking import MlflowClient

    from mor_megatron.convert.to_hf import to_hf
    from mor_megatron.tracking.mlflow import EXPORT_TAG

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.create_experiment("export", artifact_location=(run_dir / "mlartifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    config = _config("expert_choice")
    config.output_dir = str(run_dir)
    with lone_process_group() as ctx:
        model = _build(config, ctx.pg_collection)
        _save(model, config, ctx, tmp_path / "ckpt", step=4, run_id=run_id)
    summary = to_hf(tmp_path / "ckpt", tmp_path / "hf", include_tokenizer=False)
    assert (summary.mlflow_run_id, summary.mlflow_linked, summary.mlflow_link_error) == (run_id, True, None)
    assert client.get_run(run_id).data.tags[EXPORT_TAG] == str((tmp_path / "hf").resolve())
    record = json.loads(Path(client.download_artifacts(run_id, "exports/hf.json", str(tmp_path))).read_text())
    assert record["step"] == 4 and record["output_dir"] == str(tmp_path / "hf")

    config.output_dir = str(tmp_path / "gone")
    with lone_process_group() as ctx:
        _save(_build(config, ctx.pg_collection), config, ctx, tmp_path / "ckpt2", run_id=run_id)
    summary = to_hf(tmp_path / "ckpt2", tmp_path / "hf2", include_tokenizer=False)
    assert not summary.mlflow_linked and "does not exist" in summary.mlflow_link_error
    assert not (tmp_path / "gone").exists()
