"""A Hugging Face tokenizer folder for tests: a GPT-2-style byte-level BPE with SmolLM's special-token layout
(``<|endoftext|>`` at id 0 is EOS, BOS and UNK; no pad token), trained here with the ``tokenizers`` library."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

EOS = "<|endoftext|>"


def byte_level_bpe(texts: Iterable[str], folder: Path, vocab_size: int) -> Path:
    """Train the tokenizer on ``texts`` and write ``tokenizer.json`` + ``tokenizer_config.json`` into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS, "unk_token": EOS,
         "model_max_length": 2048}))
    return folder
