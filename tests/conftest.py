"""Shared pytest fixtures."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:  # `import comfyui_harness` also if tests/ becomes a package
    sys.path.insert(0, _TESTS)


def pytest_collection_modifyitems(items):
    """The real hosts first: each holds ~8 GB beside its CLI reference, and by the end of the suite this
    process holds GBs more (in-process ComfyUI keeps the full-size models it loaded): 24 GB was not enough."""
    items.sort(key=lambda item: item.path.name != "test_hosts.py")  # stable: file order otherwise


@pytest.fixture(scope="session", autouse=True)
def _own_mace_cache(tmp_path_factory):
    """The suite's own ``MACE_CACHE`` (the CLI's prior cache): shared with ``~/.cache/mace``, a test read
    priors left by other runs on the machine, concurrent suites and earlier sessions included."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MACE_CACHE", str(tmp_path_factory.mktemp("mace-cache")))  # children inherit it
        yield


# ---------------------------------------------------------------------------------------------
# A real ComfyUI (see tests/comfyui_harness.py)


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    """ComfyUI 0.3.75 running in this process on CPU, this repository installed as the custom
    node folder ``mace``; ``comfyui.run(graph)`` executes API-format prompt graphs."""
    import comfyui_harness

    try:
        return comfyui_harness.start_comfyui(tmp_path_factory.mktemp("comfyui"))
    except comfyui_harness.ComfyUIUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(autouse=True)
def _comfyui_outputs_removed(request):
    """What a test saved through the in-process ComfyUI (~340 MB per checkpoint) is gone after it: the
    session's outputs, kept to the end, helped fill CI's disk. No test reads another's output. Folders
    stay, emptied: ComfyUI lists output/checkpoints as a model folder and its file-list cache fails on a
    folder that vanished (the next test's Load Checkpoint was refused)."""
    yield
    if "comfyui" in request.fixturenames:
        out = request.getfixturevalue("comfyui").output_dir
        for p in out.iterdir() if out.is_dir() else ():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
                p.mkdir()
            else:
                p.unlink()


@dataclass
class TinySD1:
    """A tiny SD1-layout checkpoint in ComfyUI's checkpoints folder and the modules it holds."""

    path: Path
    name: str  # what CheckpointLoaderSimple's ckpt_name takes
    model_class: type  # the comfy.supported_models class registered for it
    text_encoder: Any  # transformers CLIPTextModel
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL


@pytest.fixture(scope="session")
def tiny_sd1(comfyui, tmp_path_factory) -> TinySD1:
    """Random tiny SD1 (UNet 32/64 channels, 2-layer 32-wide text encoder) with the VAE sizes
    ComfyUI's loader accepts unaided (SD's own VAE), written by
    ``mace_core.model.checkpoint.save_new_checkpoint`` and loadable with CheckpointLoaderSimple."""
    import comfyui_harness as h
    from mace_core.model.checkpoint import save_new_checkpoint

    te, unet, vae = h.make_tiny_sd1_modules(seed=0, vae="sd")
    path = Path(save_new_checkpoint(str(tmp_path_factory.mktemp("tiny_sd1") / "tiny-sd1.safetensors"),
                                    family="sd1", unet=unet, vae=vae, text_encoder=te))
    cls = h.register_from_checkpoint(path)
    name = comfyui.add_model(path)
    return TinySD1(path=path, name=name, model_class=cls, text_encoder=te, unet=unet, vae=vae)


@pytest.fixture(scope="session")
def tiny64(comfyui, tmp_path_factory):
    """A tiny SD1 whose family says 64 px images (so the CLI draws 64 px training images, like the nodes
    with resolution=64): an 8x8 latent keeps stage 2 to seconds on a CPU."""
    import comfyui_harness as h
    from mace_core.model.checkpoint import save_new_checkpoint
    from mace_core.model.families import load_family

    te, unet, vae = h.make_tiny_sd1_modules(seed=0, vae="sd")
    fam = dataclasses.replace(load_family("sd1"), resolution=64)
    path = Path(save_new_checkpoint(tmp_path_factory.mktemp("tiny64") / "tiny64-sd1.safetensors", family=fam,
                                    unet=unet, vae=vae, text_encoder=te))
    h.register_from_checkpoint(path)
    return SimpleNamespace(path=path, name=comfyui.add_model(path))
