"""Depth maps: how many recursions of the shared block each token of a text received, as HTML, PNG and a table.

MoR's premise is that some tokens think deeper than others; the paper shows text coloured by recursion depth.
A :class:`DepthMap` holds a text's tokens and their depths (taken from the model's own routing by
:mod:`mor_megatron.viz.models`); :func:`depth_table` summarises it (mean depth, share of tokens at each depth,
mean depth by token class and by position), :func:`render_html` writes a self-contained page and
:func:`render_png` a figure.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKEN_CLASSES = ("space/punct", "word", "digits")
"""Token classes of the table: whitespace and punctuation only; with a letter or ``_`` (words, identifiers);
digits (with at most punctuation or spaces around them)."""

# Perceptually ordered (viridis stops): depth 0 dark, the deepest bright; readable under black or white text.
_PALETTE = ("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725")


@dataclass
class DepthMap:
    """A text's tokens and the recursions each one ran.

    Attributes:
        pieces: the text of each token (concatenated, the decoded text; a token ending inside a multi-byte
            character has an empty piece, the character going to the token that completes it).
        depths: recursions each token ran, ``0..num_recursions``.
        num_recursions: N_r of the model.
        routing: the model's routing (`expert_choice`, `token_choice`, `none`).
        routing_mode: `topk` (training routing) or `causal` (threshold routing, what serving runs).
        model: the checkpoint or export folder the depths come from.
        step: the training step of the checkpoint, None when unknown (a Hugging Face export).
    """

    pieces: list[str]
    depths: list[int]
    num_recursions: int
    routing: str
    routing_mode: str
    model: str
    step: int | None

    def __post_init__(self) -> None:
        if len(self.pieces) != len(self.depths):
            raise ValueError(f"{len(self.pieces)} token pieces but {len(self.depths)} depths")
        if any(not 0 <= d <= self.num_recursions for d in self.depths):
            raise ValueError(f"depths must lie in 0..{self.num_recursions}, got {sorted(set(self.depths))}")


def token_pieces(decode: Callable[[list[int]], str], ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded prefix, so that the pieces concatenate to ``decode(ids)``.

    Decoding a token alone is wrong for SentencePiece (leading-space markers) and byte-level BPE (a character
    split over tokens), hence prefixes: a prefix that ends inside a character (U+FFFD) or is rewritten by the
    next token adds nothing until the text is stable again.
    """
    pieces: list[str] = []
    emitted = ""
    for i in range(len(ids)):
        text = decode(list(ids[: i + 1]))
        if text.endswith("\ufffd") or not text.startswith(emitted):
            pieces.append("")
            continue
        pieces.append(text[len(emitted):])
        emitted = text
    if pieces:
        pieces[-1] += decode(list(ids))[len(emitted):]
    return pieces


def token_class(piece: str) -> str:
    """One of :data:`TOKEN_CLASSES` for a token's text."""
    if any(ch.isalpha() or ch == "_" for ch in piece):
        return "word"
    if any(ch.isdigit() for ch in piece):
        return "digits"
    return "space/punct"


def position_buckets(num_tokens: int) -> list[tuple[int, int]]:
    """``[start, end)`` position ranges growing 4x (0-8, 8-32, 32-128, ...), cut at ``num_tokens``: the
    early positions, where the routing sees little context, are told apart from the rest."""
    buckets, start, end = [], 0, 8
    while start < num_tokens:
        buckets.append((start, min(end, num_tokens)))
        start, end = end, end * 4
    return buckets


def _mean(values: list[int]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def depth_table(depth_map: DepthMap) -> dict[str, Any]:
    """The summary written to depth.json: mean depth, share at each depth, by token class and by position."""
    depths, n = depth_map.depths, len(depth_map.depths)
    by_class: dict[str, list[int]] = {name: [] for name in TOKEN_CLASSES}
    for piece, depth in zip(depth_map.pieces, depths):
        by_class[token_class(piece)].append(depth)
    return {
        "model": depth_map.model,
        "step": depth_map.step,
        "routing": depth_map.routing,
        "routing_mode": depth_map.routing_mode,
        "num_recursions": depth_map.num_recursions,
        "num_tokens": n,
        "mean_depth": _mean(depths),
        "share_by_depth": {str(d): round(depths.count(d) / n, 4) if n else 0.0
                           for d in range(depth_map.num_recursions + 1)},
        "by_class": {name: {"tokens": len(values), "mean_depth": _mean(values)} for name, values in by_class.items()},
        "by_position": [{"start": start, "end": end, "tokens": end - start, "mean_depth": _mean(depths[start:end])}
                        for start, end in position_buckets(n)],
        "tokens": [[piece, depth] for piece, depth in zip(depth_map.pieces, depths)],
    }


def depth_colors(num_recursions: int) -> list[str]:
    """A colour per depth ``0..num_recursions``, spread over the palette."""
    last = len(_PALETTE) - 1
    return [_PALETTE[round(d * last / max(num_recursions, 1))] for d in range(num_recursions + 1)]


def _visible(piece: str) -> str:
    """Escaped token text with whitespace made visible: spaces as a dot, tabs as an arrow, newlines as a
    return sign followed by the line break itself."""
    out = []
    for ch in piece:
        if ch == " ":
            out.append("\u00b7")
        elif ch == "\t":
            out.append("\u2192")
        elif ch == "\n":
            out.append("\u21b5\n")
        else:
            out.append(html.escape(ch))
    return "".join(out) or "\u2205"  # a token with no text of its own stays visible


def render_html(depth_map: DepthMap, table: dict[str, Any]) -> str:
    """A self-contained page: the text coloured by depth (each token a span with ``data-depth``), a legend,
    the model, step and routing, and the summary table."""
    colors = depth_colors(depth_map.num_recursions)
    # Light text on the dark end of the palette, dark text on the bright end.
    text_colors = ["#fff" if d <= depth_map.num_recursions / 2 else "#000" for d in range(len(colors))]
    styles = "\n".join(f".d{d}{{background:{c};color:{t}}}" for d, (c, t) in enumerate(zip(colors, text_colors)))
    tokens = "".join(f'<span class="t d{depth}" data-depth="{depth}" title="#{i}: {depth} recursion'
                     f'{"" if depth == 1 else "s"}">{_visible(piece)}</span>'
                     for i, (piece, depth) in enumerate(zip(depth_map.pieces, depth_map.depths)))
    legend = "".join(f'<span class="t d{d}">depth {d}: {table["share_by_depth"][str(d)]:.1%}</span> '
                     for d in range(depth_map.num_recursions + 1))
    class_rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{row['tokens']}</td><td>{_fmt(row['mean_depth'])}"
                         "</td></tr>" for name, row in table["by_class"].items())
    position_rows = "".join(f"<tr><td>{row['start']}-{row['end'] - 1}</td><td>{row['tokens']}</td>"
                            f"<td>{_fmt(row['mean_depth'])}</td></tr>" for row in table["by_position"])
    step = "unknown" if depth_map.step is None else str(depth_map.step)
    title = f"MoR depth map: {depth_map.model}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body{{font-family:sans-serif;margin:2em;max-width:60em}}
.text{{font-family:monospace;white-space:pre-wrap;line-height:1.8;border:1px solid #ccc;padding:1em}}
.t{{padding:0.1em 0;border-radius:2px}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:0.2em 0.6em;text-align:right}}
{styles}
</style></head><body>
<h1>Recursions per token</h1>
<p>model <code>{html.escape(depth_map.model)}</code>, step {step}, routing {html.escape(depth_map.routing)},
routing mode <b>{html.escape(depth_map.routing_mode)}</b>, N<sub>r</sub> = {depth_map.num_recursions},
{table["num_tokens"]} tokens, mean depth {_fmt(table["mean_depth"])}</p>
<p class="legend">{legend}</p>
<p>Spaces show as \u00b7, tabs as \u2192, line ends as \u21b5.</p>
<div class="text">{tokens}</div>
<h2>Mean depth by token class</h2>
<table><tr><th>class</th><th>tokens</th><th>mean depth</th></tr>{class_rows}</table>
<h2>Mean depth by position</h2>
<table><tr><th>positions</th><th>tokens</th><th>mean depth</th></tr>{position_rows}</table>
</body></html>
"""


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_png(depth_map: DepthMap, path: Path, tokens_per_row: int = 16) -> None:
    """Draw the tokens as depth-coloured cells in rows of ``tokens_per_row``, with a legend, into ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    colors = depth_colors(depth_map.num_recursions)
    rows = max(1, -(-len(depth_map.pieces) // tokens_per_row))
    fig, ax = plt.subplots(figsize=(tokens_per_row * 0.8, rows * 0.4 + 1.2))
    for i, (piece, depth) in enumerate(zip(depth_map.pieces, depth_map.depths)):
        x, y = i % tokens_per_row, rows - 1 - i // tokens_per_row
        ax.add_patch(Rectangle((x, y), 0.95, 0.9, color=colors[depth]))
        label = html.unescape(_visible(piece).replace("\n", ""))
        ax.text(x + 0.475, y + 0.45, label[:8], ha="center", va="center", fontsize=7, family="monospace",
                color="white" if depth <= depth_map.num_recursions / 2 else "black")
    ax.set_xlim(0, tokens_per_row)
    ax.set_ylim(0, rows)
    ax.axis("off")
    ax.legend(handles=[Patch(color=c, label=f"depth {d}") for d, c in enumerate(colors)], loc="upper center",
              bbox_to_anchor=(0.5, 0.0), ncol=len(colors), fontsize=8, frameon=False)
    step = "?" if depth_map.step is None else depth_map.step
    name = "/".join(Path(depth_map.model).parts[-2:])  # a step folder's name alone would not say which run
    ax.set_title(f"{name}, step {step}, {depth_map.routing_mode} routing", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_depth_map(depth_map: DepthMap, out_dir: Path) -> dict[str, Any]:
    """Write depth.html, depth.png and depth.json into ``out_dir``; returns the one-line summary (paths, token
    count, mean depth, share at each depth)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = depth_table(depth_map)
    (out_dir / "depth.json").write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n")
    (out_dir / "depth.html").write_text(render_html(depth_map, table), encoding="utf-8")
    render_png(depth_map, out_dir / "depth.png")
    return {"out": str(out_dir), "html": str(out_dir / "depth.html"), "json": str(out_dir / "depth.json"),
            "png": str(out_dir / "depth.png"), "model": depth_map.model, "step": depth_map.step,
            "routing_mode": depth_map.routing_mode, "num_tokens": table["num_tokens"],
            "mean_depth": table["mean_depth"], "share_by_depth": table["share_by_depth"]}
