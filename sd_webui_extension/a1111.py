"""`Host` for AUTOMATIC1111 (1.10) and Forge. Imports the web UI's ``modules`` only inside methods,
so this file imports (and is unit-tested) without a web UI.

Model (`A1111Host.base_model`): when the checkpoint picked in the tab is the one A1111 has loaded,
the erasure runs on A1111's own weights: ``sd_model.state_dict()`` is the file's ldm layout once
the names of A1111's hijack wrappers are removed, and the core turns it into the same checkpoint
its file loader would (`mace_core.model.checkpoint.checkpoint_from_state_dict`), sharing the tensors.
A VAE selected in the web UI is then the one the run decodes with (previews, SAM masks); the output
is written from the file (`mace_core.model.checkpoint.save_edited`), so it keeps the file's own. Otherwise
the core reads the file and the web UI's model goes to the CPU for the job (A1111's own *Unload SD
checkpoint to RAM* / *Load SD checkpoint to VRAM* pair), back on the GPU afterwards.

Forge is always served from the file. What it holds, from its source: ``forge_objects.unet.model.
diffusion_model`` has the ldm UNet names (its ``save_checkpoint`` prefixes them with
``model.diffusion_model.``), ``forge_objects.vae.first_stage_model`` the ldm VAE names, and
``forge_objects.clip.cond_stage_model`` transformers CLIP models as ``clip_l.transformer.
text_model.*`` / ``clip_g.*`` (OpenCLIP converted by ``huggingface_guess``). But Forge builds its
models inside ``torch.inference_mode`` (``forge_model_reload``), so training cannot backpropagate
through them without a full copy, and it may hold the UNet quantized (fp8, nf4, gguf) or with
LoRA patches merged in place. So the tab reads the file, and unloads Forge's models from the GPU
(``sd_models.unload_model_weights``: ``memory_management.unload_all_models``) for the job; Forge
loads them back itself for its next generation.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .host import Host

if TYPE_CHECKING:
    from mace_core.model.checkpoint import Checkpoint

log = logging.getLogger("mace.webui")


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
        """The loaded model's title; while none is loaded yet (the web UI loads it in the background,
        after building the tabs) the option's, else the file the web UI will load first. Never reads
        ``shared.sd_model``: that loads a model, blocking the UI build (and raising when there is none)."""
        from modules import shared

        sd_models = self._sd_models()
        titles = self.list_checkpoints()
        loaded = getattr(self._loaded_model(), "sd_checkpoint_info", None)
        for title in (getattr(loaded, "title", None), getattr(getattr(shared, "opts", None), "sd_model_checkpoint", None)):
            if title in titles:
                return title
            info = sd_models.get_closet_checkpoint_match(title) if title else None
            if info is not None and info.title in titles:
                return info.title
        try:
            first = sd_models.select_checkpoint()  # picks a file, loads nothing
        except (FileNotFoundError, AttributeError):  # no checkpoint at all / a fork without it
            return None
        return first.title if first is not None and first.title in titles else None

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
        """Select ``path`` as the web UI's checkpoint. A1111: setting the option reloads the weights
        (its onchange callback). Forge loads a model only through its own ``checkpoint_change`` (the
        option plus ``refresh_model_loading_parameters``, read by its next generation); setting the
        option alone renames the model without loading it, and then its own dropdown takes the new
        name for the current one and refuses to switch."""
        from modules import shared

        self.refresh_checkpoints()
        info = self._sd_models().get_closet_checkpoint_match(Path(path).name)
        if info is None:
            from mace_core.errors import MaceError

            raise MaceError(f"{Path(path).name} is not in the web UI's checkpoint list; press refresh and retry")
        forge = _forge_entry()
        if forge is not None:
            forge.checkpoint_change(info.title)
        else:
            shared.opts.set("sd_model_checkpoint", info.title)
        return (f"Selected **{info.title}** as the web UI's checkpoint (top-left dropdown; it may show the old "
                f"name until the page is reloaded).")

    # --- the model to erase from -------------------------------------------------------------
    def _loaded_model(self):
        """The web UI's current model, or None. Read from ``sd_models.model_data`` because
        ``shared.sd_model`` loads a model when none is loaded yet."""
        return self._sd_models().model_data.sd_model

    @contextlib.contextmanager
    def base_model(self, path: Path) -> Iterator[Checkpoint]:
        """The web UI's loaded weights when they are ``path``'s and usable as they are; otherwise the
        file, read by the core, with the web UI's model off the GPU until the block ends."""
        from mace_core.model.checkpoint import load_checkpoint

        ck = self._in_memory(path)
        if ck is not None:
            yield ck
            return
        with self._own_model_offloaded():
            yield load_checkpoint(path, sha256=self._known_sha256(path))

    def _in_memory(self, path: Path) -> Checkpoint | None:
        """``path`` as a core checkpoint of the web UI's loaded tensors (shared, not copied), or None
        (logged why) when the web UI holds another model or weights that are not the file's."""
        from mace_core.model.checkpoint import checkpoint_from_state_dict, read_metadata
        from mace_core.errors import MaceError

        m = self._loaded_model()
        info = getattr(m, "sd_checkpoint_info", None)
        if info is None or not _same_file(info.filename, path):
            return None
        why = _unusable_weights(m)
        if why is None:
            sd = {_unhijacked(k): v for k, v in m.state_dict().items()}
            pred = "v_prediction" if getattr(m, "parameterization", "eps") == "v" else None
            try:
                ck = checkpoint_from_state_dict(sd, path, read_metadata(path), prediction_type=pred,
                                                sha256=getattr(info, "sha256", None))
                log.info("MACE: erasing from the web UI's loaded copy of %s (not read from disk)", Path(path).name)
                return ck
            except MaceError as e:
                why = f"its layout is not one mace converts ({e})"
        log.info("MACE: reading %s from disk, not using the web UI's loaded copy: %s", Path(path).name, why)
        return None

    def _known_sha256(self, path: Path) -> str | None:
        """The file's sha256 as the web UI cached it (None when it has not hashed the file)."""
        for info in self._sd_models().checkpoints_list.values():
            if _same_file(info.filename, path):
                return getattr(info, "sha256", None)
        return None

    @contextlib.contextmanager
    def _own_model_offloaded(self) -> Iterator[None]:
        """The web UI's model off the GPU while the tab's copy is there, back afterwards, also when
        the job fails: A1111 moves it to the CPU (``unload_model_weights``) and back
        (``send_model_to_device``); Forge unloads all its models, and its ``send_model_to_device``
        is a no-op because it loads them back itself before the next generation."""
        sd_models = self._sd_models()
        m = self._loaded_model()
        if m is None:
            yield
            return
        log.info("MACE: moving the web UI's model to the CPU while mace has its own copy on the GPU")
        sd_models.unload_model_weights(m)
        try:
            yield
        finally:
            self.free_memory()  # the tab's copy released before the web UI's model comes back
            sd_models.send_model_to_device(m)

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


def _forge_entry():
    """Forge's ``modules_forge.main_entry`` (its model-selection path), or None under A1111."""
    try:
        from modules_forge import main_entry
    except ImportError:
        return None
    return main_entry


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return False


def _unhijacked(key: str) -> str:
    """A1111's name of a tensor as the file names it: its hijack wraps the text encoder and its token
    embedding in modules that hold the original as ``.wrapped`` (``cond_stage_model.wrapped.
    transformer...``, ``token_embedding.wrapped.weight``)."""
    return key.replace(".wrapped.", ".")


def _unusable_weights(model) -> str | None:
    """Why the web UI's loaded weights are not the file's as a trainable model, or None."""
    from mace_core.model.diffusers_backend import HOST_DTYPES

    if hasattr(model, "forge_objects"):
        return ("Forge builds its models under torch.inference_mode, which training cannot backpropagate "
                "through without a full copy, and may hold them quantized or with LoRA patches merged in")
    if any(getattr(mod, "network_current_names", ()) for mod in model.modules()):
        return "a LoRA of the last generation is still merged into its weights"
    odd = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.dtype not in HOST_DTYPES})
    return f"it stores weights as {', '.join(odd)} (the FP8 weight setting)" if odd else None
