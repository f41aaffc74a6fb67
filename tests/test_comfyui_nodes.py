"""MACE's ComfyUI nodes (mace_nodes/) inside a real ComfyUI 0.3.75 (tests/comfyui_harness.py) on a tiny SD1.

Host vs CLI tolerance. The same model, concepts, settings and seed erased by the node graph and by
`mace erase` (in-process, same file) give cross-attention weights that agree to

    ||W_comfy - W_cli||_F <= TOL_WEIGHT * ||W_cli||_F   and   <= TOL_EDIT * ||W_cli - W_0||_F

for every edited to_k / to_v tensor. The difference comes from ComfyUI holding the CLIP text encoder in
fp16 (also on CPU): its embeddings differ from the CLI's fp32 ones by ~1e-3 relative, which moves the
stage-1 statistics, the drawn training images and the LoRAs a little. Measured here (2 concepts,
1-2 images, 4 steps, CPU): <= 9.1e-4 of the weight and <= 2.3e-3 of the edit (the test prints its
numbers); the bounds leave ~5x headroom.
Every other UNet and VAE tensor the host writes is bit-identical to the input; the text encoder comes
back as ComfyUI holds it (fp16-rounded).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

import comfyui_harness as h  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOL_WEIGHT = 5e-3
TOL_EDIT = 1e-2
FAST = {"steps": 4, "images": 1, "sample_steps": 2, "seed": 7}
OURS = ("MACELoadConcepts", "MACERefine", "MACETrainLoRAs", "MACEFuse", "MACEEraseConcepts", "MACERefuse",
        "MACESaveCheckpoint")


def _is_kv(key: str) -> bool:
    return key.startswith("model.diffusion_model.") and key.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))


def _concepts(text: str, project: str, default_type: str = "object", retain: str = "", **kw) -> dict:
    return {"class_type": "MACELoadConcepts",
            "inputs": {"concepts": text, "default_type": default_type, "preset": "none", "retain": retain,
                       "config_file": "", "project": project, **kw}}


def _train(model, steps=FAST["steps"], **kw) -> dict:
    return {"class_type": "MACETrainLoRAs",
            "inputs": {"model": model, "clip": ["1", 1], "vae": ["1", 2], "steps": steps, "rank": 0, "lr": 0.0,
                       "images": FAST["images"], "sample_steps": FAST["sample_steps"], "guidance": 0.0,
                       "mask": "type default", "training_seed": FAST["seed"], "resolution": 64, **kw}}


def _sampler(model, latent) -> dict:
    return {"class_type": "KSampler",
            "inputs": {"model": model, "positive": ["10", 0], "negative": ["11", 0], "latent_image": latent,
                       "seed": 5, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
                       "denoise": 1.0}}


def _prompt_nodes(text="a photo of a cat") -> dict:
    return {"10": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
            "11": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
            "12": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}


def _reference_graph(name: str) -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}, **_prompt_nodes(),
            "13": _sampler(["1", 0], ["12", 0])}


def _executed(out) -> list[str]:
    return [d.get("node") for e, d in out.messages if e == "executing" and d.get("node") is not None]


@pytest.fixture(scope="module")
def run(comfyui, tiny64, tmp_path_factory):
    """One graph (Load Checkpoint -> Load Concepts -> Refine -> Train LoRAs -> Fuse -> KSampler + both
    savers, with the original MODEL sampled before and after) and the CLI on the same file."""
    from mace_core.cli.main import main

    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny64.name}},
        "2": _concepts("cat\n# dog is mapped to a horse\ndog | a horse", "e2e", retain="house"),
        "3": {"class_type": "MACERefine", "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": ["2", 0]}},
        "4": _train(["3", 0]),
        "5": {"class_type": "MACEFuse", "inputs": {"model": ["1", 0], "loras": ["4", 0]}},
        "6": {"class_type": "MACESaveCheckpoint", "inputs": {"model": ["5", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                             "filename_prefix": "checkpoints/mace-e2e"}},
        "7": {"class_type": "CheckpointSave", "inputs": {"model": ["5", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                         "filename_prefix": "checkpoints/builtin-e2e"}},
        **_prompt_nodes(),
        "13": _sampler(["1", 0], ["12", 0]),  # the original MODEL, before
        "14": _sampler(["5", 0], ["12", 0]),  # the erased MODEL
        "15": {"class_type": "LatentMultiply", "inputs": {"samples": ["14", 0], "multiplier": 0.0}},
        "16": _sampler(["1", 0], ["15", 0]),  # the original MODEL again, forced after the erased one
        # an output node right after "before": ComfyUI then runs that sampler first (outputs-first order)
        "17": {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": "latents/before"}},
        "19": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
    }
    reference = comfyui.run(_reference_graph(tiny64.name))["13"][0]["samples"]
    out = comfyui.run(graph, extra_data={"client_id": "mace-tests"})  # a client id: "executing" events are sent
    work = tmp_path_factory.mktemp("cli")
    cli_out = work / "cli-erased.safetensors"
    rc = main(["erase", str(tiny64.path), "--concept", "cat", "--concept", "dog | a horse", "--retain", "house",
               "--type", "object", "--steps", str(FAST["steps"]), "--images", str(FAST["images"]),
               "--sample-steps", str(FAST["sample_steps"]), "--seed", str(FAST["seed"]), "--device", "cpu",
               "--out", str(cli_out), "--work-dir", str(work / "project")])
    assert rc == 0
    return SimpleNamespace(graph=graph, out=out, reference=reference, cli_out=cli_out, cli_work=work / "project")


def _builtin_file(comfyui, prefix: str) -> Path:
    files = sorted((comfyui.output_dir / "checkpoints").glob(f"{prefix}_*.safetensors"))
    assert files, f"no {prefix}_*.safetensors written"
    return files[-1]


# ---------------------------------------------------------------------------------------------


def test_nodes_are_registered_under_their_own_names(comfyui):
    import nodes as comfy_nodes
    from comfy_api.latest import io

    for name in OURS:
        cls = comfyui.node_classes[name]
        assert "mace_nodes" in cls.__module__ and cls.CATEGORY == "MACE", name
        assert cls.DESCRIPTION and name in comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS
        # ComfyUI's V3 schema, registered through the pack's comfy_entrypoint under the saved workflows' ids
        assert issubclass(cls, io.ComfyNode) and cls.GET_SCHEMA().node_id == name, name
    assert not hasattr(importlib.import_module(comfyui.node_classes["MACEFuse"].__module__.rsplit(".", 1)[0]),
                       "NODE_CLASS_MAPPINGS")  # a V1 mapping would make ComfyUI skip the V3 entry point
    # ComfyUI's own save nodes are untouched by ours
    for builtin in ("CheckpointSave", "SaveImage", "LoraLoader", "LoraLoaderModelOnly"):
        assert "mace_nodes" not in comfyui.node_classes[builtin].__module__
    assert comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS["MACESaveCheckpoint"] == "Save Erased Checkpoint (MACE)"
    # the repository root only re-exports; nothing of gradio / A1111 on ComfyUI's import path
    src = (REPO / "__init__.py").read_text() + "".join(p.read_text() for p in (REPO / "mace_nodes").glob("*.py"))
    assert not re.search(r"^\s*(import|from)\s+(gradio|modules|launch|scripts)\b", src, re.M)


# The widgets saved workflows store values for, in their order (example_workflows/ and users' graphs):
# a new widget may only come after these.
SAVED_WIDGETS = {
    "MACELoadConcepts": ["concepts", "default_type", "preset", "retain", "config_file", "project"],
    "MACERefine": ["lam", "prior", "domain"],
    "MACETrainLoRAs": ["steps", "rank", "lr", "images", "sample_steps", "guidance", "mask", "training_seed",
                       "resolution", "preview"],
    "MACEEraseConcepts": ["steps", "rank", "lr", "images", "sample_steps", "guidance", "mask", "training_seed",
                          "resolution", "closed_form_only", "preview"],
    "MACERefuse": ["project", "mode", "concepts", "closed_form_only"],
    "MACESaveCheckpoint": ["filename_prefix"],
}
SOCKETS = ("MODEL", "CLIP", "VAE", "MACE_CONCEPTS", "MACE_LORAS")


def test_widgets_keep_the_order_saved_workflows_store_them_in(comfyui):
    for name, saved in SAVED_WIDGETS.items():
        spec = comfyui.node_classes[name].INPUT_TYPES()
        widgets = [k for section in ("required", "optional") for k, cfg in spec.get(section, {}).items()
                   if cfg[0] not in SOCKETS]
        assert widgets[:len(saved)] == saved, name


def test_every_input_of_every_node_has_a_tooltip(comfyui):
    for name in OURS:
        spec = comfyui.node_classes[name].INPUT_TYPES()
        for section in ("required", "optional"):
            for key, cfg in spec.get(section, {}).items():
                assert len(cfg) > 1 and cfg[1].get("tooltip"), f"{name}.{key}"


def test_graph_erases_and_matches_the_cli(comfyui, tiny64, run):
    from mace_core.model.checkpoint import load_checkpoint

    saved = Path(run.out["6"][0])
    assert saved.parent == comfyui.output_dir / "checkpoints" and saved.name.startswith("mace-e2e_")
    assert list(run.out.ui["6"]["text"]) == [str(saved)]
    base = load_checkpoint(tiny64.path)
    # ComfyUI's writer does not record the tiny test architecture (a real SD1 file needs no hint)
    ours = load_checkpoint(saved, family=base.family)
    cli = load_checkpoint(run.cli_out)

    meta = ours.metadata
    assert [c["phrase"] for c in json.loads(meta["mace.concepts"])] == ["cat", "dog"]
    assert json.loads(meta["mace.concepts"])[1]["anchor"] == "a horse"
    assert json.loads(meta["mace.retain"]) == ["house"]
    assert meta["mace.stages"] == "refine+lora+fuse" and meta["mace.host"] == "ComfyUI"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.description"] == "concepts erased with mace: cat, dog"
    assert meta["modelspec.hash_sha256"].startswith("0x") and set(meta["modelspec.hash_sha256"][2:]) != {"0"}
    assert meta["mace.base_sha256"] == cli.metadata["mace.base_sha256"] == base.sha256  # straight from the file
    assert json.loads(meta["mace.settings"]) == json.loads(cli.metadata["mace.settings"])

    kv = [k for k in base.tensors if _is_kv(k)]
    assert len(kv) == 8
    worst_w = worst_e = 0.0
    for k in kv:
        w0, wc, wo = base.tensors[k].float(), cli.tensors[k].float(), ours.tensors[k].float()
        edit = (wc - w0).norm()
        assert edit > 1e-3 * w0.norm(), f"{k} was not edited"
        diff = (wo - wc).norm()
        worst_w, worst_e = max(worst_w, float(diff / wc.norm())), max(worst_e, float(diff / edit))
    print(f"host vs CLI: max ||dW||/||W|| = {worst_w:.2e}, max ||dW||/||W_cli - W0|| = {worst_e:.2e}")
    assert worst_w <= TOL_WEIGHT and worst_e <= TOL_EDIT, (worst_w, worst_e)

    for k, t in base.tensors.items():
        if _is_kv(k):
            continue
        if k.startswith(("model.diffusion_model.", "first_stage_model.")):
            assert torch.equal(ours.tensors[k], t), k
        elif t.is_floating_point():
            torch.testing.assert_close(ours.tensors[k].float(), t.half().float(), rtol=0, atol=0)

    # ComfyUI's built-in CheckpointSave writes the same erased weights
    builtin = load_checkpoint(_builtin_file(comfyui, "builtin-e2e"), family=base.family)
    for k in kv:
        assert torch.equal(builtin.tensors[k], ours.tensors[k]), k


def test_an_fp16_checkpoint_is_saved_in_fp16(comfyui, tmp_path):
    """ComfyUI computes in fp32 on a CPU and its writer saves what it holds: an fp16 file came back fp32,
    twice the size. Save Erased Checkpoint writes the input file's dtypes: every tensor but the erased
    ones bit-identical to the input, the erased ones ComfyUI's weights rounded to fp16."""
    from safetensors import safe_open

    from mace_core.model.checkpoint import load_checkpoint, save_new_checkpoint
    from mace_core.model.families import load_family

    te, unet, vae = h.make_tiny_sd1_modules(seed=1, vae="sd")
    fam = dataclasses.replace(load_family("sd1"), resolution=64)
    path = Path(save_new_checkpoint(tmp_path / "tiny64-fp16.safetensors", family=fam, unet=unet, vae=vae,
                                    text_encoder=te, dtype=torch.float16))
    h.register_from_checkpoint(path)
    out = comfyui.run({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfyui.add_model(path)}},
        "2": _concepts("cat", "fp16"),
        "3": {"class_type": "MACEEraseConcepts",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "concepts": ["2", 0],
                         **{k: v for k, v in _train(None)["inputs"].items() if k not in ("model", "clip", "vae")},
                         "closed_form_only": True}},
        "4": {"class_type": "MACESaveCheckpoint", "inputs": {"model": ["3", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                             "filename_prefix": "checkpoints/mace-fp16"}}})
    saved = Path(out["4"][0])
    unet_dtype = out["1"][0].model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight.dtype
    assert unet_dtype == torch.float32  # what ComfyUI holds on a CPU (and wrote before)
    with safe_open(str(saved), "pt") as f:
        kinds = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert kinds <= {"F16", "I64"}, kinds  # ComfyUI adds integer position ids
    assert saved.stat().st_size < 1.1 * path.stat().st_size
    assert not [p for p in saved.parent.iterdir() if p.name.endswith(".tmp")]  # ComfyUI's own file is gone
    base, ours = load_checkpoint(path), load_checkpoint(saved, family=load_checkpoint(path).family)
    erased = out["3"][0]
    kv = [k for k in base.tensors if _is_kv(k)]
    assert len(kv) == 8
    for k, t in base.tensors.items():
        if _is_kv(k):
            w = erased.patches[k[len("model."):]][-1][1][1][0]
            assert torch.equal(ours.tensors[k], w.half()) and not torch.equal(ours.tensors[k], t), k
        else:
            assert torch.equal(ours.tensors[k], t), k


def test_the_general_prior_is_kept_in_models_mace_prior(comfyui, tiny64, monkeypatch, tmp_path):
    """A type that uses the general prior keeps it in ComfyUI's models/mace/prior, not the CLI's cache."""
    monkeypatch.setenv("MACE_CACHE", str(tmp_path / "cli-cache"))
    comfyui.run({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny64.name}},
        "2": _concepts("Tom Cruise", "prior-place", default_type="celebrity"),
        "3": {"class_type": "MACEEraseConcepts",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "concepts": ["2", 0],
                         **{k: v for k, v in _train(None)["inputs"].items() if k not in ("model", "clip", "vae")},
                         "closed_form_only": True}},
        "4": {"class_type": "MACESaveCheckpoint", "inputs": {"model": ["3", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                             "filename_prefix": "checkpoints/mace-prior"}}})
    assert list((comfyui.models_dir / "mace" / "prior").glob("*.safetensors"))
    assert not (tmp_path / "cli-cache").exists()


def test_original_model_samples_bit_identically_around_the_erasure(run):
    before, erased, after = (run.out[n][0]["samples"] for n in ("13", "14", "16"))
    assert torch.equal(before, run.reference) and torch.equal(after, run.reference)
    assert not torch.equal(erased, run.reference)
    order = _executed(run.out)
    assert order.index("16") > order.index("14") > order.index("5")  # "after" really ran after the erasure
    assert order.index("13") < order.index("3"), order  # and "before" before it (ComfyUI's output-first order)
    # the loader's MODEL carries no MACE patches; Refine / Fuse outputs are clones that do
    model = run.out["1"][0]
    assert not model.patches and "mace" not in model.model_options
    assert run.out["5"][0].model is model.model and run.out["5"][0].model_options["mace"]["stage"] == "erased"


