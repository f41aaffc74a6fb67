"""The real-ComfyUI test harness: a tiny SD1 checkpoint through ComfyUI's stock nodes."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import comfyui_harness as h  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_comfyui_boots_with_stock_nodes_and_this_repo_as_custom_node(comfyui):
    for name in ("CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler",
                 "VAEDecode", "VAEEncode", "CheckpointSave", "LoraLoader", "SaveImage"):
        assert name in comfyui.node_classes, name
    import comfyui_version
    assert comfyui_version.__version__ == h.COMFYUI_VERSION
    link = comfyui.custom_nodes_dir / h.CUSTOM_NODE_NAME
    assert link.is_symlink() and link.resolve() == REPO.resolve()
    if (REPO / "__init__.py").is_file():  # loaded like a user's install, or the test says why not
        assert h.CUSTOM_NODE_NAME in comfyui.nodes.LOADED_MODULE_DIRS, \
            "ComfyUI could not import the repository root __init__.py (see the log)"
    assert comfyui.model_management.cpu_state == comfyui.model_management.CPUState.CPU
    assert not getattr(sys.modules.get("torchvision"), "__mace_stand_in__", False), \
        "the torchvision stand-in must not outlive ComfyUI's start"


def _two_seed_graph(name: str, seed_a: int, seed_b: int, width: int, height: int) -> dict:
    g = h.txt2img_graph(name, "a photo of a cat", seed=seed_a, steps=3, cfg=4.0,
                        width=width, height=height)
    g["7"] = copy.deepcopy(g["5"])
    g["7"]["inputs"]["seed"] = seed_b
    g["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}}
    return g


def test_tiny_sd1_samples_deterministically_through_stock_nodes(comfyui, tiny_sd1):
    width, height = 32, 48
    out = comfyui.run(_two_seed_graph(tiny_sd1.name, 11, 12, width, height))

    model, clip, vae = out["1"]
    assert type(model.model.model_config) is tiny_sd1.model_class
    img_a, img_b = out["6"][0], out["8"][0]
    assert img_a.shape == (1, height, width, 3) and img_a.dtype == torch.float32
    assert torch.isfinite(img_a).all() and img_a.min() >= 0 and img_a.max() <= 1
    assert not torch.equal(img_a, img_b), "a different seed must give a different image"
    assert (img_a - img_b).abs().mean() > 1e-3

    # a second, cold run (checkpoint loaded again, every node re-executed): bit-identical
    again = comfyui.run(h.txt2img_graph(tiny_sd1.name, "a photo of a cat", seed=11, steps=3,
                                        cfg=4.0, width=width, height=height))
    assert again["1"][0] is not model
    assert torch.equal(again["6"][0], img_a)

    # what ComfyUI loaded is what the core wrote: text encoder (ComfyUI keeps it in fp16 on
    # CPU), UNet (incl. the head count, which only the registration knows) and VAE
    tokens = clip.tokenize("a photo of a cat")["l"][0]
    ids = torch.tensor([[t[0] for t in tokens]])
    te16 = copy.deepcopy(tiny_sd1.text_encoder).half().float()
    cond = out["2"][0][0][0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, height // 8, width // 8, generator=gen)
    ts = torch.tensor([20.0, 700.0])
    ctx = torch.randn(2, 77, cond.shape[-1], generator=gen)
    with torch.no_grad():
        ref_cond = te16(ids).last_hidden_state
        unet_ours = model.model.diffusion_model(x, ts, context=ctx)
        unet_ref = tiny_sd1.unet(x, ts, encoder_hidden_states=ctx).sample
        vae_ours = vae.first_stage_model.decode(x[:1])
        vae_ref = tiny_sd1.vae.decode(x[:1]).sample
    assert cond.shape == ref_cond.shape == (1, 77, 32)
    torch.testing.assert_close(cond, ref_cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unet_ours, unet_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vae_ours, vae_ref, atol=1e-4, rtol=1e-4)


def test_validation_errors_are_readable(comfyui, tiny_sd1):
    bad = h.txt2img_graph("no-such-model.safetensors")
    with pytest.raises(h.ComfyUIValidationError) as e:
        comfyui.run(bad)
    assert "CheckpointLoaderSimple" in str(e.value) and "no-such-model.safetensors" in str(e.value)
    assert "1" in e.value.node_errors

    unknown = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    with pytest.raises(h.ComfyUIValidationError, match="NoSuchNode"):
        comfyui.run(unknown)

    # the server's own rule: a graph needs an output node to be queued
    with pytest.raises(h.ComfyUIValidationError, match="no outputs"):
        comfyui.validate(h.txt2img_graph(tiny_sd1.name))


def test_cancel_during_sampling_interrupts_the_graph(comfyui, tiny_sd1):
    seen = []

    def cancel_after_first_step(value, total, node_id, prompt_id):
        seen.append((node_id, value, total))
        if node_id == "5" and value >= 1:
            comfyui.interrupt()

    comfyui.progress_callbacks.append(cancel_after_first_step)
    try:
        with pytest.raises(h.ComfyUIInterrupted) as e:
            comfyui.run(h.txt2img_graph(tiny_sd1.name, steps=6, width=32, height=32), cache=True)
    finally:
        comfyui.progress_callbacks.remove(cancel_after_first_step)
    assert e.value.node_id == "5" and e.value.node_type == "KSampler"
    assert ("5", 1, 6) in seen and not any(v > 2 for n, v, _ in seen if n == "5")
    # and the next graph runs normally (the cached loader output is reused)
    out = comfyui.run(h.txt2img_graph(tiny_sd1.name, steps=1, width=32, height=32), cache=True)
    assert out["6"][0].shape == (1, 32, 32, 3)


def test_toy_sized_vae_needs_the_opt_in_config_inference(comfyui, tmp_path):
    # a toy-world-like VAE (ch 32, ch_mult [1,2,2], 1 res block, 4x): the stock loader sizes
    # every SD1 VAE as ch 128 / 2 res blocks and fails on the first mismatched tensor
    path = h.make_tiny_sd1_checkpoint(tmp_path / "tiny-4x.safetensors", seed=3, vae="tiny")
    assert h.register_from_checkpoint(path) is not None
    name = comfyui.add_model(path)
    graph = h.txt2img_graph(name, steps=2, width=64, height=64)
    with pytest.raises(h.ComfyUIExecutionError, match="size mismatch") as e:
        comfyui.run(graph)
    assert e.value.node_type == "CheckpointLoaderSimple"

    with h.nonstandard_vae_support():
        out = comfyui.run(graph)
    vae = out["1"][2]
    assert vae.downscale_ratio == 4
    # EmptyLatentImage always divides by 8: 64x64 asks for an 8x8 latent, a 4x VAE makes 32x32
    assert out["6"][0].shape == (1, 32, 32, 3)
    assert torch.isfinite(out["6"][0]).all()
