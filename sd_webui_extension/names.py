"""Validation of the names a user types into the tab: output files and project folders.

Both are plain names, never paths: the tab decides the folder (the web UI's checkpoint folder,
``models/mace/``), so a name like ``../x`` or ``/etc/x`` cannot write elsewhere.
"""

from __future__ import annotations

import re
from pathlib import Path

from mace_core.errors import MaceError

SUFFIX = ".safetensors"
_OTHER_MODEL_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".gguf")
_BAD_CHARS = re.compile(r'[\x00-\x1f<>:"|?*\\/]')
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
MAX_LEN = 200


def _plain_name(name: str, what: str) -> str:
    name = (name or "").strip()
    if not name:
        raise MaceError(f"give a {what}")
    if "/" in name or "\\" in name or Path(name).is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise MaceError(f"{what} {name!r} must be a plain name, not a path: it is saved in a fixed folder")
    if _BAD_CHARS.search(name):
        raise MaceError(f"{what} {name!r} contains a character that is not allowed in file names "
                        f"(control characters or any of <>:\"|?*)")
    if name.startswith("."):
        raise MaceError(f"{what} {name!r} cannot start with a dot")
    if name.rstrip(". ") != name:
        raise MaceError(f"{what} {name!r} cannot end with a dot or a space")
    if name.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise MaceError(f"{what} {name!r} is a reserved device name on Windows; choose another")
    if len(name) > MAX_LEN:
        raise MaceError(f"{what} is too long ({len(name)} characters, at most {MAX_LEN})")
    return name


def validate_output_name(name: str, folder: str | Path, overwrite: bool = False,
                         protect: tuple[str | Path, ...] = ()) -> Path:
    """The output checkpoint's path: ``folder / name`` with ``.safetensors`` added if missing.

    Rejects paths (``../x``, ``/abs/x``, ``a/b``), names of other model formats, existing files
    unless ``overwrite``, and any path in ``protect`` (the input model) even with ``overwrite``.
    """
    name = _plain_name(name, "output file name")
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


def validate_project_name(name: str) -> str:
    """A project folder name under the projects folder (``models/mace/<name>``)."""
    return _plain_name(name, "project name")


def default_project_name(output: Path) -> str:
    """The project folder used when the user names none: the output file's stem."""
    return output.stem