def test_training_preview_and_the_project_folder(comfyui, run):
    from mace_core.method.project import Project

    images = run.out["4"][1]
    assert images.shape == (2, 64, 128, 3) and images.dtype == torch.float32  # 1 image + mask per concept
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    loras = run.out["4"][0]
    assert loras.phrases == ["cat", "dog"] and not loras.report["reused_loras"]
    proj = Project(comfyui.models_dir / "mace" / "e2e")
    assert Path(loras.project) == proj.root and proj.exists()
    assert all(proj.load_lora(c) is not None for c in proj.spec().concepts)
    m = proj.manifest()
    assert m["base"]["path"] == "tiny64-sd1.safetensors" and m["base"]["weights_id"] == loras.base_id
    # Load Concepts lists it in the Re-fuse node's project dropdown
    kind, opts = comfyui.node_classes["MACERefuse"].INPUT_TYPES()["required"]["project"]
    assert kind == "COMBO" and "e2e" in opts["options"]


def test_one_shot_node_resumes_the_project_and_matches_the_staged_graph(comfyui, tiny64, run):
    g = {"1": run.graph["1"], "2": run.graph["2"],
         "3": {"class_type": "MACEEraseConcepts",
               "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "concepts": ["2", 0],
                          **{k: v for k, v in _train(None)["inputs"].items() if k not in ("model", "clip", "vae")},
                          "closed_form_only": False}}}
    out = comfyui.run(g)
    model, images, report = out["3"]
    assert "reused LoRAs: cat, dog" in report and images.shape == (2, 64, 128, 3)
    staged = run.out["5"][0]
    for k, p in staged.patches.items():
        assert torch.equal(model.patches[k][-1][1][1][0], p[-1][1][1][0]), k


def test_one_shot_node_estimates_runs_low_vram_and_deletes_its_training_images(comfyui, tiny64, caplog):
    import logging

    from mace_core.method.project import Project

    train = {k: v for k, v in _train(None)["inputs"].items() if k not in ("model", "clip", "vae")}
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny64.name}},
         "2": _concepts("cat\ndog", "cleanup"),
         "3": {"class_type": "MACEEraseConcepts",
               "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "concepts": ["2", 0], **train,
                          "closed_form_only": False, "low_vram": True, "delete_images": True}}}
    with caplog.at_level(logging.INFO, logger="mace.comfyui"):
        out = comfyui.run(g)
    model, images, report = out["3"]
    # per concept: the synonym search (26 prompts at 4 timesteps), drawing (CFG doubles), training; once the
    # check of the object type's fixed list (13 prompts at 4 timesteps) and the subjectless prompt the two
    # concepts' nearby words are compared against (4 timesteps)
    calls = 2 * (26 * 4 + FAST["images"] * FAST["sample_steps"] * 2 + FAST["steps"]) + 13 * 4 + 4
    # seconds, or minutes on a loaded machine (it read "2.1 min" beside another job)
    assert re.search(rf"estimate: estimated [\d.]+ (s|min) \({calls} UNet calls at \d+ ms\)", report), report
    assert any(f"({calls} UNet calls at" in r.getMessage() for r in caplog.records)  # in the log, before the run
    assert "deleted 6 training image files" in report  # 2 concepts x (image, mask, latents)
    assert images.shape == (2, 64, 128, 3)  # the preview was taken before the images went
    proj = Project(comfyui.models_dir / "mace" / "cleanup")
    assert not [p for p in proj.root.rglob("*") if p.suffix == ".png" or p.name == "latents.safetensors"]
    assert all(proj.load_lora(c) is not None for c in proj.spec().concepts)
    assert proj.manifest()["overrides"]["low_vram"] is True
    # the project still restores a concept without its images
    restored = comfyui.run({"1": g["1"], "4": {"class_type": "MACERefuse", "inputs": {
        "model": ["1", 0], "project": "cleanup", "mode": "restore the listed concepts (erase all others)",
        "concepts": "cat", "closed_form_only": False}}})
    assert restored["4"][1] == "dog"


def test_abo_objective_trains_in_comfyui_without_touching_the_shared_model_and_matches_the_cli(comfyui, tiny64,
                                                                                                tmp_path):
    """ComfyUI holds the UNet as inference tensors; the abo loss backpropagates through it all."""
    from mace_core.model.checkpoint import load_checkpoint
    from mace_core.cli.main import main

    train = {k: v for k, v in _train(None)["inputs"].items() if k not in ("model", "clip", "vae")}
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny64.name}},
         "2": _concepts("cat", "abo"),
         "3": {"class_type": "MACEEraseConcepts",
               "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "concepts": ["2", 0], **train,
                          "closed_form_only": False, "objective": "abo", "alternative": "a dog"}}}
    out = comfyui.run(g)
    loader_model, erased = out["1"][0], out["3"][0]
    unet = loader_model.model.diffusion_model
    assert all(p.is_inference() for p in unet.parameters())  # still ComfyUI's own tensors, not replaced
    settings = json.loads(erased.model_options["mace"]["metadata"]["mace.settings"])
    assert settings["objective"] == "abo" and settings["alternative"] == "a dog"
    rc = main(["erase", str(tiny64.path), "--concept", "cat", "--type", "object", "--objective", "abo",
               "--alternative", "a dog", "--steps", str(FAST["steps"]), "--images", str(FAST["images"]),
               "--sample-steps", str(FAST["sample_steps"]), "--seed", str(FAST["seed"]), "--device", "cpu",
               "--out", str(tmp_path / "abo.safetensors")])
    assert rc == 0
    base, cli = load_checkpoint(tiny64.path), load_checkpoint(tmp_path / "abo.safetensors")
    for k, wc in cli.tensors.items():
        if not _is_kv(k):
            continue
        wc, w0 = wc.float(), base.tensors[k].float()
        wo = erased.patches[k[len("model."):]][-1][1][1][0]
        assert (wo - wc).norm() <= TOL_WEIGHT * wc.norm() and (wo - wc).norm() <= TOL_EDIT * (wc - w0).norm(), k
    # abo trains a LoRA on to_v too: the value weights move beyond stage 1's edit of the same run
    refined = comfyui.run({"1": g["1"], "2": g["2"], "3": {**g["3"], "inputs": {**g["3"]["inputs"],
                                                                              "closed_form_only": True}}})["3"][0]
    v = [k for k in erased.patches if k.endswith("attn2.to_v.weight")]
    assert any(not torch.equal(erased.patches[k][-1][1][1][0], refined.patches[k][-1][1][1][0]) for k in v)


def test_robust_rounds_run_in_comfyui_like_the_cli(comfyui, tiny64, tmp_path):
    """The soft-token attack of robust erasure differentiates through ComfyUI's text encoder and UNet
    (inference tensors); its round ends up in the project's statistics as with `mace erase --robust-rounds`."""
    from mace_core.model.checkpoint import load_checkpoint
    from mace_core.cli.main import main
    from mace_core.method.project import Project

    train = {k: v for k, v in _train(None)["inputs"].items() if k not in ("model", "clip", "vae")}
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny64.name}},
         "2": _concepts("cat", "robust"),
         "3": {"class_type": "MACEEraseConcepts",
               "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "concepts": ["2", 0], **train,
                          "closed_form_only": False, "robust_rounds": 1}}}
    model, _, report = comfyui.run(g)["3"]
    assert "harden " in report, report
    assert all(p.is_inference() for p in comfyui.run({"1": g["1"]})["1"][0].model.diffusion_model.parameters())
    mine = Project(comfyui.models_dir / "mace" / "robust")
    ours = mine.load_stats(mine.spec().concepts[0])  # "cat" as recorded, with the synonyms found
    work = tmp_path / "cli"
    assert main(["erase", str(tiny64.path), "--concept", "cat", "--type", "object", "--robust-rounds", "1",
                 "--steps", str(FAST["steps"]), "--images", str(FAST["images"]),
                 "--sample-steps", str(FAST["sample_steps"]), "--seed", str(FAST["seed"]), "--device", "cpu",
                 "--out", str(tmp_path / "robust.safetensors"), "--work-dir", str(work)]) == 0
    cli = Project(work).load_stats(Project(work).spec().concepts[0])
    assert ours.hardened == cli.hardened == 1 and ours.pairs == cli.pairs
    base, out = load_checkpoint(tiny64.path), load_checkpoint(tmp_path / "robust.safetensors")
    worst = 0.0
    for k, wc in out.tensors.items():
        if _is_kv(k):
            wc, w0 = wc.float(), base.tensors[k].float()
            wo = model.patches[k[len("model."):]][-1][1][1][0]
            worst = max(worst, float((wo - wc).norm() / (wc - w0).norm()))
    print(f"robust: host vs CLI, max ||dW|| / ||W_cli - W0|| = {worst:.2e}")
    assert worst <= TOL_EDIT


def test_a_host_restart_loses_nothing_already_trained(tiny64, tmp_path):
    """ComfyUI is killed (SIGKILL: a crash, a closed window) after it saved its first LoRA; a new
    ComfyUI process on the same folders resumes the project, and the erased weights equal those of an
    uninterrupted run bit for bit."""
    import signal
    import subprocess
    import time

    from safetensors.torch import load_file

    base = tmp_path / "comfyui"
    train = {k: v for k, v in _train(None, steps=40)["inputs"].items() if k not in ("model", "clip", "vae")}

    def graph(project: str) -> dict:
        return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny64.path.name}},
                "2": _concepts("cat\ndog", project),
                "3": {"class_type": "MACEEraseConcepts",
                      "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "concepts": ["2", 0], **train,
                                 "closed_form_only": False}}}

    ref = tmp_path / "uninterrupted.safetensors"
    subprocess.run(h.run_in_fresh_process(base, tiny64.path, graph("uninterrupted"), ref), check=True, timeout=900)

    cmd = h.run_in_fresh_process(base, tiny64.path, graph("restarted"), tmp_path / "resumed.safetensors")
    project = base / "models" / "mace" / "restarted"
    first = subprocess.Popen(cmd)
    try:
        while first.poll() is None and not list(project.rglob("lora.safetensors")):
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL, "the first process finished before it could be killed"
    done = sorted(p.parent.name for p in project.rglob("lora.safetensors"))
    assert len(done) == 1, done

    subprocess.run(cmd, check=True, timeout=900)
    report = (tmp_path / "resumed.txt").read_text()
    reused = report.split("reused LoRAs: ")[1].splitlines()[0].split(", ")
    assert len(reused) == 1 and reused[0] in ("cat", "dog"), report  # the other one trained after the restart
    a, b = load_file(str(ref)), load_file(str(tmp_path / "resumed.safetensors"))
    assert a.keys() == b.keys() and len(a) == 8
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuse_node_restores_a_concept_like_the_cli(comfyui, tiny64, run, tmp_path):
    from mace_core.model.checkpoint import load_checkpoint
    from mace_core.cli.main import main

    g = {"1": run.graph["1"],
         "2": {"class_type": "MACERefuse",
               "inputs": {"model": ["1", 0], "project": "e2e", "mode": "restore the listed concepts (erase all others)",
                          "concepts": "dog", "closed_form_only": False}}}
    out = comfyui.run(g)
    model, names = out["2"]
    assert names == "cat"
    # the project made in ComfyUI is an ordinary erasure project: the CLI re-fuses it to the same weights
    proj = comfyui.models_dir / "mace" / "e2e"
    assert main(["fuse", str(proj), "--except", "dog", "--model", str(tiny64.path),
                 "--out", str(tmp_path / "cat-only.safetensors")]) == 0
    cli = load_checkpoint(tmp_path / "cat-only.safetensors")
    assert json.loads(cli.metadata["mace.concepts"])[0]["phrase"] == "cat"
    for k, t in cli.tensors.items():
        if _is_kv(k):
            torch.testing.assert_close(model.patches[k[len("model."):]][-1][1][1][0], t.float(), rtol=1e-6, atol=1e-7)


def test_cancel_mid_training_stops_cleanly(comfyui, tiny64, run):
    from mace_core.method.project import Project

    graph = {"1": run.graph["1"], "2": _concepts("bird", "cancelled"),
             "3": {"class_type": "MACERefine", "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": ["2", 0]}},
             "4": _train(["3", 0], steps=200)}
    seen = []

    def cancel(value, total, node_id, prompt_id):
        if node_id == "4":
            seen.append((value, total))
            if value >= FAST["images"] + 2:  # the image is drawn, two training steps done
                comfyui.interrupt()

    comfyui.progress_callbacks.append(cancel)
    try:
        with pytest.raises(h.ComfyUIInterrupted) as e:
            comfyui.run(graph)
    finally:
        comfyui.progress_callbacks.remove(cancel)
    assert e.value.node_id == "4" and e.value.node_type == "MACETrainLoRAs"
    assert seen[-1][1] == FAST["images"] + 200 and seen[-1][0] < 10
    proj = Project(comfyui.models_dir / "mace" / "cancelled")
    (concept,) = proj.spec().concepts
    assert proj.load_stats(concept) is not None and proj.load_lora(concept) is None  # stage 1 kept, no half LoRA
    assert list((proj.concept_dir(concept) / "images").glob("*.png"))
    # no hook is left on the shared UNet, and the original model samples exactly as before
    unet = run.out["1"][0].model.diffusion_model
    assert not any(m._forward_hooks for m in unet.modules())
    again = comfyui.run(_reference_graph(tiny64.name))
    assert torch.equal(again["13"][0]["samples"], run.reference)


@pytest.mark.parametrize("text, expected", [
    ("cat | a scene | object | extra", "expected 'phrase | anchor | type'"),
    ("cat | a scene | no-such-type", "unknown concept type 'no-such-type'"),
])
def test_bad_concept_list_is_a_readable_validation_error(comfyui, text, expected):
    with pytest.raises(h.ComfyUIValidationError) as e:
        comfyui.run({"2": _concepts(text, "")})
    assert "MACELoadConcepts" in str(e.value) and expected in str(e.value) and "bad concept list" in str(e.value)
    # reported once, under the field that holds the line (not also under default_type, preset, ...)
    errors = e.value.node_errors["2"]["errors"]
    assert [err["extra_info"]["input_name"] for err in errors] == ["concepts"], errors
    assert errors[0]["details"].startswith("concepts - bad concept list: ") and expected in errors[0]["details"]


def test_an_empty_concept_list_is_refused_in_the_nodes_words(comfyui):
    with pytest.raises(h.ComfyUIExecutionError) as e:
        comfyui.run({"2": _concepts("# only a comment\n\n", "")})
    msg = e.value.exception_message
    assert e.value.node_type == "MACELoadConcepts" and "no concepts to erase" in msg, msg
    assert "'concepts'" in msg and "'preset'" in msg and "'config_file'" in msg and "--" not in msg, msg
    # a preset alone is a concept list
    assert comfyui.run({"2": _concepts("", "", preset="nudity")})["2"][0].spec.concepts


def test_wrong_inputs_are_readable_execution_errors(comfyui, tiny64):
    with pytest.raises(h.ComfyUIExecutionError) as e:
        comfyui.run({"2": _concepts("cat\nCat", "")})
    assert "listed twice" in e.value.exception_message
    with pytest.raises(h.ComfyUIExecutionError) as e:
        comfyui.run({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny64.name}},
                     "4": _train(["1", 0])})
    assert e.value.node_type == "MACETrainLoRAs" and e.value.exception_type.endswith("MaceError")
    assert "needs the MODEL output of a 'Refine (CFR)' node" in e.value.exception_message


def test_exported_lora_loads_through_the_stock_lora_loaders(comfyui, tiny64, run, tmp_path):
    import comfy.lora
    from mace_core.model.checkpoint import load_checkpoint, read_metadata
    from mace_core.cli.main import main

    lora = tmp_path / "erasure-lora.safetensors"
    assert main(["export-lora", str(run.cli_out), "--base", str(tiny64.path), "--out", str(lora)]) == 0
    reported = float(read_metadata(lora)["mace.lora_max_rel_error"])
    assert reported <= 0.01
    name = comfyui.add_model(lora, folder="loras")
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny64.name}},
         "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": name,
                                                               "strength_model": 1.0}},
         "3": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": name,
                                                      "strength_model": 1.0, "strength_clip": 1.0}},
         **_prompt_nodes(), "13": _sampler(["2", 0], ["12", 0])}
    out = comfyui.run(g)
    erased = load_checkpoint(run.cli_out)
    for node in ("2", "3"):
        model = out[node][0]
        kv = [k for k in erased.tensors if _is_kv(k)]
        assert {f"diffusion_model.{k[len('model.diffusion_model.'):]}" for k in kv} <= set(model.patches)
        patches = model.get_key_patches("diffusion_model.")
        for k in kv:
            ck = k[len("model."):]
            w = comfy.lora.calculate_weight(patches[ck][1:], patches[ck][0][0].detach().float().clone(), ck)
            target = erased.tensors[k].float()
            assert float((w - target).norm() / target.norm()) <= reported * 1.01 + 1e-6, k
    assert torch.isfinite(out["13"][0]["samples"]).all()


def _ui_to_api(workflow: dict, classes: dict) -> dict:
    """A UI-format workflow (what example_workflows/ holds) as the API-format prompt the server runs."""
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        spec = classes[node["type"]].INPUT_TYPES()
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs = {n: [str(l[1]), l[2]] for n, l in linked.items()}
        values = list(node.get("widgets_values") or [])
        for section in ("required", "optional"):
            for n, cfg in spec.get(section, {}).items():
                typ, opts = cfg[0], (cfg[1] if len(cfg) > 1 else {})
                if not (isinstance(typ, list) or typ in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")):
                    continue
                if not values:
                    break
                v = values.pop(0)
                if n not in linked:
                    inputs[n] = v
                if opts.get("control_after_generate") or n in ("seed", "noise_seed"):
                    values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_example_workflow_validates(comfyui, tiny64):
    wf = json.loads((REPO / "example_workflows" / "MACE - erase celebrities.json").read_text())
    prompt = _ui_to_api(wf, comfyui.node_classes)
    types = {n["class_type"] for n in prompt.values()}
    assert {"CheckpointLoaderSimple", "MACELoadConcepts", "MACERefine", "MACETrainLoRAs", "MACEFuse", "KSampler",
            "MACESaveCheckpoint"} <= types
    (loader,) = [n for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple"]
    loader["inputs"]["ckpt_name"] = tiny64.name
    concepts = next(n for n in prompt.values() if n["class_type"] == "MACELoadConcepts")["inputs"]
    assert concepts["default_type"] == "celebrity" and "Tom Cruise" in concepts["concepts"]
    samplers = [n for n in prompt.values() if n["class_type"] == "KSampler"]
    assert len(samplers) == 2 and {s["inputs"]["model"][0] for s in samplers} == {
        next(i for i, n in prompt.items() if n["class_type"] == "CheckpointLoaderSimple"),
        next(i for i, n in prompt.items() if n["class_type"] == "MACEFuse")}
    outputs = comfyui.validate(prompt)
    assert len(outputs) == 4


def test_one_request_through_the_cli_the_tab_and_the_nodes_gives_the_same_weights(comfyui, tiny64, tmp_path,
                                                                                  monkeypatch):
    """The three front-ends only translate their inputs into the core's `Request`: the same erasure asked
    of each resolves to the same plan (every concept's settings, what to erase and keep), and the CLI
    and the tab, both reading the file, write bit-identical weights; the nodes (ComfyUI's fp16 CLIP)
    agree to the tolerances of the module docstring."""
    import mace_core.run.run as run_layer
    from mace_core.model.checkpoint import load_checkpoint
    from mace_core.cli.main import main
    from sd_webui_extension import actions
    from sd_webui_extension.host import StandaloneHost

    plans = {}
    real_plan = run_layer.plan

    def recording_plan(req, backend, checkpoint=None):
        p = real_plan(req, backend, checkpoint)
        plans[front] = p
        return p

    monkeypatch.setattr(run_layer, "plan", recording_plan)
    settings = {"steps": 4, "images": 1, "sample_steps": 2, "seed": 7, "lr": 1e-3, "lam": 50.0}

    front = "cli"
    cli_out = tmp_path / "cli.safetensors"
    flags = [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert main(["erase", str(tiny64.path), "--concept", "cat", "--concept", "dog | a horse", "--retain", "house",
                 *flags, "--device", "cpu", "--out", str(cli_out), "--work-dir", str(tmp_path / "cli-project")]) == 0

    front = "tab"
    host = StandaloneHost(tiny64.path, out_dir=tmp_path / "tab", device="cpu")
    (tmp_path / "tab").mkdir()
    form = actions.EraseForm(checkpoint=tiny64.path.name, concepts="cat\ndog | a horse", retain="house",
                             out_name="tab", previews=False, numbers={k: str(v) for k, v in settings.items()})
    tab_out = actions.run_erase(host, form).path

    front = "nodes"
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny64.name}},
         "2": _concepts("cat\ndog | a horse", "same-request", retain="house"),
         "3": {"class_type": "MACEEraseConcepts",
               "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "concepts": ["2", 0],
                          **{k: v for k, v in _train(None, steps=settings["steps"])["inputs"].items()
                             if k not in ("model", "clip", "vae")},
                          "lr": settings["lr"], "lam": settings["lam"], "closed_form_only": False}}}
    model = comfyui.run(g)["3"][0]

    cli, tab = plans["cli"], plans["tab"]
    for other in (tab, plans["nodes"]):
        assert other.settings == cli.settings and list(other.settings) == ["cat", "dog"]
        assert other.planned.concepts == cli.planned.concepts and other.planned.retain == cli.planned.retain
    assert cli.settings["cat"].lam == 50.0 and cli.settings["dog"].steps == 4

    base, a, b = (load_checkpoint(p) for p in (tiny64.path, cli_out, tab_out))
    assert a.metadata["mace.settings"] == b.metadata["mace.settings"]
    kv = [k for k in base.tensors if _is_kv(k)]
    assert kv and all(torch.equal(a.tensors[k], b.tensors[k]) for k in kv)
    for k in kv:
        wc, w0 = a.tensors[k].float(), base.tensors[k].float()
        wo = model.patches[k[len("model."):]][-1][1][1][0]
        assert (wo - wc).norm() <= TOL_WEIGHT * wc.norm() and (wo - wc).norm() <= TOL_EDIT * (wc - w0).norm(), k


def test_a_setting_declared_in_the_core_is_a_widget_of_the_training_nodes(comfyui, monkeypatch):
    """A new `concepts.Settings` field (test_cli's `new_setting`) becomes an optional widget of Train LoRAs
    and Erase Concepts from its declaration alone: its range, its tooltip, and "unset" below the range."""
    import dataclasses

    from mace_core.method import concepts

    extended = dataclasses.make_dataclass(
        "Settings", [("eta_test", "float", concepts._knob(0.5, "a new loss weight", "new weight", min=0, max=2))],
        bases=(concepts.Settings,), frozen=True)
    monkeypatch.setattr(concepts, "Settings", extended)
    concepts._all_infos.cache_clear()
    try:
        nodes = importlib.import_module(comfyui.node_classes["MACEEraseConcepts"].__module__)
        for name in ("MACETrainLoRAs", "MACEEraseConcepts"):
            kind, opts = comfyui.node_classes[name].INPUT_TYPES()["optional"]["eta_test"]
            assert kind == "FLOAT" and opts["min"] == -1.0 == opts["default"] and opts["max"] == 2.0
            assert opts["tooltip"].startswith("a new loss weight (default: 0.5)")
        assert nodes._overrides({"eta_test": 1.5, "lam": -1.0, "objective": nodes.DEFAULT}) == {"eta_test": 1.5}
    finally:
        monkeypatch.undo()
        concepts._all_infos.cache_clear()


def test_refine_node_turns_the_default_protection_off_like_the_cli(comfyui, tiny64, tmp_path):
    """Refine (CFR)'s `protection` widget: 'none' refines as `mace erase --closed-form-only --protection
    none` does, records it in the file, and differs from the type's default protection."""
    from mace_core.cli.main import main
    from mace_core.method.concepts import get_type
    from mace_core.model.checkpoint import load_checkpoint

    def refine(tag: str, **kw) -> dict:
        graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny64.name}},
                 "2": _concepts("cat", f"protect-{tag}"),
                 "3": {"class_type": "MACERefine", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                              "concepts": ["2", 0], **kw}},
                 "4": {"class_type": "MACESaveCheckpoint", "inputs": {"model": ["3", 0], "clip": ["1", 1],
                                                                      "vae": ["1", 2],
                                                                      "filename_prefix": f"checkpoints/prot-{tag}"}}}
        saved = Path(comfyui.run(graph)["4"][0])
        return load_checkpoint(saved, family=load_checkpoint(tiny64.path).family)

    off, default = refine("off", protection="none"), refine("default")
    assert main(["erase", str(tiny64.path), "--concept", "cat", "--type", "object", "--closed-form-only",
                 "--protection", "none", "--device", "cpu", "--out", str(tmp_path / "cli.safetensors")]) == 0
    cli = load_checkpoint(tmp_path / "cli.safetensors")
    assert json.loads(off.metadata["mace.settings"])["protection"] == "none"
    assert json.loads(off.metadata["mace.protected"])["phrases"] == []
    nearby = json.loads(default.metadata["mace.concepts"])[0]["found_neighbours"]  # found by the search
    assert json.loads(default.metadata["mace.protected"])["phrases"] == [  # 80 common objects but "cat"
        p for p in get_type("object").protect if p != "cat"] + nearby
    kv = [k for k in cli.tensors if _is_kv(k)]
    for k in kv:
        wc, wo = cli.tensors[k].float(), off.tensors[k].float()
        assert float((wo - wc).norm() / wc.norm()) <= TOL_WEIGHT, k
    assert max(float((default.tensors[k].float() - off.tensors[k].float()).norm()) for k in kv) > 0
