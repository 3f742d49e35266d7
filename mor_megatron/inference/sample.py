"""Sampling straight from a Megatron training checkpoint, with causal (threshold) routing.

``python -m mor_megatron.inference.sample --run-dir runs/demo --prompt "def main("`` loads the newest
checkpoint of a run on one CPU process and continues the prompt, greedily or (``--temperature``, ``--top-k``,
``--top-p``, ``--seed``) by seeded sampling: a small, briefly trained model decodes greedily into a loop of its
most frequent tokens, while samples show what it learned. Each new token re-runs the whole sequence (no KV cache): this is a
check of what a checkpoint learned, not a serving path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mor_megatron.inference.sampling import SamplingParams, next_token
from mor_megatron.cli.quiet import silence_known_warnings


def generate(model, tokenizer, prompt: str, *, max_new_tokens: int, max_seq_length: int,
             sampling: SamplingParams) -> str:
    """Continuation of ``prompt`` using causal routing; returns prompt + continuation."""
    ids = tokenizer.tokenize(prompt)
    generator = sampling.generator(torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            window = ids[-max_seq_length:]
            tokens = torch.tensor([window])
            positions = torch.arange(len(window))[None]
            logits = model(tokens, positions, None, routing_mode="causal")
            next_id = next_token(logits[0, -1], sampling, generator)
            if next_id == tokenizer.eod:
                break
            ids.append(next_id)
    return tokenizer.detokenize(ids)


def main(argv: list[str] | None = None) -> int:
    silence_known_warnings()
    parser = argparse.ArgumentParser(prog="mor-sample", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="output_dir of a training run (holds config.yaml)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for several")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    args = parser.parse_args(argv)
    try:
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as err:
        parser.error(str(err))

    from mor_megatron.config import ParallelConfig, load_config
    from mor_megatron.data.tokenizer import load_tokenizer
    from mor_megatron.model.builder import build_model, transformer_config
    from mor_megatron.runtime import destroy_distributed, init_distributed
    from mor_megatron.checkpoint.megatron import Checkpointer

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        print(f"mor-sample: {run_dir}/config.yaml not found; pass the output_dir of a training run", file=sys.stderr)
        return 2
    config = load_config(run_dir / "config.yaml")
    ctx = init_distributed(ParallelConfig(), seed=config.train.seed)  # a lone process: no rendezvous needed
    try:
        model = build_model(config.model, config.recursion,
                            transformer_config(config.model, config.recursion, ParallelConfig()),
                            pg_collection=ctx.pg_collection)
        checkpointer = Checkpointer(save_dir=None, load_dir=config.checkpoint.load_dir or config.checkpoint.save_dir,
                                    keep_last=1, ctx=ctx, fallback_to_previous=config.checkpoint.fallback_to_previous)
        loop = checkpointer.load(model_chunks=[model], optimizer=None, scheduler=None)
        tokenizer = load_tokenizer(config.data.tokenizer)
        decoding = ("greedy" if sampling.greedy else f"temperature {args.temperature}, top-k "
                    f"{args.top_k or 'all'}, top-p {args.top_p}, seed {args.seed}")
        print(f"# checkpoint step {loop.step}, causal routing, {decoding}")
        for prompt in args.prompt:
            text = generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                            max_seq_length=config.seq_length, sampling=sampling)
            print(f"--- prompt: {prompt!r}\n{text}\n")
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
