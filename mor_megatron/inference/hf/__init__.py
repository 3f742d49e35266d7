"""The Hugging Face serving model of exported MoR checkpoints.

``configuration_mor.py`` and ``modeling_mor.py`` are copied verbatim into every exported MoR folder (see
``mor_megatron.convert.to_hf``) and loaded there with ``trust_remote_code=True``; they import only torch and
transformers, never mor_megatron. This package only names them, so importing it does not import transformers.
"""

from __future__ import annotations

from pathlib import Path

MODELING_FILES: tuple[str, ...] = ("configuration_mor.py", "modeling_mor.py")
"""Files an exported MoR folder carries, relative to :func:`source_dir`."""

AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_mor.MoRConfig",
    "AutoModel": "modeling_mor.MoRModel",
    "AutoModelForCausalLM": "modeling_mor.MoRForCausalLM",
}
"""``auto_map`` of an exported ``config.json``: which class each Auto* loader instantiates."""


def source_dir() -> Path:
    """Folder holding :data:`MODELING_FILES`."""
    return Path(__file__).resolve().parent
