"""Validation of the names a user types into the tab: output files and project folders.

Both are plain names, never paths: the tab decides the folder (the web UI's checkpoint folder,
``models/mace/``), so a name like ``../x`` or ``/etc/x`` cannot write elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from mace_core.errors import MaceError
from mace_core.run.request import plain_name, validate_project_name  # noqa: F401 - the tab's names are the core's

SUFFIX = ".safetensors"
_OTHER_MODEL_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".gguf")


def validate_output_name(name: str, folder: str | Path, overwrite: bool = False,
                         protect: tuple[str | Path, ...] = ()) -> Path:
    """The output checkpoint's path: ``folder / name`` with ``.safetensors`` added if missing.

    Rejects paths (``../x``, ``/abs/x``, ``a/b``), names of other model formats, existing files
    unless ``overwrite``, and any path in ``protect`` (the input model) even with ``overwrite``.
    """
    name = plain_name(name, "output file name")
    low = name.lower()
    if low.endswith(_OTHER_MODEL_SUFFIXES):
        raise MaceError(f"output {name!r}: erased models are written as {SUFFIX} only; use a name ending in {SUFFIX} "
                        f"or no extension")
    if not low.endswith(SUFFIX):
        name += SUFFIX
    elif len(name) == len(SUFFIX):
        raise MaceError("output file name is empty")
    out = Path(folder) / name
    for p in protect:
        if p and Path(p).exists() and out.exists() and out.resolve() == Path(p).resolve():
            raise MaceError(f"{name} is the input model; it is never overwritten. Choose another output name")
    if out.exists() and not overwrite:
        raise MaceError(f"{out.name} already exists in {Path(folder)}; tick 'overwrite' or choose another name")
    if out.exists() and not out.is_file():
        raise MaceError(f"{out} exists and is not a file")
    return out


def default_project_name(output: Path) -> str:
    """The project folder used when the user names none: the output file's stem."""
    return output.stem
