"""Our LoRA is peft's LoRA, applied by hooks instead of module injection.

The stage-2 LoRA (train.LoRA + attention.weight_deltas) is not built with peft on purpose: peft
injects its layers into the model (it rewrites the to_k / to_v modules), while ComfyUI shares those
modules between MODEL clones and Forge/A1111 pin or lack peft. This test proves the two are the
same parametrisation: with the same factors (peft's lora_A = our down, lora_B = our up,
lora_alpha = our alpha), a peft-injected copy of the UNet gives the same outputs and the same
gradients as our hooks on the untouched UNet, and our initialisation is peft's (lora_A
kaiming-uniform with a = sqrt(5), lora_B zero).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from mace_core.method.attention import weight_deltas
from mace_core.model.diffusers_backend import DiffusersBackend
from mace_core.method.train import LoRA, init_lora

peft = pytest.importorskip("peft")
TOY = Path(__file__).resolve().parents[1] / "shared" / "toyworld" / "data" / "toy-sd1.safetensors"


def _backend() -> DiffusersBackend:
    """The trained toy model (random tiny UNets saturate: their output barely depends on the text)."""
    return DiffusersBackend.from_file(TOY, device="cpu", dtype=torch.float32)


def _peft_unet(unet: torch.nn.Module, rank: int, alpha: float) -> torch.nn.Module:
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=r".*attn2\.to_[kv]",
                          init_lora_weights=True)
    return peft.inject_adapter_in_model(cfg, copy.deepcopy(unet))


def _by_layer(be: DiffusersBackend, unet: torch.nn.Module, other: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """file key of each attn2 to_k / to_v -> the peft-wrapped module at the same path in ``other``."""
    paths = {id(m): n for n, m in unet.named_modules()}
    out = {}
    for layer in be.cross_attention():
        for key, mod in ((layer.k_key, layer.to_k), (layer.v_key, layer.to_v)):
            out[key] = other.get_submodule(paths[id(mod)])
    return out


def test_hooked_lora_equals_peft_lora_in_outputs_and_gradients():
    be = _backend()
    unet = be.components.unet
    rank, alpha = 2, 3.0
    twin = _peft_unet(unet, rank, alpha)
    wrapped = _by_layer(be, unet, twin)
    g = torch.Generator().manual_seed(0)
    lora = LoRA({}, {}, alpha)
    for key, mod in wrapped.items():
        down = torch.randn(rank, mod.base_layer.in_features, generator=g) * 0.3
        up = torch.randn(mod.base_layer.out_features, rank, generator=g) * 0.3
        lora.down[key], lora.up[key] = down.requires_grad_(), up.requires_grad_()
        mod.lora_A["default"].weight.data.copy_(down)
        mod.lora_B["default"].weight.data.copy_(up)
    x = torch.randn(2, be.latent_channels, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    text = be.encode(["a photo of a cat", "a dog"])

    with torch.enable_grad(), weight_deltas(be.cross_attention(), {k: (lambda k=k: lora.delta(k)) for k in wrapped}):
        ours = be.predict(x, t, text)
        ours.square().mean().backward()
    theirs = twin(x, t, encoder_hidden_states=text.context).sample
    theirs.square().mean().backward()

    plain = be.predict(x, t, text)
    assert (ours - plain).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for key, mod in wrapped.items():
        torch.testing.assert_close(lora.down[key].grad, mod.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lora.up[key].grad, mod.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
    assert all(not p.requires_grad or p.grad is None for p in unet.parameters())  # the model itself untouched


def test_initialisation_is_peft_s():
    be = _backend()
    layers = be.cross_attention()
    keys = [l.k_key for l in layers]
    ours = init_lora(layers, keys, rank=4, g=torch.Generator().manual_seed(0), device="cpu")
    twin = _by_layer(be, be.components.unet, _peft_unet(be.components.unet, 4, 4.0))
    for k in keys:
        a = twin[k].lora_A["default"].weight
        bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform(a=sqrt(5)) on [r, D]: U(-1/sqrt(D), 1/sqrt(D))
        assert ours.down[k].shape == a.shape and ours.down[k].abs().max() <= bound and a.abs().max() <= bound
        assert float(ours.down[k].detach().std()) == pytest.approx(float(a.detach().std()), rel=0.35)  # uniform on the same interval
        assert torch.count_nonzero(ours.up[k]) == 0 and torch.count_nonzero(twin[k].lora_B["default"].weight) == 0
    assert ours.alpha / ours.rank == 1.0  # scaling alpha / r as peft with lora_alpha = r
