"""What the tab needs from its host, and the standalone implementation.

The tab never imports the web UI: it calls a `Host`. `a1111.A1111Host` talks to AUTOMATIC1111 /
Forge (``modules.*``); `StandaloneHost` serves a folder of models for
``python -m sd_webui_extension``; tests pass either or a fake.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # the package imports without torch (the core's checkpoint module needs it)
    from mace_core.model.checkpoint import Checkpoint

MODEL_SUFFIXES = (".safetensors", ".ckpt")


class Host:
    """The host interface (base class with the standalone-friendly defaults)."""

    name = "host"
    #: whether the tab offers "Load the new checkpoint" (only a web UI can load one)
    can_load_checkpoint = False
    #: where the erasure runs: "auto" (cuda when available), "cpu", "cuda", "cuda:1" ...
    device = "auto"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # --- models and folders ---------------------------------------------------------------
    def list_checkpoints(self) -> list[str]:
        """Titles for the checkpoint dropdown."""
        raise NotImplementedError

    def current_checkpoint(self) -> str | None:
        """The title of the model the host has loaded (the dropdown's default)."""
        raise NotImplementedError

    def checkpoint_path(self, title: str) -> Path:
        """The file behind a dropdown title."""
        raise NotImplementedError

    def checkpoint_folder(self) -> Path:
        """Where erased checkpoints are written."""
        raise NotImplementedError

    def projects_folder(self) -> Path:
        """Where erasure projects live (``models/mace``)."""
        raise NotImplementedError

    def refresh_checkpoints(self) -> None:
        """Rescan after a new file was written."""

    def load_checkpoint(self, path: Path) -> str:
        """Make the host use ``path``; returns a message for the user."""
        raise NotImplementedError(f"{self.name} cannot load checkpoints")

    def default_clip_skip(self) -> int:
        """The CLIP skip the host samples with (the erasure must act on that layer)."""
        return 1

    @contextlib.contextmanager
    def base_model(self, path: Path) -> Iterator[Checkpoint]:
        """The checkpoint a job erases from, held for the block: here the file, read by the core's
        loader; a web UI lends the copy it holds in memory where it can."""
        from mace_core.model.checkpoint import load_checkpoint

        yield load_checkpoint(path)

    # --- running a job ----------------------------------------------------------------------
    @contextlib.contextmanager
    def job(self, label: str) -> Iterator[None]:
        """Hold the host for one run: exclusive, interrupt flag cleared, memory freed at the end."""
        if not self._lock.acquire(blocking=False):
            from mace_core.errors import MaceError

            raise MaceError("another MACE run is in progress; wait for it or press Interrupt")
        self._stop.clear()
        try:
            yield
        finally:
            self._lock.release()
            self.free_memory()

    def progress(self, label: str, done: int, total: int) -> None:
        """The core's progress callback also reports here (the web UI's job state)."""

    def interrupt(self) -> None:
        self._stop.set()

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def free_memory(self) -> None:
        gc.collect()
        try:
            import torch
        except ImportError:  # pragma: no cover - the core needs torch anyway
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class StandaloneHost(Host):
    """``python -m sd_webui_extension --model PATH``: the models of one folder, outputs beside them."""

    name = "standalone"

    def __init__(self, model: str | Path, out_dir: str | Path | None = None, projects_dir: str | Path | None = None,
                 device: str = "auto") -> None:
        super().__init__()
        self.model = Path(model).resolve()
        self.out_dir = Path(out_dir).resolve() if out_dir else self.model.parent
        self.projects_dir = Path(projects_dir).resolve() if projects_dir else self.out_dir / "mace"
        self.device = device

    def _files(self) -> dict[str, Path]:
        files = {self.model.name: self.model}
        for folder in dict.fromkeys([self.model.parent, self.out_dir]):
            if folder.is_dir():
                for p in sorted(folder.iterdir()):
                    if p.suffix.lower() in MODEL_SUFFIXES and p.is_file() and not p.name.startswith("."):
                        files.setdefault(p.name, p)
        return files

    def list_checkpoints(self) -> list[str]:
        return list(self._files())

    def current_checkpoint(self) -> str | None:
        return self.model.name

    def checkpoint_path(self, title: str) -> Path:
        files = self._files()
        if title not in files:
            from mace_core.errors import MaceError

            raise MaceError(f"checkpoint {title!r} not found; press the refresh button")
        return files[title]

    def checkpoint_folder(self) -> Path:
        return self.out_dir

    def projects_folder(self) -> Path:
        return self.projects_dir
