"""Models of the real architectures with random weights, built from family configs.

Tests use tiny versions (seconds on a CPU); benchmarks use full-size ones, since speed and memory
do not depend on the weight values. Nothing here is used by an erasure, so it lives with the tests
(benchmarks put this folder on their path).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mace_core.model.families import Family, load_family


def tiny_family(name: str) -> Family:
    """A family with the real block structure of ``name`` at toy width (context 32, or 64 for SDXL)."""
    fam = load_family(name)
    text = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 3,
            "projection_dim": 32}
    tes = tuple(replace(te, config={**te.config, **text}) for te in fam.text_encoders)
    unet = {**fam.unet, "block_out_channels": [32, 32, 64][:len(fam.unet["block_out_channels"]) - 1] + [64],
            "norm_num_groups": 8, "sample_size": 8, "cross_attention_dim": sum(te.width for te in tes)}
    if name == "sdxl":
        unet.update(transformer_layers_per_block=[1, 2, 2], attention_head_dim=[2, 4, 4],
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    elif isinstance(unet["attention_head_dim"], list):
        unet["attention_head_dim"] = [2, 2, 4, 4][:len(unet["block_out_channels"])]
    else:
        unet["attention_head_dim"] = 4
    vae = {**fam.vae, "block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
           "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 8, "layers_per_block": 1,
           "sample_size": 16}
    return replace(fam, unet=unet, vae=vae, text_encoders=tes, resolution=16)


def random_modules(fam: Family, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(unet, vae, [text encoders]) of ``fam`` with seeded random weights.

    diffusers zero-initialises some output layers; every parameter is re-drawn here so tests see
    non-trivial tensors everywhere (a zero K/V weight would hide key-map mistakes).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**fam.unet)
    vae = AutoencoderKL(**fam.vae)
    tes = [(CLIPTextModelWithProjection if te.projection else CLIPTextModel)(CLIPTextConfig(**te.config))
           for te in fam.text_encoders]
    g = torch.Generator().manual_seed(seed)
    for m in (unet, vae, *tes):
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p.shape[-1]) ** 0.5))
        m.to(dtype).eval()
    return unet, vae, tes

