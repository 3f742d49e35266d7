"""A conversion never writes into, over or around its own input.

``mor-convert to-hf CKPT RUN_DIR --overwrite`` with the training run's folder as output once deleted the
checkpoints, metrics and config it was converting. Every conversion therefore refuses, before it reads
anything, an output folder that is, contains or lies inside one of its input folders: the checkpoint step and
its ``checkpoint.save_dir`` (or the Hugging Face model folder). The training run folder around a save_dir must
be neither the output nor inside it; an output inside it (``<run>/hf``, as ``tools/demo.sh`` writes) is fine.
"""

from __future__ import annotations

from pathlib import Path

from mor_megatron.convert import ConversionError

_RUN_FOLDER_MARKER = "config.yaml"
"""The trainer writes its config here into ``output_dir``: the folder above a save_dir is a run folder then."""


def refuse_output_overlapping_checkpoint(output_dir: str | Path, step_dir: Path) -> None:
    """Raise when ``output_dir`` overlaps checkpoint ``step_dir``, its save_dir or its run folder (module doc).

    Raises:
        ConversionError: naming the output, the folder it overlaps and how.
    """
    run_dir = step_dir.parent.parent
    enclosing = {"training run folder": run_dir} if (run_dir / _RUN_FOLDER_MARKER).is_file() else {}
    refuse_output_overlapping(output_dir, {"checkpoint": step_dir, "checkpoint.save_dir": step_dir.parent},
                              enclosing=enclosing)


def refuse_output_overlapping(output_dir: str | Path, inputs: dict[str, Path], *,
                              enclosing: dict[str, Path] | None = None) -> None:
    """Raise when ``output_dir`` is, contains or lies inside one of ``inputs`` (role -> folder), or is or
    contains one of ``enclosing`` (folders an output may lie inside).

    Raises:
        ConversionError: naming the output, the folder it overlaps and how.
    """
    output = Path(output_dir).resolve()
    checks = [(role, folder, True) for role, folder in inputs.items()]
    checks += [(role, folder, False) for role, folder in (enclosing or {}).items()]
    for role, folder, inside_refused in checks:
        protected = folder.resolve()
        if output == protected:
            relation = "is"
        elif protected.is_relative_to(output):
            relation = "contains"
        elif inside_refused and output.is_relative_to(protected):
            relation = "lies inside"
        else:
            continue
        raise ConversionError(f"output folder {str(output_dir)!r} {relation} the {role} {str(folder)!r}, which "
                              "this conversion reads; choose an output folder outside it")
