"""The one way mace writes a file: checked before any compute, written atomically, ordinary modes.

`check_destination` is the preflight a command runs before its long work: the destination is not a
folder, not one of the command's inputs, not inside an erasure project (whose files only the
project writes), not an existing file unless overwriting was asked for, its folder exists or can be
made and is writable, and the disk has room for the expected size. `write_atomic` then writes to a
temporary file in the destination's folder and renames it over the destination, so a reader never
sees half a file and a failed write leaves nothing behind; the file gets the mode a new file gets
under the process umask (0644 under umask 022; safetensors' own writer and `mkstemp` make 0600,
which other accounts, e.g. a web UI's, cannot read).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable, Mapping

from .errors import MaceError

#: what the CLI tells a user who wants to replace an existing file (hosts pass their own words)
FORCE_HINT = "pass --force to replace it"
_UMASK_LOCK = threading.Lock()


def file_mode() -> int:
    """The mode a new regular file gets under the process umask (0o644 under umask 022)."""
    with _UMASK_LOCK:  # reading the umask means setting it; other threads must not see the 0
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def project_root_of(path: str | Path) -> Path | None:
    """The erasure project folder (a folder with a mace manifest.json) ``path`` lies in, if any."""
    p = Path(os.path.abspath(path))
    for folder in [p, *p.parents]:
        manifest = folder / "manifest.json"
        if folder != p and manifest.is_file():
            try:
                data = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and "base" in data and "concepts" in data:
                return folder
    return None


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (also through links; by name when one does not exist)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _existing_ancestor(path: Path) -> Path:
    for folder in Path(os.path.abspath(path)).parents:
        if folder.exists():
            return folder
    return Path("/")


def check_destination(path: str | Path, *, what: str = "--out", overwrite: bool = False,
                      inputs: Iterable[str | Path] = (), expected_bytes: int = 0,
                      force_hint: str = FORCE_HINT) -> Path:
    """Refuse (`MaceError` naming ``what`` and ``path``) a destination the command must not write.

    ``inputs``: files and folders the command reads (never replaced, even with ``overwrite``);
    ``expected_bytes``: about what will be written (checked against the free space)."""
    path = Path(path)
    for src in inputs:
        src = Path(src)
        inside = not src.is_file() and Path(os.path.realpath(path)).is_relative_to(os.path.realpath(src))
        if _same_file(path, src) or inside:  # a folder input (a project, a diffusers model) holds no output
            raise MaceError(f"{what} {path} is one of this command's inputs ({src}); choose another {what}")
    root = project_root_of(path)
    if root is not None:
        raise MaceError(f"{what} {path} is inside the erasure project {root}, whose files only mace's runs write; "
                        f"choose a path outside it")
    if path.is_dir():
        raise MaceError(f"{what} {path} is a folder; give a file name (e.g. {path / 'out'}{path.suffix or ''})")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise MaceError(f"{what} {path} exists and is not a regular file; choose another {what}")
        if not overwrite:
            raise MaceError(f"{what} {path} already exists; {force_hint}, or choose another {what}")
    return check_folder(path.parent, what=what, expected_bytes=expected_bytes)


def check_folder(folder: str | Path, *, what: str, expected_bytes: int = 0) -> Path:
    """Refuse a folder (to be written into) that is a file, cannot be made or is not writable, or
    whose disk has less than ``expected_bytes`` free. Creates nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MaceError(f"{what}: {folder} is a file, not a folder; choose another {what}")
    base = folder if folder.is_dir() else _existing_ancestor(folder)
    if not base.is_dir():
        raise MaceError(f"{what}: cannot make folder {folder}: {base} is a file; choose another {what}")
    if not os.access(base, os.W_OK | os.X_OK):
        made = "" if base == folder else f" (to make {folder})"
        raise MaceError(f"{what}: folder {base} is not writable{made}; choose another {what} or fix its permissions")
    free = shutil.disk_usage(base).free
    if expected_bytes > free:
        raise MaceError(f"{what}: not enough free space in {base}: about {expected_bytes / 2 ** 20:.1f} MiB needed, "
                        f"{free / 2 ** 20:.1f} MiB free; free some space or choose another {what}")
    return folder


