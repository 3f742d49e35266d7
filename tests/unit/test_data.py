"""Data pipeline: embedded corpus, SentencePiece tokenizer, .bin/.idx preprocessing, megatron-core GPT
datasets, the resumable data-parallel sampler, the pre-flight checks and the ``mor-data`` command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mor_megatron.cli.data import main as mor_data
from mor_megatron.config import ConfigError, DataConfig, TrainConfig
from mor_megatron.data.corpus import stdlib_source_files, write_stdlib_corpus
from mor_megatron.data.datasets import (PretrainingSampler, build_data_loader, build_gpt_datasets, check_data,
                                        num_samples_for, parse_blend, split_document_counts)
from mor_megatron.data.preprocess import meta_path, preprocess, read_meta
from mor_megatron.data.tokenizer import (EOS_ID, PAD_ID, load_tokenizer, tokenizer_vocab_size,
                                         train_tokenizer)
from tests.bpe import byte_level_bpe

VOCAB = 300
CODE = 'def f(x):\n    """Doc."""\n\n    return x  +  1\n'


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def corpus(workdir) -> Path:
    return write_stdlib_corpus(workdir / "corpus.jsonl", max_mb=0.25).path


@pytest.fixture(scope="module")
def tokenizer_model(workdir, corpus) -> Path:
    return train_tokenizer([corpus], workdir / "tok", vocab_size=VOCAB, byte_fallback=False, num_threads=1)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_model):
    return load_tokenizer(tokenizer_model)


@pytest.fixture(scope="module")
def prefix(workdir, corpus, tokenizer_model) -> str:
    return preprocess([corpus], workdir / "stdlib", tokenizer=tokenizer_model, progress=False).prefix


def _corpus_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def _data_config(prefix: str, tokenizer_model: Path, tmp_path: Path, **kwargs) -> DataConfig:
    values = dict(blend=(prefix,), split="8,1,1", tokenizer=str(tokenizer_model),
                  cache_dir=str(tmp_path / "cache"))
    values.update(kwargs)
    return DataConfig(**values)


# ---------------------------------------------------------------------------------------------------- corpus

def test_corpus_is_deterministic_capped_and_skips_tests(tmp_path, corpus):
    again = write_stdlib_corpus(tmp_path / "again.jsonl", max_mb=0.25)
    assert again.path.read_bytes() == corpus.read_bytes()
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert again.num_documents == len(records) > 5
    assert again.num_bytes == sum(len(r["text"].encode()) for r in records) <= 0.25 * 2**20
    assert all(r["text"].strip() for r in records)
    parts = [set(Path(r["path"]).parts) for r in records]
    assert not any(p & {"test", "tests", "site-packages", "encodings"} for p in parts)


def test_corpus_skips_binary_huge_and_non_utf8_files(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg" / "tests").mkdir(parents=True)
    (root / "site-packages").mkdir()
    (root / "good.py").write_text('"""A module."""\nX = 1\n')
    (root / "pkg" / "mod.py").write_text("def g():\n    return 2\n")
    (root / "pkg" / "tests" / "test_mod.py").write_text("assert True\n")
    (root / "site-packages" / "third.py").write_text("Y = 3\n")
    (root / "binary.py").write_bytes(b"X = 1\0\0")
    (root / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))
    (root / "huge.py").write_text("# " + "x" * 3000 + "\n")
    assert {p.as_posix() for p in stdlib_source_files(root)} == {
        "good.py", "pkg/mod.py", "binary.py", "latin1.py", "huge.py"}
    stats = write_stdlib_corpus(tmp_path / "c.jsonl", max_mb=1, max_file_kb=2, root=root)
    paths = sorted(json.loads(line)["path"] for line in stats.path.read_text().splitlines())
    assert paths == ["good.py", "pkg/mod.py"]


# ------------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_files_ids_and_whitespace_round_trip(tokenizer_model, tokenizer):
    assert tokenizer_model.name == "tokenizer.model"
    metadata = json.loads((tokenizer_model.parent / "tokenizer_metadata.json").read_text())
    assert metadata["library"] == "sentencepiece" and metadata["model_type"] == "gpt"
    assert type(tokenizer).__name__ == "GPTTokenizer"
    assert tokenizer.vocab_size == tokenizer_vocab_size(tokenizer_model) == VOCAB
    assert (tokenizer.eod, tokenizer.pad) == (EOS_ID, PAD_ID)
    ids = tokenizer.tokenize(CODE)
    assert max(ids) < VOCAB and tokenizer.detokenize(ids) == CODE  # indentation and double spaces survive


def test_tokenizer_training_is_deterministic_and_guards_overwrite(tmp_path, corpus, tokenizer_model):
    model = train_tokenizer([corpus], tmp_path, vocab_size=VOCAB, byte_fallback=False, num_threads=1)
    assert model.read_bytes() == tokenizer_model.read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_tokenizer([corpus], tmp_path, vocab_size=VOCAB, byte_fallback=False)
    with pytest.raises(ValueError, match="vocab_size=200 is too small"):
        train_tokenizer([corpus], tmp_path / "small", vocab_size=200)


def test_tokenizer_training_shows_progress_and_the_same_model(tmp_path, corpus, tokenizer_model, capsys):
    model = train_tokenizer([corpus], tmp_path, vocab_size=VOCAB, byte_fallback=False, num_threads=1,
                            progress=True)
    assert model.read_bytes() == tokenizer_model.read_bytes()
    err = capsys.readouterr().err
    documents = len(_corpus_texts(corpus))
    assert "tokenizer: reading: 100%" in err and f"{documents}/{documents}" in err
    assert re.search(rf"tokenizer: learning {VOCAB} BPE pieces from \d+ of \d+ text chunks", err)
    assert f"tokenizer: {model} written in" in err


def test_hf_tokenizer_folder_ids_come_from_the_tokenizer(tmp_path, corpus, prefix, tokenizer_model):
    from mor_megatron.data.tokenizer import resolve_tokenizer, special_token_ids

    folder = byte_level_bpe(_corpus_texts(corpus), tmp_path / "hf", 320)
    (folder / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())  # an export holds both: HF wins
    for path in (folder, folder / "tokenizer.json"):
        assert resolve_tokenizer(path).library == "huggingface"
    tokenizer = load_tokenizer(folder)
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad) == (320, 0, 0)  # no pad token: pads with EOS
    assert tokenizer.detokenize(tokenizer.tokenize(CODE)) == CODE
    assert special_token_ids(folder) == {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    assert special_token_ids(tokenizer_model) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    assert tokenizer_vocab_size(folder) == 320

    hf_prefix = preprocess([corpus], tmp_path / "hf_text", tokenizer=folder, progress=False).prefix
    config = _data_config(hf_prefix, folder, tmp_path)
    check_data(config, vocab_size=320)
    with pytest.raises(ConfigError, match="has 320 pieces but model.vocab_size=300"):
        check_data(config, vocab_size=300)
    with pytest.raises(ConfigError, match="was tokenized with"):  # the SentencePiece dataset, this tokenizer
        check_data(_data_config(prefix, folder, tmp_path), vocab_size=320)
    config_json = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config_json, "eos_token": "<|im_end|>"}))
    with pytest.raises(ConfigError, match="was tokenized with"):  # another EOS is another tokenizer
        check_data(config, vocab_size=320)
    (folder / "tokenizer_config.json").write_text(json.dumps({**config_json, "eos_token": None}))
    with pytest.raises(ValueError, match="has no EOS token"):
        load_tokenizer(folder)
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model"):
        resolve_tokenizer(tmp_path / "nothing_here")


def test_load_tokenizer_writes_missing_metadata(tmp_path, tokenizer_model):
    copy = tmp_path / "tokenizer.model"
    copy.write_bytes(tokenizer_model.read_bytes())
    assert load_tokenizer(tmp_path).vocab_size == VOCAB
    assert (tmp_path / "tokenizer_metadata.json").is_file()
    with pytest.raises(FileNotFoundError, match="mor-data tokenizer"):
        load_tokenizer(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------ preprocess

def test_preprocess_jsonl_txt_parquet_matches_tokenizer(tmp_path, tokenizer_model, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"body": CODE}) + "\n\n" + json.dumps({"body": ""}) + "\n"
                     + json.dumps({"body": "import os\n"}) + "\n")
    txt = tmp_path / "b.txt"
    txt.write_text("first line\n\nsecond  line\n")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["x = [1, 2]\n", "print(x)\n"]}), parquet)

    stats = preprocess([jsonl, txt, parquet], tmp_path / "out", tokenizer=tokenizer_model, json_key="body",
                       text_unit="line", workers=2, progress=False)
    expected = [CODE, "import os\n", "first line", "second  line", "x = [1, 2]\n", "print(x)\n"]
    dataset = IndexedDataset(str(tmp_path / "out"))
    assert len(dataset) == stats.num_documents == len(expected) and stats.num_empty_skipped == 1
    for i, text in enumerate(expected):
        np.testing.assert_array_equal(dataset[i], tokenizer.tokenize(text) + [tokenizer.eod])
    assert dataset[0].dtype == np.uint16  # DType.optimal_dtype for a small vocabulary
    assert stats.num_tokens == sum(len(dataset[i]) for i in range(len(dataset)))
    assert not list(tmp_path.glob("*.tmp*"))

    single = preprocess([jsonl, txt, parquet], tmp_path / "single", tokenizer=tokenizer_model,
                        json_key="body", text_unit="line", workers=1, progress=False)
    for suffix in (".bin", ".idx"):
        assert Path(single.prefix + suffix).read_bytes() == (tmp_path / f"out{suffix}").read_bytes()


def _records() -> list[dict]:
    return [{"text": CODE, "id": 0}, {"text": "", "id": 1}, {"text": "import os\n", "id": 2},
            {"text": "caf\u00e9 = 1\n", "id": 3}]


def _compressed_and_saved_inputs(folder: Path) -> dict[str, Path]:
    """The same documents as plain jsonl, .jsonl.gz, .jsonl.zst and a datasets save_to_disk folder."""
    import gzip

    import datasets
    import zstandard

    body = "".join(json.dumps(r) + "\n" for r in _records()).encode()
    paths = {"plain": folder / "docs.jsonl", "gzip": folder / "docs.jsonl.gz", "zstd": folder / "docs.json.zst",
             "saved": folder / "saved"}
    paths["plain"].write_bytes(body)
    paths["gzip"].write_bytes(gzip.compress(body))
    paths["zstd"].write_bytes(zstandard.ZstdCompressor().compress(body))
    # Two shards, so the order of state.json's file list matters.
    datasets.Dataset.from_list(_records()).save_to_disk(str(paths["saved"]), num_shards=2)
    return paths


def test_compressed_jsonl_and_saved_dataset_give_the_plain_jsonl_dataset(tmp_path, tokenizer_model):
    inputs = _compressed_and_saved_inputs(tmp_path)
    assert len(list(inputs["saved"].glob("*.arrow"))) == 2
    outputs = {name: preprocess([path], tmp_path / f"out_{name}", tokenizer=tokenizer_model, progress=False)
               for name, path in inputs.items()}
    assert {stats.num_documents for stats in outputs.values()} == {3}
    for suffix in (".bin", ".idx"):
        plain = (tmp_path / f"out_plain{suffix}").read_bytes()
        for name in ("gzip", "zstd", "saved"):
            assert (tmp_path / f"out_{name}{suffix}").read_bytes() == plain, f"{name}{suffix}"


def test_saved_dataset_and_compressed_input_errors(tmp_path, tokenizer_model):
    import datasets

    inputs = _compressed_and_saved_inputs(tmp_path)
    with pytest.raises(ValueError, match="has no column 'body'"):
        preprocess([inputs["saved"]], tmp_path / "x", tokenizer=tokenizer_model, json_key="body", progress=False)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_records())}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"DatasetDict; pass one split's folder, e.g. '.*dict/train'"):
        preprocess([tmp_path / "dict"], tmp_path / "x", tokenizer=tokenizer_model, progress=False)
    (tmp_path / "docs.csv.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported extension '.csv.gz'"):
        preprocess([tmp_path / "docs.csv.gz"], tmp_path / "x", tokenizer=tokenizer_model, progress=False)
    latin = tmp_path / "latin.jsonl.gz"
    import gzip
    latin.write_bytes(gzip.compress('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1")))
    with pytest.raises(ValueError, match=re.escape("latin.jsonl.gz:2: not UTF-8 text (byte 0xe9 at byte offset")):
        preprocess([latin], tmp_path / "x", tokenizer=tokenizer_model, progress=False)
    assert not list(tmp_path.glob("x*"))


def test_preprocess_rejects_bad_input_before_workers(tmp_path, tokenizer_model, corpus):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        preprocess([tmp_path / "nope.jsonl"], tmp_path / "x", tokenizer=tokenizer_model, progress=False)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported extension '.csv'"):
        preprocess([tmp_path / "data.csv"], tmp_path / "x", tokenizer=tokenizer_model, progress=False)
    with pytest.raises(FileNotFoundError, match="mor-data tokenizer"):
        preprocess([corpus], tmp_path / "x", tokenizer=tmp_path / "no_tokenizer", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text'"):
        preprocess([bad], tmp_path / "x", tokenizer=tokenizer_model, progress=False)
    assert not list(tmp_path.glob("x*"))


# ---------------------------------------------------------------------------------------------- GPT datasets

def test_gpt_datasets_split_without_process_group(tmp_path, prefix, tokenizer_model, tokenizer):
    assert not torch.distributed.is_initialized()
    data = _data_config(prefix, tokenizer_model, tmp_path)
    train, valid, test = build_gpt_datasets(data, seq_length=32, num_samples=(40, 8, 4), tokenizer=tokenizer)
    assert len(train) >= 40 and len(valid) >= 8 and len(test) >= 4
    sample = train[0]
    assert sample["tokens"].shape == sample["labels"].shape == sample["loss_mask"].shape == (32,)
    assert "attention_mask" not in sample
    torch.testing.assert_close(sample["tokens"][1:], sample["labels"][:-1])
    assert int(sample["tokens"].max()) < VOCAB
    _, _, none_test = build_gpt_datasets(_data_config(prefix, tokenizer_model, tmp_path, split="9,1,0"),
                                         seq_length=32, num_samples=(40, 8, 4), tokenizer=tokenizer)
    assert none_test is None


def test_weighted_blend_builds_blended_dataset(tmp_path, prefix, tokenizer_model, tokenizer):
    data = _data_config(prefix, tokenizer_model, tmp_path, blend=("0.7", prefix, "0.3", prefix))
    train, _, _ = build_gpt_datasets(data, seq_length=16, num_samples=(50, 4, 4), tokenizer=tokenizer)
    assert type(train).__name__ == "BlendedDataset" and len(train) == 50
    assert int(train[3]["dataset_id"]) in (0, 1)


def test_document_masking_flags_reach_the_samples(tmp_path, tokenizer_model, tokenizer):
    """reset_attention_mask / reset_position_ids / eod_mask_loss as Megatron-LM defines them, on packed docs."""
    docs = tmp_path / "short.jsonl"
    docs.write_text("".join(json.dumps({"text": f"x = {i}\n"}) + "\n" for i in range(40)))
    short = preprocess([docs], tmp_path / "short", tokenizer=tokenizer_model, progress=False).prefix
    data = _data_config(short, tokenizer_model, tmp_path, split="1,0,0", reset_attention_mask=True,
                        reset_position_ids=True, eod_mask_loss=True)
    train, _, _ = build_gpt_datasets(data, seq_length=24, num_samples=(4, 0, 0), tokenizer=tokenizer)
    sample = train[0]
    tokens, positions, mask = sample["tokens"], sample["position_ids"], sample["attention_mask"][0]
    ends = (tokens == tokenizer.eod).nonzero().flatten().tolist()
    assert len(ends) >= 2, "the sample must pack several documents"
    document = torch.zeros(24, dtype=torch.long)
    for end in ends:
        document[end + 1:] += 1
    causal_same_document = (document[:, None] == document[None, :]) & torch.ones(24, 24, dtype=torch.bool).tril()
    assert torch.equal(mask, ~causal_same_document)
    for i in range(24):
        start = max([end + 1 for end in ends if end < i], default=0)
        assert positions[i] == i - start, f"position {i} restarts after the previous EOD"
    assert torch.equal(sample["loss_mask"] == 0, tokens == tokenizer.eod)


def test_own_validation_and_test_blends(tmp_path, tokenizer_model, tokenizer):
    """data.valid_blend / data.test_blend (Megatron-LM's per-split paths): data.blend is all training data."""
    prefixes = {}
    for name, text in (("train", "alpha = 1\n"), ("valid", "beta = 2\n"), ("test", "gamma = 3\n")):
        docs = tmp_path / f"{name}.jsonl"
        docs.write_text("".join(json.dumps({"text": f"{text}# {i}\n"}) + "\n" for i in range(30)))
        prefixes[name] = preprocess([docs], tmp_path / name, tokenizer=tokenizer_model, progress=False).prefix
    data = _data_config(prefixes["train"], tokenizer_model, tmp_path, valid_blend=(prefixes["valid"],),
                        test_blend=(prefixes["test"],), split="1,0,0")  # the split is not used then
    assert len(check_data(data, vocab_size=VOCAB)) == 3
    train, valid, test = build_gpt_datasets(data, seq_length=16, num_samples=(8, 4, 4), tokenizer=tokenizer)
    for dataset, word in ((train, "alpha"), (valid, "beta"), (test, "gamma")):
        text = tokenizer.detokenize(dataset[0]["tokens"].tolist())
        assert word in text and not {"alpha", "beta", "gamma"} - {word} & set(re.findall(r"[a-z]+", text))
    only_valid = _data_config(prefixes["train"], tokenizer_model, tmp_path, valid_blend=(prefixes["valid"],))
    assert build_gpt_datasets(only_valid, seq_length=16, num_samples=(8, 4, 4), tokenizer=tokenizer)[2] is None
    with pytest.raises(ConfigError, match=r"data.valid_blend prefix '.*nope': .*nope.bin and .*nope.idx not found"):
        check_data(_data_config(prefixes["train"], tokenizer_model, tmp_path, valid_blend=(str(tmp_path / "nope"),)),
                   vocab_size=VOCAB)
    with pytest.raises(ConfigError, match=r"data.test_blend=\[.*\] has an odd number of entries"):
        check_data(_data_config(prefixes["train"], tokenizer_model, tmp_path, test_blend=("0.5", "a", "0.5")),
                   vocab_size=VOCAB)


def test_split_document_counts_match_megatron():
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                        parse_and_normalize_split)

    for split in ("969,30,1", "98,1,1", "1,0,0", "0,1,0", "3,3,3", "0.5,0.25,0.25", "99,1"):
        for num_documents in (1, 7, 408, 1000):
            matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
            expected = [None if b is None else round(b[1] * num_documents) - round(b[0] * num_documents)
                        for b in matrix]
            assert split_document_counts(num_documents, split) == expected, (split, num_documents)


def test_num_samples_for_sizes_like_megatron():
    train = TrainConfig(train_steps=100, global_batch_size=8, eval_interval=50, eval_steps=2)
    assert num_samples_for(train) == (800, 3 * 2 * 8, 16)
    fixed = TrainConfig(train_steps=100, global_batch_size=8, eval_interval=50, eval_steps=2, eval_mode="fixed")
    assert num_samples_for(fixed) == (800, 16, 16)


def test_fixed_eval_mode_scores_the_same_sequences_whatever_the_run_length(tmp_path, prefix, tokenizer_model,
                                                                           tokenizer):
    """Two runs of different lengths: Megatron-LM's sizing shuffles a validation set of another size (several
    epochs of the small split), so their evaluations read other sequences; the fixed mode reads the same."""
    data = _data_config(prefix, tokenizer_model, tmp_path)

    def evaluated_tokens(train_steps: int, eval_mode: str) -> torch.Tensor:
        train = TrainConfig(train_steps=train_steps, global_batch_size=8, eval_interval=10, eval_steps=2,
                            eval_mode=eval_mode)
        _, valid, _ = build_gpt_datasets(data, seq_length=32, num_samples=num_samples_for(train), tokenizer=tokenizer)
        return torch.stack([valid[i]["tokens"] for i in range(train.eval_steps * train.global_batch_size)])

    short, long = (num_samples_for(TrainConfig(train_steps=n, global_batch_size=8, eval_interval=10, eval_steps=2))[1]
                   for n in (100, 400))
    _, one_epoch, _ = build_gpt_datasets(data, seq_length=32, num_samples=(8, 1, 1), tokenizer=tokenizer)
    assert len(one_epoch) < short < long  # both runs need several epochs of the validation split
    assert not torch.equal(evaluated_tokens(100, "megatron"), evaluated_tokens(400, "megatron"))
    assert torch.equal(evaluated_tokens(100, "fixed"), evaluated_tokens(400, "fixed"))


# --------------------------------------------------------------------------------------------------- sampler

def _indices(consumed: int, rank: int, dp: int, total: int = 50, mbs: int = 2) -> list[list[int]]:
    return list(PretrainingSampler(total_samples=total, consumed_samples=consumed, micro_batch_size=mbs,
                                   data_parallel_rank=rank, data_parallel_size=dp))


def test_sampler_shards_by_rank_and_resumes_exactly():
    ranks = [_indices(0, rank, 3) for rank in range(3)]
    assert len(ranks[0]) == 50 // 6 == len(PretrainingSampler(total_samples=50, consumed_samples=0,
                                                              micro_batch_size=2, data_parallel_rank=0,
                                                              data_parallel_size=3))
    window = sorted(i for rank in ranks for i in rank[0])
    assert window == list(range(6))  # the first global micro-batch window, split across ranks
    all_indices = [i for rank in ranks for batch in rank for i in batch]
    assert len(all_indices) == len(set(all_indices)) == 48  # disjoint; the trailing partial window is dropped
    for rank in range(3):
        assert _indices(12, rank, 3) == ranks[rank][2:]  # resume after 2 windows = the same suffix
    with pytest.raises(ValueError, match="consumed_samples=50"):
        _indices(50, 0, 3)
    with pytest.raises(ValueError, match="data_parallel_rank=3"):
        _indices(0, 3, 3)


