"""What data a run trained on, as MLflow dataset inputs: the Dataset column of the run list names the blend.

Megatron data is a blend of ``.bin/.idx`` prefixes, which MLflow cannot read; the run records metadata only
(what ``mlflow.data.meta_dataset.MetaDataset`` logs, with a profile): the prefixes and weights, and a digest
of what lies on disk, so two runs with the same digest read the same tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mor_megatron.data.datasets import parse_blend

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput

_SPLITS = (("blend", "training"), ("valid_blend", "validation"), ("test_blend", "test"))
"""(data config field, MLflow dataset context)."""


def _prefix_facts(prefix: str) -> dict[str, Any]:
    """Sizes of a prefix's files and its ``.meta.json`` record (tokenizer sha256, token and document counts).

    Sizes rather than modification times: a copied dataset keeps its digest.
    """
    facts: dict[str, Any] = {"prefix": str(Path(prefix).resolve())}
    for suffix in (".bin", ".idx"):
        path = Path(prefix + suffix)
        facts[f"{suffix[1:]}_bytes"] = path.stat().st_size if path.is_file() else None
    meta = Path(prefix + ".meta.json")
    try:
        record = json.loads(meta.read_text())
    except (OSError, ValueError):
        record = {}
    for key in ("tokenizer_sha256", "num_documents", "num_tokens"):
        if key in record:
            facts[key] = record[key]
    return facts


def blend_profile(blend: Sequence[str], field: str, split: str | None) -> dict[str, Any]:
    """One blend as recorded with the run: each prefix's facts and weight, the split and, when every prefix's
    ``.meta.json`` counts them, the total tokens."""
    prefixes, weights = parse_blend(blend, field)
    parts = [{**_prefix_facts(prefix), "weight": None if weights is None else weights[i]}
             for i, prefix in enumerate(prefixes)]
    counts = [part.get("num_tokens") for part in parts]
    profile: dict[str, Any] = {"prefixes": parts, "split": split}
    if all(isinstance(count, int) for count in counts):
        profile["num_tokens"] = sum(counts)
    return profile


def dataset_inputs(data: Mapping[str, Any]) -> list[DatasetInput]:
    """MLflow dataset inputs of a job's ``data`` config section (as a dict): the training blend with context
    ``training`` and, when set, ``valid_blend``/``test_blend`` as ``validation``/``test``. Reads file sizes
    and the small ``.meta.json`` files, nothing else."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for field, context in _SPLITS:
        blend = tuple(data.get(field) or ())
        if not blend:
            continue
        # Validation and test split off the training blend: its input carries the split, e.g. "969,30,1".
        own_splits = data.get("valid_blend") or data.get("test_blend")
        split = data.get("split") if field == "blend" and not own_splits else None
        profile = blend_profile(blend, f"data.{field}", split)
        digest = hashlib.sha256(json.dumps(profile, sort_keys=True).encode()).hexdigest()[:16]
        names = [Path(part["prefix"]).name for part in profile["prefixes"]]
        name = names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1} more"
        # The entity a MetaDataset would make, plus the profile (prefixes, weights, counts) the UI shows.
        source = json.dumps({"uri": Path(profile["prefixes"][0]["prefix"]).as_uri()})
        entity = Dataset(name=name, digest=digest, source_type="local", source=source,
                         profile=json.dumps(profile))
        inputs.append(DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs
