"""`Host` for AUTOMATIC1111 (1.10) and Forge. Imports the web UI's ``modules`` only inside methods,
so this file imports (and is unit-tested) without a web UI.

Model: the tab loads the selected checkpoint *file* with the core's own loader (and frees it
afterwards). Reusing the web UI's in-memory model (A1111 ``shared.sd_model``, Forge
``sd_model.forge_objects.unet``) through the core's Backend seam is not done yet.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from .host import Host


class A1111Host(Host):
    name = "a1111"
    can_load_checkpoint = True

    def __init__(self, device: str | None = None) -> None:
        super().__init__()
        self.device = device or os.environ.get("MACE_DEVICE", "auto")

    # --- models and folders ---------------------------------------------------------------
    @staticmethod
    def _sd_models():
        from modules import sd_models

        return sd_models

    def list_checkpoints(self) -> list[str]:
        sd_models = self._sd_models()
        if hasattr(sd_models, "checkpoint_tiles"):
            try:
                return list(sd_models.checkpoint_tiles())
            except TypeError:  # some forks take a flag
                return list(sd_models.checkpoint_tiles(False))
        return sorted(sd_models.checkpoints_list)

    def current_checkpoint(self) -> str | None:
        from modules import shared

        title = getattr(getattr(shared, "opts", None), "sd_model_checkpoint", None)
        if not title:
            info = getattr(getattr(shared, "sd_model", None), "sd_checkpoint_info", None)
            title = getattr(info, "title", None)
        if not title:
            return None
        titles = self.list_checkpoints()
        if title in titles:
            return title
        info = self._sd_models().get_closet_checkpoint_match(title)
        return info.title if info is not None and info.title in titles else None

    def _info(self, title: str):
        sd_models = self._sd_models()
        info = sd_models.checkpoints_list.get(title) or sd_models.get_closet_checkpoint_match(title)
        if info is None:
            from mace_core.errors import MaceError

            raise MaceError(f"checkpoint {title!r} not found; press the refresh button")
        return info

    def checkpoint_path(self, title: str) -> Path:
        return Path(self._info(title).filename)

    def checkpoint_folder(self) -> Path:
        from modules import shared

        ckpt_dir = getattr(getattr(shared, "cmd_opts", None), "ckpt_dir", None)
        return Path(ckpt_dir or self._sd_models().model_path)

    def projects_folder(self) -> Path:
        from modules import paths

        return Path(paths.models_path) / "mace"

    def refresh_checkpoints(self) -> None:
        self._sd_models().list_models()

    def load_checkpoint(self, path: Path) -> str:
        """Select ``path`` as the web UI's checkpoint: setting the option makes A1111 reload the
        weights (its onchange callback) and Forge load it for the next generation."""
        from modules import shared

        self.refresh_checkpoints()
        info = self._sd_models().get_closet_checkpoint_match(Path(path).name)
        if info is None:
            from mace_core.errors import MaceError

            raise MaceError(f"{Path(path).name} is not in the web UI's checkpoint list; press refresh and retry")
        shared.opts.set("sd_model_checkpoint", info.title)
        return (f"Selected **{info.title}** as the web UI's checkpoint (top-left dropdown; it may show the old "
                f"name until the page is reloaded).")

    def default_clip_skip(self) -> int:
        from modules import shared

        try:
            return max(1, int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1)))
        except (TypeError, ValueError):
            return 1

    # --- running a job ----------------------------------------------------------------------
    @contextlib.contextmanager
    def job(self, label: str) -> Iterator[None]:
        """The web UI's queue lock (no image generation meanwhile) and job state (its progress bar
        and its own Interrupt button, which we honour)."""
        from modules import shared

        try:
            from modules.call_queue import queue_lock
        except ImportError:  # pragma: no cover - very old or unusual forks
            queue_lock = contextlib.nullcontext()
        with super().job(label), queue_lock:
            shared.state.begin(job=label)
            shared.state.job_count = 1
            try:
                yield
            finally:
                shared.state.end()

    def progress(self, label: str, done: int, total: int) -> None:
        from modules import shared

        st = shared.state
        st.textinfo = f"MACE: {label} {done}/{total}"
        st.sampling_step, st.sampling_steps = done, max(total, 1)

    def interrupt(self) -> None:
        super().interrupt()
        from modules import shared

        shared.state.interrupt()

    def should_stop(self) -> bool:
        from modules import shared

        return super().should_stop() or bool(getattr(shared.state, "interrupted", False))

    def free_memory(self) -> None:
        super().free_memory()
        try:
            from modules import devices

            devices.torch_gc()
        except Exception:  # pragma: no cover - best effort
            pass