def write_atomic(path: str | Path, write: Callable[[Path], None], *, what: str = "--out",
                 overwrite: bool = False, inputs: Iterable[str | Path] = (), expected_bytes: int = 0,
                 checked: bool = False, force_hint: str = FORCE_HINT) -> Path:
    """Write ``path`` through ``write(temp_path)``: a temporary file in the same folder renamed over
    ``path`` once complete (removed on any failure), with the umask's ordinary mode.

    ``checked=True``: the caller owns ``path`` (a project writing its own files, a folder of
    results it made) and skips `check_destination`; otherwise it runs now (also right before the
    write, since files may appear during a long run)."""
    path = Path(path)
    if not checked:
        check_destination(path, what=what, overwrite=overwrite, inputs=inputs, expected_bytes=expected_bytes,
                          force_hint=force_hint)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise MaceError(f"{what}: cannot write in {path.parent} ({e.strerror}); choose another {what}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename: a crash leaves the old file or the new one
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as e:
        hint = "free some space" if e.errno == errno.ENOSPC else "check the folder"
        raise MaceError(f"{what}: cannot write {path} ({e.strerror or e}); {hint} or choose another {what}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: str | Path, data: bytes, **kw) -> Path:
    """`write_atomic` of ``data``."""
    return write_atomic(path, lambda tmp: tmp.write_bytes(data), expected_bytes=len(data), **kw)


def write_text(path: str | Path, text: str, **kw) -> Path:
    """`write_atomic` of ``text`` as UTF-8."""
    return write_bytes(path, text.encode("utf-8"), **kw)


def write_png(path: str | Path, image, **kw) -> Path:
    """`write_atomic` of an image ([H, W, 3] or [H, W] uint8 array) as a lossless PNG."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return write_bytes(path, buf.getvalue(), **kw)


def tensors_bytes(tensors: Mapping) -> int:
    """Bytes of the tensors' data (about a .safetensors file's size)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_tensors(path: str | Path, tensors: Mapping, metadata: Mapping[str, str] | None = None,
                 then: Callable[[Path], None] | None = None, **kw) -> Path:
    """`write_atomic` of ``tensors`` (name -> torch tensor) as .safetensors with ``metadata``;
    ``then(temp_path)`` runs on the complete temporary file before the rename."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
        if then is not None:
            then(tmp)
    kw.setdefault("expected_bytes", tensors_bytes(tensors))
    return write_atomic(path, write, **kw)


class ImageIndex:
    """A folder of PNGs and its ``index.jsonl`` (one ``{"file", "prompt", "seed"}`` row per image).

    Each image is written as soon as it is drawn, and the index after it, so an interrupt keeps every
    finished image; `keep_written` (on an interrupt) makes the index list exactly the images this run
    wrote, since one may fall between an image and its row, and an image being replaced (``--force``)
    may still be the old file. The caller has checked the folder's files.
    """

    def __init__(self, folder: str | Path):
        self.folder, self.rows = Path(folder), []
        self._pending: tuple[str, tuple | None] | None = None  # (row, the file's identity before) while writing

    def add(self, name: str, prompt: str, seed: int, image) -> None:
        """Write ``image`` ([H, W, 3] uint8) as ``name``, then its row."""
        row = json.dumps({"file": name, "prompt": prompt, "seed": seed}) + "\n"
        self._pending = (row, _identity(self.folder / name))
        write_png(self.folder / name, image, checked=True)
        self.rows.append(row)
        self._pending = None
        write_text(self.folder / "index.jsonl", "".join(self.rows), checked=True)

    def keep_written(self) -> None:
        if self._pending is not None:  # interrupted while writing an image: listed once it is the new file
            row, before = self._pending
            path = self.folder / json.loads(row)["file"]
            if path.is_file() and _identity(path) != before:
                self.rows.append(row)
        write_text(self.folder / "index.jsonl", "".join(self.rows), checked=True)


def _identity(path: Path) -> tuple | None:
    """(inode, mtime) of a file, None when absent: `write_atomic` renames a new file over the old one."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns
