"""MACE's ComfyUI nodes on tiny SD2 (epsilon), SD2-768-v (v-prediction) and SDXL models in a real
ComfyUI 0.3.75 (tests/comfyui_harness.py): the staged graph runs and erases what `mace erase` erases.

Each family's tiny checkpoint is written by ``mace_core.model.checkpoint.save_new_checkpoint`` and loaded by
ComfyUI's stock CheckpointLoaderSimple (the harness registers the tiny sizes with ComfyUI's own SD20 /
SDXL classes). The graph Load Checkpoint -> Load Concepts -> Refine -> Train LoRAs -> Fuse -> KSampler
+ Save Erased Checkpoint and the CLI on the same file, concept, settings and seed give cross-attention
weights (and SDXL's pooled projection ``label_emb.0.0.weight``) that agree within the host-vs-CLI
tolerances of tests/test_comfyui_nodes.py (ComfyUI's fp16 text encoder; the test prints its numbers).
Stage 2 is compared on its own too, since 4 training steps move the final weights little: the training
image drawn by the original model (prediction type, SDXL's pooled and size conditioning) and the LoRA.
Measured (CPU): weights <= 3.4e-4 of the weight and <= 1.0e-3 of the edit, training latents <= 1e-4,
LoRA factors <= 3.7e-3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import comfyui_harness as h  # noqa: E402
from test_comfyui_nodes import TOL_EDIT, TOL_WEIGHT  # noqa: E402 - one definition of the tolerances

FAST = {"steps": 4, "images": 1, "sample_steps": 2, "seed": 7}
RESOLUTION = 64  # an 8x8 latent: stage 2 in seconds on a CPU
ARCHITECTURE = {"sd2": "stable-diffusion-v2-512", "sd2-v": "stable-diffusion-v2-768-v",
                "sdxl": "stable-diffusion-xl-v1-base"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius)."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def _graph(ckpt: str, family: str) -> dict:
    train = {"steps": FAST["steps"], "rank": 0, "lr": 0.0, "images": FAST["images"],
             "sample_steps": FAST["sample_steps"], "guidance": 0.0, "mask": "type default",
             "training_seed": FAST["seed"], "resolution": RESOLUTION}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "MACELoadConcepts",
              "inputs": {"concepts": "cat", "default_type": "object", "preset": "none", "retain": "",
                         "config_file": "", "project": f"family-{family}"}},
        # no synonym search: on random weights every word's direction is alike (cosine 0.95-0.98 with "cat" on
        # the tiny SDXL), so which words pass is noise, and ComfyUI's fp16 text encoder draws other noise
        "3": {"class_type": "MACERefine", "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": ["2", 0],
                                                     "synonyms": "none"}},
        "4": {"class_type": "MACETrainLoRAs", "inputs": {"model": ["3", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                         **train}},
        "5": {"class_type": "MACEFuse", "inputs": {"model": ["1", 0], "loras": ["4", 0]}},
        "6": {"class_type": "MACESaveCheckpoint", "inputs": {"model": ["5", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                             "filename_prefix": f"checkpoints/mace-{family}"}},
        "10": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "12": {"class_type": "EmptyLatentImage", "inputs": {"width": RESOLUTION, "height": RESOLUTION,
                                                            "batch_size": 1}},
        "13": {"class_type": "KSampler",
               "inputs": {"model": ["5", 0], "positive": ["10", 0], "negative": ["11", 0], "latent_image": ["12", 0],
                          "seed": 5, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
                          "denoise": 1.0}},
    }


@pytest.mark.parametrize("family", ["sd2", "sd2-v", "sdxl"])
def test_staged_graph_erases_like_the_cli(comfyui, tmp_path, family):
    from mace_core.model.checkpoint import load_checkpoint
    from mace_core.cli.main import main
    from mace_core.model.diffusers_backend import POOLED_KEY
    from mace_core.method.erase import editable_weights
    from mace_core.method.project import Project
    from mace_nodes.backend import ComfyBackend

    path = h.make_tiny_checkpoint(tmp_path / f"tiny-{family}.safetensors", family, resolution=RESOLUTION)
    h.register_from_checkpoint(path)
    out = comfyui.run(_graph(comfyui.add_model(path), family))

    # what the backend reports of the loaded MODEL
    model, clip, vae = out["1"]
    be = ComfyBackend(model, clip, vae)
    assert be.family_name == family
    assert be.prediction_type == ("v_prediction" if family == "sd2-v" else "epsilon")
    assert torch.isfinite(out["13"][0]["samples"]).all()

    cli_out = tmp_path / "cli-erased.safetensors"
    assert main(["erase", str(path), "--concept", "cat", "--type", "object", "--steps", str(FAST["steps"]),
                 "--images", str(FAST["images"]), "--sample-steps", str(FAST["sample_steps"]),
                 "--seed", str(FAST["seed"]), "--device", "cpu", "--out", str(cli_out), "--synonyms", "none",
                 "--work-dir", str(tmp_path / "cli-project")]) == 0

    base = load_checkpoint(path)
    saved = Path(out["6"][0])
    ours = load_checkpoint(saved, family=base.family)  # ComfyUI's writer does not record the tiny sizes
    cli = load_checkpoint(cli_out)
    assert ours.metadata["modelspec.architecture"] == ARCHITECTURE[family]
    assert json.loads(ours.metadata["mace.settings"]) == json.loads(cli.metadata["mace.settings"])
    assert ours.metadata["mace.base_sha256"] == cli.metadata["mace.base_sha256"] == base.sha256

    keys = list(editable_weights(base.tensors))  # every attn2 to_k / to_v, and SDXL's pooled projection
    assert len(keys) == {"sd2": 8, "sd2-v": 8, "sdxl": 17}[family] and (family == "sdxl") == (POOLED_KEY in keys)
    worst_w = worst_e = 0.0
    for k in keys:
        w0, wc, wo = base.tensors[k].float(), cli.tensors[k].float(), ours.tensors[k].float()
        assert _rel(wc, w0) > 1e-4, f"{k} was not edited"
        worst_w, worst_e = max(worst_w, _rel(wo, wc)), max(worst_e, _rel(wo - w0, wc - w0))
    print(f"{family} host vs CLI: max ||dW||/||W|| = {worst_w:.2e}, max ||dW||/||W_cli - W0|| = {worst_e:.2e}")
    assert worst_w <= TOL_WEIGHT and worst_e <= TOL_EDIT, (worst_w, worst_e)

    # stage 2 on its own (its share of the final weights is small after 4 steps): the training image
    # drawn by the ORIGINAL model (the prediction type, SDXL's pooled and size conditioning) and the LoRA
    # trained on it (init zero: all of it is the training's edit)
    ours_p, cli_p = Project(comfyui.models_dir / "mace" / f"family-{family}"), Project(tmp_path / "cli-project")
    (concept,) = ours_p.spec().concepts
    drawn = _rel(ours_p.load_latents(concept), cli_p.load_latents(concept))
    a, b = ours_p.load_lora(concept), cli_p.load_lora(concept)
    assert a.up.keys() == b.up.keys() == {k for k in keys if k.endswith("to_k.weight")}
    lora = max(_rel(a.up[k], b.up[k]) for k in a.up)
    print(f"{family} host vs CLI: training latents {drawn:.2e}, LoRA up factors {lora:.2e} (relative)")
    assert drawn <= TOL_WEIGHT and lora <= TOL_EDIT, (drawn, lora)

    # the saved erased checkpoint loads back in ComfyUI as the same family and prediction type
    again = comfyui.run({"1": {"class_type": "CheckpointLoaderSimple",
                               "inputs": {"ckpt_name": comfyui.add_model(saved, name=f"reload-{family}.safetensors")}}})
    reloaded = again["1"][0]
    assert ComfyBackend(reloaded).family_name == family
