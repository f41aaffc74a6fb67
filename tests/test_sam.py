"""`--mask sam` for real: segment-anything 1.0 in its own venv, a vit_b SAM with random weights.

segment-anything needs torchvision, and PyPI's torchvision does not load beside the dev venv's CPU
torch 2.13.0, so these tests run in `.cache/sam-venv` (tests/venvs.py, from the '#sam' pins of
requirements-dev.txt: torch 2.14.1 + torchvision 0.29.1, the dev venv's other packages shared).
Its checkpoint is ``sam_model_registry["vit_b"]()`` under a fixed seed, saved as a state_dict.

- the venv: its own torch and torchvision, the dev venv's diffusers and mace_core;
- ``mace_core.method.sam.refine_masks`` on a synthetic non-square ConceptData: the prompt SAM gets (box and
  point in image pixels, x before y), the image it gets (uint8 HWC RGB, unchanged), the result (bool
  at latent size, SAM's best-scored mask area-downsampled), an empty attention mask keeping the whole
  image, and checkpoints that are not SAM state_dicts refused (weights_only: no pickled code runs);
- `mace erase --mask sam --sam-checkpoint` end to end on the tiny SD1 model, against the same run
  with `--mask attention`: the same training images, other masks, saved as lossless PNGs paired by
  name with the images at the images' size.

Random weights make SAM's masks arbitrary, so the checks are structural. SAM encodes each image at
1024 px (10-40 s per image on a shared 2-core CPU), so it sees two images in all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from tiny import tiny_file
from venvs import REPO, VenvUnavailable, cached_venv

CHECKPOINT_NAME = "sam_vit_b_test.pth"  # SAM's model type is read from the file name
ERASE = ["--concept", "cat", "--images", "1", "--sample-steps", "3", "--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def sam_python() -> Path:
    """The python of `.cache/sam-venv`, built on first use (about a minute: pip takes the 5.5 GB of
    torch + torchvision from this machine's disk)."""
    try:
        return cached_venv("sam", share_dev_site=True)
    except VenvUnavailable as e:
        if os.environ.get("CI"):  # CI has the registry: not being able to install is a failure there
            pytest.fail(str(e))
        pytest.skip(str(e))


def _run(python: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python *args`` in ``cwd``; a failure shows its output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # nothing here may fetch weights
    r = subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _run_json(python: Path, script: str, cwd: Path, *args: str) -> dict:
    """Run ``script`` in ``python``; its last stdout line is JSON."""
    path = cwd / "script.py"
    path.write_text(script)
    return json.loads(_run(python, [str(path), *args], cwd).stdout.strip().splitlines()[-1])


CHECKPOINT_SCRIPT = r"""
import sys, torch
from segment_anything import sam_model_registry
torch.manual_seed(0)
torch.save(sam_model_registry["vit_b"]().state_dict(), sys.argv[1])
"""


@pytest.fixture(scope="module")
def sam_checkpoint(sam_python, tmp_path_factory) -> Path:
    """A vit_b SAM with random weights (seed 0) as a plain state_dict, like SAM's released files."""
    folder = tmp_path_factory.mktemp("sam")
    path = folder / CHECKPOINT_NAME
    _run(sam_python, ["-c", CHECKPOINT_SCRIPT, str(path)], folder)
    return path


VENV_SCRIPT = r"""
import json, torch, torchvision, diffusers, mace_core, segment_anything
from torchvision.ops import nms  # torchvision's compiled ops load against this torch
keep = nms(torch.tensor([[0., 0., 2., 2.], [0., 0., 2., 2.1]]), torch.tensor([1., .5]), 0.5)
print(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__, "nms": keep.tolist(),
                  **{m.__name__ + "_file": m.__file__ for m in (torch, segment_anything, diffusers, mace_core)}}))
"""


def test_sam_venv_has_its_torch_and_the_dev_venvs_packages(sam_python, tmp_path):
    import diffusers
    import torch

    out = _run_json(sam_python, VENV_SCRIPT, tmp_path)
    assert out["torch"].startswith("2.14.1") and out["torchvision"].startswith("0.29.1")
    assert out["nms"] == [0]
    venv = sam_python.parent.parent
    assert Path(out["torch_file"]).is_relative_to(venv) and Path(out["segment_anything_file"]).is_relative_to(venv)
    assert out["diffusers_file"] == diffusers.__file__  # shared, not installed twice
    assert Path(out["mace_core_file"]) == REPO / "shared" / "mace_core" / "__init__.py"
    assert not Path(torch.__file__).is_relative_to(venv)  # and the dev venv keeps its own torch


# Calls refine_masks on a 48 x 64 image pair (vae_scale 8: latent 6 x 8) with SamPredictor's
# set_image / predict wrapped to record what they get and give; prints JSON.
REFINE_SCRIPT = r"""
import json, sys
import numpy as np, torch
import torch.nn.functional as F
from segment_anything import SamPredictor
from mace_core.errors import MaceError
from mace_core.method.masks import ConceptData
from mace_core.method.sam import refine_masks

checkpoint, folder = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
images = rng.integers(0, 256, size=(2, 48, 64, 3), dtype=np.uint8)
masks = torch.zeros(2, 6, 8, dtype=torch.bool)
masks[0, 1:3, 2:6] = True  # rows 1-2, columns 2-5: box (16, 8)-(48, 24) px, centroid (32, 16) px
seen = {"set_image": [], "predict": []}
set_image, predict = SamPredictor.set_image, SamPredictor.predict

def recording_set_image(self, image, image_format="RGB"):
    seen["set_image"].append({"shape": list(image.shape), "dtype": str(image.dtype), "format": image_format,
                              "is_image_0": bool(np.array_equal(image, images[0])),
                              "device": str(self.model.device), "dtype_model": str(self.model.pixel_mean.dtype)})
    return set_image(self, image, image_format)

def recording_predict(self, **kw):
    got = predict(self, **kw)
    best = torch.from_numpy(got[0][int(np.argmax(got[1]))]).float()[None, None]
    seen["predict"].append({**{k: np.asarray(v).tolist() for k, v in kw.items()},
                            "mask_shapes": list(got[0].shape),
                            "expected": (F.interpolate(best, size=(6, 8), mode="area")[0, 0] >= 0.5).tolist()})
    return got

SamPredictor.set_image, SamPredictor.predict = recording_set_image, recording_predict
out = refine_masks(ConceptData(torch.zeros(2, 4, 6, 8), masks, images), checkpoint, 8, "cpu")

class RunsCode:  # what a booby-trapped checkpoint holds: unpickling it calls exec
    def __reduce__(self):
        return exec, (f"open({folder!r} + '/code-ran', 'w')",)

refused = {}
for name, obj in {"sam_vit_b_other.pth": {"weight": torch.zeros(1)}, "sam_vit_b_code.pth": {"x": RunsCode()}}.items():
    torch.save(obj, f"{folder}/{name}")
    try:
        refine_masks(ConceptData(torch.zeros(2, 4, 6, 8), masks, images), f"{folder}/{name}", 8, "cpu")
    except MaceError as e:
        refused[name] = str(e)
print(json.dumps({"shape": list(out.shape), "dtype": str(out.dtype), "masks": out.tolist(), "refused": refused,
                  **seen}))
"""


def test_refine_masks_prompts_sam_in_image_pixels(sam_python, sam_checkpoint, tmp_path):
    out = _run_json(sam_python, REFINE_SCRIPT, tmp_path, str(sam_checkpoint), str(tmp_path))
    assert out["shape"] == [2, 6, 8] and out["dtype"] == "torch.bool"
    # image 0 went to SAM as it is (uint8 HWC RGB) on the device asked for, in float32
    assert out["set_image"] == [{"shape": [48, 64, 3], "dtype": "uint8", "format": "RGB", "is_image_0": True,
                                 "device": "cpu", "dtype_model": "torch.float32"}]
    call, = out["predict"]  # image 1's attention mask is empty: SAM is not asked
    assert call["box"] == [16, 8, 48, 24]  # x0, y0, x1, y1 in image pixels
    assert call["point_coords"] == [[32.0, 16.0]] and call["point_labels"] == [1]
    assert call["multimask_output"] is True and call["mask_shapes"] == [3, 48, 64]
    assert out["masks"][0] == call["expected"]  # SAM's best-scored mask at latent size
    assert out["masks"][1] == [[True] * 8] * 6  # empty attention mask: the whole image
    assert "sam_vit_b_other.pth is not a SAM vit_b checkpoint" in out["refused"]["sam_vit_b_other.pth"]
    assert "sam_vit_b_code.pth is not a SAM vit_b checkpoint" in out["refused"]["sam_vit_b_code.pth"]
    assert not (tmp_path / "code-ran").exists()  # weights_only: its code never ran


def _training_data(work: Path) -> tuple[dict[str, np.ndarray], dict[str, Image.Image], int]:
    """The one concept's saved images (arrays) and masks (PIL, to check their format) by file name,
    and its pixels per latent pixel."""
    folder, = (work / "concepts").iterdir()
    images = {p.name: np.asarray(Image.open(p)) for p in sorted((folder / "images").iterdir())}
    masks = {p.name: Image.open(p) for p in sorted((folder / "masks").iterdir())}
    latents = load_file(str(folder / "latents.safetensors"))
    side, = {t.shape[-1] for t in latents.values()}
    return images, masks, next(iter(images.values())).shape[1] // side


def test_erase_with_sam_masks_end_to_end(sam_python, sam_checkpoint, tmp_path):
    model = Path(shutil.copy(tiny_file("sd1"), tmp_path / "tiny-sd1.safetensors"))
    runs = {}
    for mode, extra in (("sam", ["--sam-checkpoint", str(sam_checkpoint)]), ("attention", [])):
        out = tmp_path / f"{mode}.safetensors"
        # the CLI, in the same venv both times: the same torch draws the same training images
        _run(sam_python, ["-m", "mace_core", "erase", str(model), "--out", str(out), "--mask", mode, *extra, *ERASE],
             tmp_path)
        assert out.is_file()
        runs[mode] = _training_data(tmp_path / f"{mode}.safetensors.mace")
    (images, masks, scale), (att_images, att_masks, att_scale) = runs["sam"], runs["attention"]
    assert list(images) == list(masks) == ["0000.png"]  # paired by name
    assert list(att_images) == list(images) and scale == att_scale > 1
    assert all(np.array_equal(images[k], att_images[k]) for k in images)  # the same images ...
    sam = {k: np.asarray(m) for k, m in masks.items()}
    att = {k: np.asarray(m) for k, m in att_masks.items()}
    assert any(not np.array_equal(sam[k], att[k]) for k in sam)  # ... with SAM's masks instead
    for k, m in masks.items():
        a = sam[k]
        assert m.format == "PNG" and m.mode == "L" and a.shape == images[k].shape[:2]
        assert set(np.unique(a)) <= {0, 255}
        # a latent-size mask upsampled (nearest): constant on each latent pixel's block
        assert np.array_equal(a, np.kron(a[::scale, ::scale], np.ones((scale, scale), a.dtype)))


def test_comfyui_nodes_take_a_sam_checkpoint_from_models_sams(sam_python, sam_checkpoint, tmp_path):
    """The mask choice 'sam: <file>' of the training nodes, in a real ComfyUI (a fresh process in the
    sam venv, whose real torchvision ComfyUI then imports): the same images as the attention masks' run
    of the same graph, SAM's masks, and the checkpoint found in models/sams recorded in the project."""
    import dataclasses

    import comfyui_harness as h
    from mace_core.model.checkpoint import save_new_checkpoint
    from mace_core.model.families import load_family

    te, unet, vae = h.make_tiny_sd1_modules(seed=0, vae="sd")
    model = Path(save_new_checkpoint(tmp_path / "tiny64-sd1.safetensors", unet=unet, vae=vae, text_encoder=te,
                                     family=dataclasses.replace(load_family("sd1"), resolution=64)))
    base = tmp_path / "comfyui"
    (base / "models" / "sams").mkdir(parents=True)
    shutil.copy(sam_checkpoint, base / "models" / "sams" / CHECKPOINT_NAME)

    def erase(concepts: str, mask: str) -> dict:
        return {"class_type": "MACEEraseConcepts",
                "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "concepts": [concepts, 0],
                           "steps": 2, "rank": 0, "lr": 0.0, "images": 1, "sample_steps": 3, "guidance": 0.0,
                           "mask": mask, "training_seed": 7, "resolution": 64, "closed_form_only": False}}

    def concepts(project: str) -> dict:
        return {"class_type": "MACELoadConcepts",
                "inputs": {"concepts": "cat", "default_type": "object", "preset": "none", "retain": "",
                           "config_file": "", "project": project}}

    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": model.name}},
             "2": concepts("with-sam"), "3": erase("2", f"sam: {CHECKPOINT_NAME}"),
             "4": concepts("with-attention"), "5": erase("4", "attention")}
    cmd = h.run_in_fresh_process(base, model, graph, tmp_path / "out.safetensors", python=sam_python)
    _run(Path(cmd[0]), cmd[1:], tmp_path)

    projects = base / "models" / "mace"
    overrides = json.loads((projects / "with-sam" / "manifest.json").read_text())["overrides"]
    assert overrides["mask"] == "sam" and Path(overrides["sam_checkpoint"]) == base / "models" / "sams" / CHECKPOINT_NAME
    (images, masks, _), (att_images, att_masks, _) = (_training_data(projects / p) for p in ("with-sam",
                                                                                             "with-attention"))
    assert list(images) == list(att_images) and all(np.array_equal(images[k], att_images[k]) for k in images)
    assert any(not np.array_equal(np.asarray(masks[k]), np.asarray(att_masks[k])) for k in masks)
