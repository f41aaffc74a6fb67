"""Offloading idle parts: while the UNet runs, the text encoder and the VAE are parked (on a GPU that
frees their memory for the UNet's activations), fetched back when next used, and kept in place while a
graph through the text encoder is alive (the soft-token attack differentiates through it).

There is no GPU here, so parking moves to the same CPU: these tests check the policy (which parts are
resident at each UNet pass) and that it changes no result, not the transfer itself."""

from __future__ import annotations

import torch

from mace_core.model.checkpoint import load_checkpoint
from mace_core.method.concepts import ErasureSpec, make_concept
from mace_core.model.diffusers_backend import DiffusersBackend
from mace_core.method.erase import erase
from mace_core.method.project import Project
from tiny import tiny_file

FAST = {"images": 2, "sample_steps": 3, "steps": 3, "lam": 1.0, "robust_rounds": 1, "attack_steps": 3}


def test_idle_parts_are_parked_during_unet_passes_and_results_do_not_change(tmp_path):
    ck = load_checkpoint(tiny_file("sd1"))
    spec = ErasureSpec((make_concept("cat"),), (), FAST)
    plain = erase(DiffusersBackend.from_checkpoint(ck, device="cpu"), spec, Project(tmp_path / "a"), ck.sha256)

    be = DiffusersBackend.from_checkpoint(ck, device="cpu")
    assert not be.offload  # nothing to gain on the CPU: off unless asked for
    be.offload = True
    seen: list[tuple[frozenset, bool]] = []  # (resident parts, grad enabled) at each UNet pass
    be.components.unet.register_forward_pre_hook(
        lambda *_: seen.append((frozenset(be.resident), torch.is_grad_enabled())))
    parked = erase(be, spec, Project(tmp_path / "b"), ck.sha256)

    for k, w in plain.weights.items():
        assert torch.equal(w, parked.weights[k]), k
    assert seen and all("unet" in r and "vae" not in r for r, _ in seen)
    # sampling and LoRA training run with the text encoder parked ...
    assert sum("text" not in r for r, _ in seen) > len(seen) // 2
    # ... the soft-token attack's passes keep it (its loss is differentiated back into the encoder)
    assert any("text" in r and grad for r, grad in seen)
    # a later encoding fetches it back
    be.encode(["a photo of a cat"])
    assert "text" in be.resident and "vae" not in be.resident
