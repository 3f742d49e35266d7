"""``mor-serve MODEL_DIR``: serve a Hugging Face export over an OpenAI-compatible HTTP API (docs/serving.md).

A MoR export (``mor-convert to-hf``) is served by the continuous depth-wise batching engine; a vanilla (Llama)
export, or a MoR model without cycle sharing, by the sequence-wise engine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mor_megatron.cli.quiet import silence_known_warnings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mor-serve", description="Serve a Hugging Face export of a MoR (or Llama) model over an "
                                      "OpenAI-compatible HTTP API: /v1/completions, /v1/models, /health.")
    parser.add_argument("model_dir", type=Path,
                        help="folder written by mor-convert to-hf (or a Llama export)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every "
                             "interface, there is no authentication)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--slots", type=int, default=8, help="sequences resident at once (default 8)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="cached tokens per sequence, prompt + max_tokens - 1 at most (default: the "
                             "model's max_position_embeddings, at most 2048)")
    parser.add_argument("--kv-blocks", type=int, default=None,
                        help="KV blocks of --block-size tokens in the pool (default: the worst case, which "
                             "never runs out); a request that finds the pool full fails with status 503")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="weights and KV cache (auto: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--model-name", default=None,
                        help="the model id the API reports (default: the folder's name)")
    return parser


def load_server(model_dir: Path, *, slots: int, max_len: int | None, kv_blocks: int | None, block_size: int,
                dtype: str, model_name: str | None = None):
    """The :class:`~mor_megatron.inference.server.CompletionServer` of an export folder (not started)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mor_megatron.inference.engine import DepthWiseEngine, SequenceWiseEngine
    from mor_megatron.inference.server import CompletionServer
    from mor_megatron.inference.stack import ModelStack

    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} has no config.json: give a folder written by mor-convert to-hf")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, local_files_only=True,
                                                 dtype=getattr(torch, dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True, local_files_only=True)
    if max_len is None:
        max_len = min(getattr(model.config, "max_position_embeddings", 2048), 2048)
    eos = tokenizer.eos_token_id
    if model.config.model_type == "mor" and ModelStack.from_model(model).is_cycled:
        engine = DepthWiseEngine(model, num_slots=slots, max_batch=slots, max_len=max_len, eos_token_id=eos,
                                 block_size=block_size, kv_blocks=kv_blocks)
    else:
        engine = SequenceWiseEngine(model, num_slots=slots, max_len=max_len, eos_token_id=eos,
                                    block_size=block_size, kv_blocks=kv_blocks)
    return CompletionServer(engine, tokenizer, model_name or model_dir.resolve().name)


def main(argv: list[str] | None = None) -> int:
    silence_known_warnings()
    args = build_parser().parse_args(argv)
    try:
        server = load_server(args.model_dir, slots=args.slots, max_len=args.max_len, kv_blocks=args.kv_blocks,
                             block_size=args.block_size, dtype=args.dtype, model_name=args.model_name)
    except (OSError, ValueError) as err:
        print(f"mor-serve: error: {err}", file=sys.stderr)
        return 2
    import uvicorn

    from mor_megatron.inference.server import create_app

    uvicorn.run(create_app(server), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