def test_data_loader_resume_yields_same_batches(tmp_path, prefix, tokenizer_model, tokenizer):
    data = _data_config(prefix, tokenizer_model, tmp_path)
    train, _, _ = build_gpt_datasets(data, seq_length=16, num_samples=(64, 4, 4), tokenizer=tokenizer)
    kwargs = dict(micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2)
    fresh = list(build_data_loader(train, **kwargs))
    resumed = list(build_data_loader(train, consumed_samples=8, **kwargs))
    assert fresh[0]["tokens"].shape == (2, 16) and len(resumed) == len(fresh) - 2
    for a, b in zip(fresh[2:], resumed, strict=True):
        torch.testing.assert_close(a["tokens"], b["tokens"])
    torch.testing.assert_close(fresh[0]["tokens"], torch.stack([train[2]["tokens"], train[3]["tokens"]]))


# ------------------------------------------------------------------------------------------------ pre-flight

def test_check_data_accepts_good_config(tmp_path, prefix, tokenizer_model):
    check_data(_data_config(prefix, tokenizer_model, tmp_path), vocab_size=VOCAB)


@pytest.mark.parametrize("change, vocab_size, match", [
    (dict(tokenizer=None), VOCAB, "data.tokenizer is not set"),
    (dict(tokenizer="/no/such/tokenizer.model"), VOCAB, "does not exist"),
    ({}, VOCAB - 1, f"has {VOCAB} pieces but model.vocab_size={VOCAB - 1}"),
    (dict(blend=()), VOCAB, "data.blend is empty"),
    (dict(blend=("/no/such/prefix",)), VOCAB, r"'/no/such/prefix'.*not found.*mor-data preprocess"),
    (dict(split="969,30,1"), VOCAB, "gives the test split 0 of the"),
], ids=["no-tokenizer", "missing-tokenizer", "vocab-mismatch", "empty-blend", "missing-prefix",
        "empty-split"])
def test_check_data_errors(tmp_path, prefix, tokenizer_model, change, vocab_size, match):
    with pytest.raises(ConfigError, match=match):
        check_data(_data_config(prefix, tokenizer_model, tmp_path, **change), vocab_size=vocab_size)


def test_check_data_rejects_dataset_from_another_tokenizer(tmp_path, corpus, prefix, tokenizer_model):
    other = train_tokenizer([corpus], tmp_path / "other", vocab_size=VOCAB + 20, byte_fallback=False)
    assert read_meta(prefix)["vocab_size"] == VOCAB
    with pytest.raises(ConfigError, match="was tokenized with"):
        check_data(_data_config(prefix, other, tmp_path), vocab_size=1024)


@pytest.mark.parametrize("blend, match", [
    (("0.5", "a", "b"), "odd number"),
    (("a", "0.5"), "mixes prefixes and weights"),
    (("0", "a", "1", "b"), "weight '0'"),
    (("0.5", "0.5", "1", "b"), "sits where a prefix belongs"),
])
def test_parse_blend_errors(blend, match):
    with pytest.raises(ConfigError, match=match):
        parse_blend(blend)


def test_parse_blend_forms():
    assert parse_blend(("a", "b")) == (["a", "b"], None)
    assert parse_blend(("30", "a", "70", "b")) == (["a", "b"], [30.0, 70.0])


