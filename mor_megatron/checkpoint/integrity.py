"""Per-file sizes and checksums of a checkpoint folder: recorded when a step is committed, verified on load.

torch's distributed checkpoint format stores no checksums, so a shard with flipped bytes loads silently (a
fault-injection probe flipped 16 bytes of one shard: the job resumed at loss 7e6 and saved the damage again).
When a step is committed, ``checksums.json`` records the size and BLAKE2b digest of every file in the folder;
a load first checks every file against it, and a missing, truncated or altered file is reported by name.

Hashing is split over the ranks of the job (file ``i`` goes to rank ``i % world_size``), so a large checkpoint
costs each rank only its share of one read. Without a process group (conversion) one process does it all.
:func:`select_intact_step` picks the step a resume loads (either backend).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mor_megatron.checkpoint.errors import CheckpointError
from mor_megatron.checkpoint.layout import resume_candidates, step_dir_name

logger = logging.getLogger(__name__)

MANIFEST_FILE = "checksums.json"
_CHUNK_BYTES = 8 << 20
_FORMAT = 1


class CheckpointDamaged(CheckpointError):
    """A checkpoint step is incomplete or its files fail their checksums; the message names the files."""


def file_fingerprint(path: Path) -> dict[str, Any]:
    """``{"size": bytes, "blake2b": hex digest}`` of one file, read in chunks (constant memory)."""
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return {"size": path.stat().st_size, "blake2b": digest.hexdigest()}


def _checkpoint_files(step_dir: Path) -> list[str]:
    return sorted(path.relative_to(step_dir).as_posix() for path in step_dir.rglob("*")
                  if path.is_file() and path.name != MANIFEST_FILE)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_rank0() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _broadcast_from_rank0(value: Any) -> Any:
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_lists(items: list) -> list:
    """Concatenation of every rank's ``items`` (on every rank)."""
    if not _distributed():
        return items
    gathered: list[list] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def _my_share(names: list[str]) -> list[str]:
    if not _distributed():
        return names
    return names[dist.get_rank()::dist.get_world_size()]


def write_manifest(step_dir: Path) -> None:
    """Record the fingerprint of every file of ``step_dir`` in ``step_dir/checksums.json``.

    Collective when a process group exists (all ranks call it after every rank has finished writing; rank 0
    writes the file), else done by this process alone.
    """
    names = _broadcast_from_rank0(_checkpoint_files(step_dir) if _is_rank0() else None)
    fingerprints = _gather_lists([(name, file_fingerprint(step_dir / name)) for name in _my_share(names)])
    if _is_rank0():
        manifest = {"format": _FORMAT, "algorithm": "blake2b-128", "files": dict(sorted(fingerprints))}
        tmp = step_dir / f".{MANIFEST_FILE}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        tmp.replace(step_dir / MANIFEST_FILE)


def _read_manifest(step_dir: Path) -> dict[str, dict[str, Any]] | str | None:
    """The manifest's file table; None when there is none (older checkpoint); a problem text when unreadable."""
    path = step_dir / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{path}: unreadable manifest ({err})"


def _file_problem(step_dir: Path, name: str, expected: dict[str, Any]) -> str | None:
    path = step_dir / name
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{path}: {size} bytes, {expected['size']} recorded (truncated or overwritten)"
    if file_fingerprint(path)["blake2b"] != expected["blake2b"]:
        return f"{path}: contents differ from the recorded checksum (corrupted)"
    return None


def verify_manifest(step_dir: Path) -> tuple[bool, list[str]]:
    """Check every file of ``step_dir`` against its ``checksums.json``.

    Collective when a process group exists (every rank checks its share and all ranks get every problem).

    Returns:
        ``(has_manifest, problems)``: ``has_manifest`` False for a folder saved before checksums were recorded
        (nothing could be checked); ``problems`` names each damaged file and what is wrong with it.
    """
    table = _broadcast_from_rank0(_read_manifest(step_dir) if _is_rank0() else None)
    if table is None:
        return False, []
    if isinstance(table, str):
        return True, [table]
    problems = [problem for name in _my_share(sorted(table))
                if (problem := _file_problem(step_dir, name, table[name])) is not None]
    return True, sorted(_gather_lists(problems))


def _missing_part(step_dir: Path, marker: str) -> str | None:
    if not step_dir.is_dir():
        return f"{step_dir}: missing (named by the 'latest' pointer, but deleted or never published)"
    if not (step_dir / marker).is_file():
        return f"{step_dir / marker}: missing (the save did not finish, or the folder was copied incompletely)"
    return None


def damage_report(step_dir: Path, *, marker: str) -> list[str]:
    """What makes ``step_dir`` unloadable: no completion ``marker``, or files that fail its manifest.

    Collective when a process group exists (rank 0 looks at the folder, every rank checks its share of the
    files). A folder saved before checksums were recorded is accepted with a warning.

    Returns:
        One line per problem, each naming the file; empty when the step can be loaded.
    """
    missing = _broadcast_from_rank0(_missing_part(step_dir, marker) if _is_rank0() else None)
    if missing is not None:
        return [missing]
    has_manifest, problems = verify_manifest(step_dir)
    if not has_manifest:
        logger.warning("checkpoint %s has no %s (saved before checksums were recorded): its files are not verified",
                       step_dir, MANIFEST_FILE)
    return problems


def select_intact_step(root: Path, *, marker: str, fallback_to_previous: bool) -> int | None:
    """The step a resume loads: the newest candidate that is complete (holds ``marker``) and passes its checksums.

    Collective when a process group exists (every rank checks a share of the files). A damaged newest step is
    an error unless ``fallback_to_previous``; then each damaged step is logged and the next older one tried.

    Returns:
        The step, or None when ``root`` holds no step folder at all.

    Raises:
        CheckpointDamaged: the newest step is damaged (and no fallback), or every step is.
    """
    candidates = resume_candidates(root)
    for index, step in enumerate(candidates):
        step_dir = root / step_dir_name(step)
        problems = damage_report(step_dir, marker=marker)
        if not problems:
            return step
        if not fallback_to_previous:
            raise CheckpointDamaged(damage_message(step_dir, problems, has_previous=index + 1 < len(candidates)))
        logger.warning("checkpoint %s is damaged (%s); checkpoint.fallback_to_previous=true: trying the previous "
                       "step", step_dir, "; ".join(problems))
    if candidates:
        raise CheckpointDamaged(f"no intact checkpoint under {root}: steps {candidates} are all damaged or "
                                "incomplete (see the warnings above); start a new checkpoint.save_dir")
    return None


def damage_message(step_dir: Path, problems: list[str], *, has_previous: bool) -> str:
    """The error text for a damaged step: its problems and the way out."""
    fix = ("set checkpoint.fallback_to_previous=true to resume from the newest intact earlier step, or restore "
           "the folder from a copy" if has_previous else "restore the folder from a copy, or start a new "
           "checkpoint.save_dir")
    return f"checkpoint {step_dir} is damaged or incomplete: {'; '.join(problems)}. To go on, {fix}"
