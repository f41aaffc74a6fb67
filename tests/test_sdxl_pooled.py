"""SDXL: the pooled text embedding reaches the UNet through the added-condition projection, outside
cross-attention; stage 1 must edit that path too."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from mace_core.model.checkpoint import load_checkpoint
from mace_core.method.concepts import ErasureSpec, concept_prompts, make_concept
from mace_core.model.diffusers_backend import POOLED_KEY, DiffusersBackend
from mace_core.method.erase import erase
from mace_core.model.checkpoint import save_edited
from mace_core.method.project import Project
from tiny import tiny_file


def test_pooled_projection_is_erased(tmp_path):
    ck = load_checkpoint(tiny_file("sdxl"))
    be = DiffusersBackend.from_checkpoint(ck, device="cpu")
    concept = make_concept("cat", "a dog")
    # the mechanism alone: without the object type's default protection (80 COCO words, among them the
    # anchor's "dog", which in this tiny random text encoder span most of its width)
    res = erase(be, ErasureSpec((concept,), (), {"lam": 0.1, "protection": "none"}), Project(tmp_path / "p"), ck.sha256,
                closed_form_only=True)
    w0 = be.original_weights()[POOLED_KEY].double()
    w = res.weights[POOLED_KEY].double()
    p = be.encode(concept_prompts(concept)).pooled.double()
    pa = be.encode(concept_prompts(concept, "a dog")).pooled.double()
    P = p.shape[-1]
    before = (p @ w0[:, :P].T - pa @ w0[:, :P].T).norm()
    after = (p @ w[:, :P].T - pa @ w0[:, :P].T).norm()
    assert after < 0.5 * before  # pooled "cat" now projects like pooled "dog" (least squares over 51 prompts)
    assert torch.equal(w[:, P:], w0[:, P:])  # the size/crop-conditioning columns are untouched
    out = save_edited(ck, res.weights, tmp_path / "o.safetensors", {})
    saved = load_file(str(out))
    assert torch.equal(saved[POOLED_KEY], res.weights[POOLED_KEY].to(saved[POOLED_KEY].dtype))
    assert not torch.equal(saved[POOLED_KEY], ck.tensors[POOLED_KEY])
