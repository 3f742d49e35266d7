"""A Hugging Face tokenizer end to end: a GPT-2-style byte-level BPE ``tokenizer.json`` with SmolLM's special-token
layout (``<|endoftext|>`` at id 0 is EOS, BOS and UNK; no pad token) trains, resumes, exports, and the export's
``generate()`` stops at that EOS. No id of the SentencePiece layout (eos 2, pad 3) may leak in anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.bpe import byte_level_bpe
from tests.dist.launch import run_ranks

VOCAB = 384


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory):
    from mor_megatron.data.corpus import write_stdlib_corpus
    from mor_megatron.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("hf_tokenizer")
    corpus = write_stdlib_corpus(root / "corpus.jsonl", max_mb=0.5).path
    tokenizer = byte_level_bpe([json.loads(line)["text"] for line in corpus.read_text().splitlines()],
                               root / "tokenizer", VOCAB)
    preprocess([corpus], root / "text", tokenizer=tokenizer, workers=1, progress=False)
    return root, tokenizer, corpus


def _overrides(root: Path, tokenizer: Path, steps: int) -> list[str]:
    # Document masking on too: packed documents, EOD at id 0, through training, resume and evaluation.
    return [f"data.blend=[{root / 'text'}]", f"data.tokenizer={tokenizer}", "data.split=80,10,10",
            "data.reset_attention_mask=true", "data.reset_position_ids=true", "data.eod_mask_loss=true",
            "preset=tiny-mor-e-r3", f"model.vocab_size={VOCAB}", "train.seq_length=64",
            "train.global_batch_size=4", "train.micro_batch_size=2", "train.precision=fp32",
            f"train.train_steps={steps}", "train.log_interval=1", "train.eval_interval=3", "train.eval_steps=1",
            "optim.schedule=constant", "optim.warmup_steps=1", "tracking.enabled=false",
            f"output_dir={root / 'run'}"]


def _train_then_resume(rank: int, world_size: int, *, root: str, tokenizer: str) -> dict:
    from mor_megatron.config import load_config
    from mor_megatron.runtime import destroy_distributed, init_distributed
    from mor_megatron.training.megatron_engine import MegatronEngine
    from mor_megatron.training.trainer import Trainer

    steps = []
    for train_steps in (3, 5):  # the second job resumes at step 3
        config = load_config(None, _overrides(Path(root), Path(tokenizer), train_steps))
        ctx = init_distributed(config.parallel, seed=config.train.seed)
        trainer = Trainer(config, ctx, MegatronEngine)
        try:
            trainer.build()
            steps.append(trainer.loop.step)
            trainer.train()
            steps.append(trainer.loop.step)
        finally:
            trainer.close()
            destroy_distributed(keep_process_group=True)
    return {"steps": steps}


@pytest.mark.dist
def test_hf_bpe_with_eos_at_id_0_trains_resumes_exports_and_generation_stops_at_it(hf_data, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

    from mor_megatron.convert.to_hf import to_hf
    from mor_megatron.data.tokenizer import load_tokenizer

    root, tokenizer_dir, corpus = hf_data
    tokenizer = load_tokenizer(tokenizer_dir)
    assert (tokenizer.eod, tokenizer.vocab_size) == (0, VOCAB)
    first = json.loads(corpus.read_text().splitlines()[0])["text"]
    dataset = IndexedDataset(str(root / "text"))  # held: its rows are views of its memory map
    np.testing.assert_array_equal(dataset[0], tokenizer.tokenize(first) + [0])

    (result,) = run_ranks(_train_then_resume, 1, tmp_path / "ranks", root=str(root), tokenizer=str(tokenizer_dir))
    assert result["steps"] == [0, 3, 3, 5]
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    tested = [r["step"] for r in records if "test/loss" in r.get("metrics", {})]
    assert tested == [3, 5], "the test split is evaluated when each job reaches its last step"

    export = tmp_path / "hf"
    to_hf(root / "run" / "checkpoints", export)
    assert (export / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    for name in ("config.json", "generation_config.json"):
        ids = json.loads((export / name).read_text())
        assert (ids["eos_token_id"], ids["bos_token_id"], ids["pad_token_id"]) == (0, 0, 0), name

    hf_tokenizer = AutoTokenizer.from_pretrained(str(export))
    model = AutoModelForCausalLM.from_pretrained(str(export), trust_remote_code=True).eval()
    prompt = hf_tokenizer("def main(", return_tensors="pt")["input_ids"]
    assert hf_tokenizer.eos_token_id == 0 and prompt.shape[1] > 1

    class EosAtThirdToken(LogitsProcessor):
        """Forces token 0 as the third new token: generation must stop right there."""

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == prompt.shape[1] + 2:
                scores = torch.full_like(scores, -1e9)
                scores[:, 0] = 0.0
            return scores

    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, do_sample=False,
                             logits_processor=LogitsProcessorList([EosAtThirdToken()]))
    assert out.shape[1] == prompt.shape[1] + 3 and out[0, -1].item() == 0
    assert 0 not in out[0, prompt.shape[1]:-1].tolist()


def _uptrain(rank: int, world_size: int, *, config_yaml: str, overrides: list[str]) -> dict:
    from mor_megatron.config import load_config
    from mor_megatron.runtime import destroy_distributed, init_distributed
    from mor_megatron.training.megatron_engine import MegatronEngine
    from mor_megatron.training.trainer import Trainer

    config = load_config(config_yaml, overrides)
    ctx = init_distributed(config.parallel, seed=config.train.seed)
    trainer = Trainer(config, ctx, MegatronEngine)
    try:
        trainer.build()
        start = trainer.loop.step
        trainer.train()
    finally:
        trainer.close()
        destroy_distributed(keep_process_group=True)
    return {"tokenizer": config.data.tokenizer, "start": start, "end": trainer.loop.step}


@pytest.mark.dist
def test_an_imported_llama_up_trains_with_its_own_tokenizer(hf_data, tmp_path):
    """from-hf points the job at the model's own tokenizer: data preprocessed with it trains with no id mapping."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from mor_megatron.convert.from_hf import from_hf

    root, tokenizer_dir, _ = hf_data
    llama = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 bos_token_id=0, eos_token_id=0)).save_pretrained(str(llama))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, llama / name)

    from_hf(llama, tmp_path / "mor", preset="tiny-mor-e-r2")
    overrides = [f"data.blend=[{root / 'text'}]", "data.split=90,10,0", "train.seq_length=64",
                 "train.global_batch_size=4", "train.micro_batch_size=2", "train.train_steps=2",
                 "train.eval_interval=2", "train.eval_steps=1", "optim.warmup_steps=0", "tracking.enabled=false",
                 f"checkpoint.load_dir={tmp_path / 'mor'}", f"output_dir={tmp_path / 'run'}"]
    (result,) = run_ranks(_uptrain, 1, tmp_path / "ranks", config_yaml=str(tmp_path / "mor" / "config.yaml"),
                          overrides=overrides)
    assert result == {"tokenizer": str(llama.resolve()), "start": 0, "end": 2}
