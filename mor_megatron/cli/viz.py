"""``mor-viz``: views of a trained MoR model.

``mor-viz depth --model CKPT_OR_HF_DIR (--text "..." | --input FILE) --out DIR [--routing topk|causal]
[--tokenizer PATH]`` writes depth.html (the text coloured by the recursions each token received), depth.png and
depth.json (the table: mean depth, share at each depth, by token class and by position), and prints one JSON
summary line. Exit status 2 on bad input, with one error line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mor_megatron.cli.quiet import silence_known_warnings
from mor_megatron.cli.summary import print_summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mor-viz", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    depth = commands.add_parser("depth", help="per-token recursion depth of a text (HTML, PNG, JSON table)")
    depth.add_argument("--model", required=True,
                       help="Megatron checkpoint (step folder or checkpoint.save_dir) or Hugging Face export folder")
    text = depth.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the text to map")
    text.add_argument("--input", help="a UTF-8 file holding the text to map")
    depth.add_argument("--out", required=True, help="folder for depth.html, depth.png and depth.json")
    depth.add_argument("--routing", choices=("topk", "causal"), default="causal",
                       help="causal (default): threshold routing, what serving runs; topk: training routing")
    depth.add_argument("--tokenizer", default=None,
                       help="tokenizer (default: the export folder, or the checkpoint's data.tokenizer)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mor-viz``; returns the exit status (0, or 2 on bad input)."""
    silence_known_warnings()
    args = _parser().parse_args(argv)
    from mor_megatron.viz.depth import write_depth_map
    from mor_megatron.viz.models import DepthInputError, depth_map

    def run() -> dict:
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise DepthInputError(f"--out {args.out!r} exists and is not a folder")
        if args.input is not None:
            try:
                text = Path(args.input).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise DepthInputError(f"cannot read --input {args.input!r}: {err}") from err
        else:
            text = args.text
        return write_depth_map(depth_map(args.model, text, routing_mode=args.routing, tokenizer=args.tokenizer),
                               Path(args.out))

    return print_summary("mor-viz depth", run, bad_input=(DepthInputError,))


if __name__ == "__main__":
    sys.exit(main())