# ------------------------------------------------------------------------------------------------------- CLI

def test_cli_end_to_end(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    assert mor_data(["corpus", "--output", str(corpus), "--max-mb", "0.1"]) == 0
    assert mor_data(["tokenizer", "--input", str(corpus), "--output-dir", str(tmp_path / "tok"),
                     "--vocab-size", "400", "--threads", "1"]) == 0
    assert mor_data(["preprocess", "--input", str(corpus), "--tokenizer", str(tmp_path / "tok"),
                     "--output-prefix", str(tmp_path / "ds"), "--workers", "2", "--quiet"]) == 0
    summaries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert summaries[1]["vocab_size"] == 400
    assert summaries[2]["num_documents"] == summaries[0]["documents"] > 0
    assert meta_path(tmp_path / "ds").is_file()
    check_data(DataConfig(blend=(str(tmp_path / "ds"),), split="1,0,0",
                          tokenizer=str(tmp_path / "tok" / "tokenizer.model")), vocab_size=400)


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert mor_data(["preprocess", "--input", str(tmp_path / "missing.jsonl"), "--tokenizer", str(tmp_path),
                     "--output-prefix", str(tmp_path / "ds")]) == 2
    assert "missing.jsonl' does not exist" in capsys.readouterr().err


def test_cli_help_and_package_import_load_neither_torch_nor_megatron():
    code = ("import sys\nimport mor_megatron.data\nfrom mor_megatron.cli.data import main\n"
            "try:\n    main(['preprocess', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert "--output-prefix" in out and out.strip().endswith("[]")


# ----------------------------------------------------------------------------------- rewriting and bad bytes

def _cache_entry(folder: Path, key: str, dataset_path: str) -> Path:
    """A megatron-core cache entry as GPTDataset writes it: a description and an index file."""
    folder.mkdir(parents=True, exist_ok=True)
    description = {"class": "GPTDataset", "dataset_path": dataset_path}
    (folder / f"{key}-description.txt").write_text(json.dumps(description))
    (folder / f"{key}-document_index.npy").write_bytes(b"stale")
    return folder / f"{key}-document_index.npy"


def test_preprocess_refuses_an_existing_prefix_unless_overwrite(tmp_path, corpus, tokenizer_model):
    out = tmp_path / "ds"
    preprocess([corpus], out, tokenizer=tokenizer_model, progress=False)
    before = Path(f"{out}.bin").read_bytes()
    with pytest.raises(FileExistsError, match=f"output prefix '{out}' already holds {out}.bin, {out}.idx, "
                                              f"{out}.meta.json; pass --overwrite"):
        preprocess([corpus], out, tokenizer=tokenizer_model, progress=False)
    default_cache = _cache_entry(out / "cache" / "GPTDataset_indices", "a" * 32 + "-GPTDataset-train", str(out))
    shared = tmp_path / "shared_cache"
    ours = _cache_entry(shared, "b" * 32 + "-GPTDataset-valid", str(out))
    theirs = _cache_entry(shared, "c" * 32 + "-GPTDataset-valid", str(tmp_path / "other"))
    preprocess([corpus], out, tokenizer=tokenizer_model, progress=False, overwrite=True, cache_dir=shared)
    assert Path(f"{out}.bin").read_bytes() == before
    assert not default_cache.exists() and not ours.exists()
    assert not list(shared.glob("b*")) and not list(default_cache.parent.glob("a*"))
    assert theirs.exists()  # another prefix's entry in the shared cache stays


def test_cli_preprocess_into_existing_prefix(tmp_path, corpus, tokenizer_model, capsys):
    arguments = ["preprocess", "--input", str(corpus), "--tokenizer", str(tokenizer_model), "--output-prefix",
                 str(tmp_path / "ds"), "--workers", "1", "--quiet"]
    assert mor_data(arguments) == 0
    stale = _cache_entry(tmp_path / "ds" / "cache" / "GPTDataset_indices", "d" * 32 + "-GPTDataset-train",
                         str(tmp_path / "ds"))
    refused = subprocess.run([sys.executable, "-m", "mor_megatron.cli.data", *arguments], capture_output=True,
                             text=True, check=False)
    assert refused.returncode == 2 and refused.stdout == "" and refused.stderr.count("\n") == 1
    assert f"output prefix '{tmp_path / 'ds'}' already holds" in refused.stderr and "--overwrite" in refused.stderr
    capsys.readouterr()
    assert mor_data([*arguments, "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["num_documents"] > 0
    assert not stale.exists()


@pytest.mark.parametrize(("name", "content", "where"), [
    ("bad.jsonl", b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n',
     "bad.jsonl:3: not UTF-8 text (byte 0xe9 at byte offset 29)"),
    ("bad.txt", b"first\nsecond \xff line\n", "bad.txt:2: not UTF-8 text (byte 0xff at byte offset 13)"),
], ids=["jsonl", "text"])
def test_non_utf8_input_names_file_line_and_offset(tmp_path, tokenizer_model, name, content, where):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/{where}; re-encode the file as UTF-8")):
        preprocess([path], tmp_path / "x", tokenizer=tokenizer_model, progress=False)
    assert not list(tmp_path.glob("x*"))


def test_cli_non_utf8_input_exits_2_with_one_line(tmp_path, tokenizer_model):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1"))
    result = subprocess.run([sys.executable, "-m", "mor_megatron.cli.data", "preprocess", "--input", str(path),
                             "--tokenizer", str(tokenizer_model), "--output-prefix", str(tmp_path / "x"),
                             "--workers", "1", "--quiet"], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"mor-data preprocess: error: {path}:2: not UTF-8 text (byte 0xe9 at byte offset "
                             "28); re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`\n")


def test_large_bin_token_ids_are_sampled_and_the_message_says_so(tmp_path, prefix, monkeypatch):
    from mor_megatron.data import index_check

    summary = index_check.check_indexed_dataset(prefix, vocab_size=VOCAB, vocab_source=f"{VOCAB} pieces")
    assert summary.num_tokens_checked == summary.num_tokens and "every token id checked" in summary.describe()
    monkeypatch.setattr(index_check, "FULL_SCAN_MAX_BYTES", 1024)
    monkeypatch.setattr(index_check, "SAMPLE_WINDOW_BYTES", 64)
    sampled = index_check.check_indexed_dataset(prefix, vocab_size=VOCAB, vocab_source=f"{VOCAB} pieces")
    assert sampled.num_tokens_checked == index_check.SAMPLE_WINDOWS * 32 < sampled.num_tokens
    coverage = f"token ids sampled: {sampled.num_tokens_checked:,} of {sampled.num_tokens:,} checked"
    assert coverage in sampled.describe()
    copy = tmp_path / "copy"
    for suffix in (".bin", ".idx"):
        (tmp_path / f"copy{suffix}").write_bytes(Path(f"{prefix}{suffix}").read_bytes())
    tokens = np.memmap(f"{copy}.bin", dtype=np.uint16, mode="r+")
    tokens[-1] = VOCAB  # the last window always covers the end of the file
    tokens.flush()
    with pytest.raises(index_check.DamagedDataFile, match=f"in a sample of {sampled.num_tokens_checked:,} of"):
        index_check.check_indexed_dataset(str(copy), vocab_size=VOCAB, vocab_source=f"{VOCAB} pieces")
