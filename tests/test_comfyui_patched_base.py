"""An erasure project made in ComfyUI from a MODEL patched before the MACE nodes (a LoRA loaded with the
stock LoraLoader) is no file: its manifest records the patched weights' id (``base.weights_id``, also
as ``base.sha256``). `mace fuse` / `mace add` accept a ``--model`` file holding exactly those weights
(here the LoRA baked in by `mace apply`) and refuse any other file with a readable error."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

import comfyui_harness as h  # noqa: E402

RESTORE = "restore the listed concepts (erase all others)"
TRAIN = {"steps": 4, "rank": 0, "lr": 0.0, "images": 1, "sample_steps": 2, "guidance": 0.0, "mask": "type default",
         "training_seed": 7, "resolution": 64}


def _kohya_lora(base: dict[str, torch.Tensor], seed: int = 1, rank: int = 2) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA (``lora_unet_<ldm name>``: up [C, r], down [r, D], alpha) changing every attn2
    to_k / to_v of ``base`` (file keys -> tensors) by a random rank-``rank`` update."""
    from mace_core.export.share import kohya_name

    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in base.items():
        if k.startswith("model.diffusion_model.") and k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            name = kohya_name(k)
            out[f"{name}.lora_up.weight"] = 0.1 * torch.randn(w.shape[0], rank, generator=g)
            out[f"{name}.lora_down.weight"] = 0.1 * torch.randn(rank, w.shape[1], generator=g)
            out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def test_cli_fuses_a_project_made_from_a_lora_patched_model(comfyui, tmp_path, capsys):
    from safetensors.torch import save_file

    from mace_core.model.checkpoint import load_checkpoint
    from mace_core.cli.main import main
    from mace_core.method.erase import editable_weights
    from mace_core.method.project import Project, weights_id

    path = h.make_tiny_checkpoint(tmp_path / "tiny-lora-base.safetensors", "sd1", resolution=64)
    h.register_from_checkpoint(path)
    lora = tmp_path / "style-lora.safetensors"
    save_file(_kohya_lora(load_checkpoint(path).tensors), str(lora))
    loader = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfyui.add_model(path)}},
              "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                           "lora_name": comfyui.add_model(lora, folder="loras"),
                                                           "strength_model": 1.0, "strength_clip": 1.0}}}
    comfyui.run({**loader, "3": {"class_type": "MACELoadConcepts",
                                 "inputs": {"concepts": "cat\ndog", "default_type": "object", "preset": "none",
                                            "retain": "", "config_file": "", "project": "patched"}},
                 "4": {"class_type": "MACEEraseConcepts",
                       "inputs": {"model": ["2", 0], "clip": ["2", 1], "vae": ["1", 2], "concepts": ["3", 0], **TRAIN,
                                  "closed_form_only": False}}})
    project = comfyui.models_dir / "mace" / "patched"
    base = Project(project).manifest()["base"]
    assert base["sha256"] == base["weights_id"] and base["path"] == path.name  # no file: the weights' id

    baked = tmp_path / "baked.safetensors"
    assert main(["apply", str(lora), str(path), "--out", str(baked)]) == 0
    assert weights_id(editable_weights(load_checkpoint(baked).tensors)) == base["weights_id"]
    fused = tmp_path / "cat-only.safetensors"
    assert main(["fuse", str(project), "--except", "dog", "--model", str(baked), "--out", str(fused)]) == 0

    # the same as the Re-fuse node on the patched MODEL
    node = comfyui.run({**loader, "5": {"class_type": "MACERefuse",
                                        "inputs": {"model": ["2", 0], "project": "patched", "mode": RESTORE,
                                                   "concepts": "dog", "closed_form_only": False}}})["5"]
    model, names = node
    assert names == "cat"
    cli = load_checkpoint(fused)
    assert [c["phrase"] for c in json.loads(cli.metadata["mace.concepts"])] == ["cat"]
    assert cli.metadata["mace.base_sha256"] == base["weights_id"]
    edited = editable_weights(cli.tensors)
    assert len(edited) == 8
    for k, t in edited.items():
        torch.testing.assert_close(model.patches[k[len("model."):]][-1][1][1][0], t, rtol=1e-6, atol=1e-7)

    # `mace add` trains a new concept on the baked file and keeps the project's base identity
    added = tmp_path / "plus-bird.safetensors"
    assert main(["add", str(project), "--concept", "bird", "--model", str(baked), "--device", "cpu",
                 "--out", str(added)]) == 0
    assert [c["phrase"] for c in json.loads(load_checkpoint(added).metadata["mace.concepts"])] == ["cat", "dog", "bird"]
    assert Project(project).manifest()["base"]["sha256"] == base["weights_id"]

    # any other file is refused with a readable error: the unpatched checkpoint, and no --model at all
    capsys.readouterr()
    assert main(["fuse", str(project), "--except", "dog", "--model", str(path), "--out",
                 str(tmp_path / "wrong.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"{path.name} is not the model project 'patched' was made from" in err, err
    assert "patched before the MACE nodes (e.g. by a LoRA)" in err and "weights id" in err, err
    assert not (tmp_path / "wrong.safetensors").exists()
    assert main(["fuse", str(project), "--except", "dog", "--out", str(tmp_path / "wrong.safetensors")]) == 2
    assert "is not a file here" in capsys.readouterr().err


def test_an_fp16_model_with_a_lora_has_the_weights_id_of_its_saved_checkpoint(comfyui, tmp_path):
    """ComfyUI on a GPU holds the UNet in fp16 and patches a LoRA in as fp16(W + delta); the weights id
    a project records is that of those values, which its Save Checkpoint writes: the CLI accepts that
    file as the project's base."""
    import comfy.sd
    from safetensors.torch import load_file

    from mace_core.model.checkpoint import load_checkpoint, read_metadata
    from mace_core.method.erase import editable_weights
    from mace_core.method.project import weights_id
    from mace_nodes.backend import weights_id as model_weights_id

    path = h.make_tiny_checkpoint(tmp_path / "tiny-fp16-base.safetensors", "sd1", resolution=64)
    h.register_from_checkpoint(path)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), model_options={"dtype": torch.float16})
    assert model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight.dtype == torch.float16
    patched, patched_clip = comfy.sd.load_lora_for_models(model, clip, _kohya_lora(load_file(str(path))), 1.0, 1.0)
    saved = tmp_path / "saved-from-comfyui.safetensors"
    comfy.sd.save_checkpoint(str(saved), patched, patched_clip, vae, metadata={"mace.arch": read_metadata(path)["mace.arch"]})
    ours = weights_id(editable_weights(load_checkpoint(saved).tensors))
    assert ours == model_weights_id(patched) != model_weights_id(model)
