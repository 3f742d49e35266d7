"""The Hugging Face serving model of exported MoR checkpoints.

``configuration_mor.py``, ``modeling_mor.py`` and ``recursion.py`` (``mor_megatron.model.recursion``, the
recursion rules training uses) are copied verbatim into every exported MoR folder (see
``mor_megatron.convert.to_hf``) and loaded there with ``trust_remote_code=True``; they import only torch,
transformers and each other. This package only names them, so importing it does not import transformers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

_HERE = Path(__file__).resolve().parent
MODELING_FILES: dict[str, Path] = {
    "configuration_mor.py": _HERE / "configuration_mor.py",
    "modeling_mor.py": _HERE / "modeling_mor.py",
    "recursion.py": _HERE.parent.parent / "model" / "recursion.py",
}
"""Files an exported MoR folder carries: name in the folder -> source file in this package."""

AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_mor.MoRConfig",
    "AutoModel": "modeling_mor.MoRModel",
    "AutoModelForCausalLM": "modeling_mor.MoRForCausalLM",
}
"""``auto_map`` of an exported ``config.json``: which class each Auto* loader instantiates."""


def copy_modeling_files(folder: Path) -> None:
    """Copy :data:`MODELING_FILES` into ``folder`` (an exported model)."""
    for name, source in MODELING_FILES.items():
        shutil.copyfile(source, Path(folder) / name)
