"""Training data of stage 2: images the model draws of a concept, and where in them the concept is.

The default mask needs no extra model: while the images are sampled, the queries and keys of
every attn2 layer are captured, the attention mass on the concept's tokens is averaged over
heads, layers and steps, normalised per image and thresholded. Same sampling pass, no second
model. Styles and explicit content use the whole image (``mask="none"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .attention import QKCapture, token_attention
from ..model.backend import Backend, TextBatch
from .concepts import Settings
from ..model.sampling import sample_latents, to_uint8

DRAW_BATCH = 8  # SD1.5 training images (512 px) sampled at once (twice that many UNet rows under CFG)
DRAW_PIXELS = DRAW_BATCH * 512 * 512  # the same pixels per batch at other sizes: 2 SDXL images (1024 px)


@dataclass
class ConceptData:
    """N training samples: latents [N, c, h, w], masks bool [N, h, w] at latent resolution,
    images uint8 [N, H, W, 3] (for saving / previews)."""

    latents: torch.Tensor
    masks: torch.Tensor
    images: np.ndarray


def find_tokens(ids: Sequence[int], phrase_ids: Sequence[int]) -> list[int]:
    """Positions of the last occurrence of ``phrase_ids`` (no start/end tokens) inside ``ids``."""
    n = len(phrase_ids)
    for s in range(len(ids) - n, -1, -1):
        if list(ids[s:s + n]) == list(phrase_ids):
            return list(range(s, s + n))
    return []


def phrase_token_mask(backend: Backend, prompts: Sequence[str], phrase: str, T: int = 77,
                      with_end: bool = False) -> torch.Tensor:
    """bool [len(prompts), T]: the phrase's token positions in each prompt (+ end and padding
    positions when ``with_end``: under causal attention they carry the phrase too)."""
    pid = backend.tokenize(phrase)[1:-1]
    out = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids = backend.tokenize(p)
        pos = find_tokens(ids, pid)
        if not pos:
            raise ValueError(f"phrase {phrase!r} not found in prompt {p!r}")
        out[i, pos] = True
        if with_end:
            out[i, len(ids) - 1:] = True
    return out


def resize_mask(mask: torch.Tensor, n_pixels: int) -> torch.Tensor:
    """bool [B, h, w] -> bool [B, N] at a feature map of N pixels (same aspect), nearest."""
    b, h, w = mask.shape
    s = int(round((h * w / n_pixels) ** 0.5))
    m = F.interpolate(mask[:, None].float(), size=(h // s, w // s), mode="nearest")[:, 0] > 0.5
    return m.reshape(b, -1)


@torch.no_grad()
def draw_concept(backend: Backend, prompt: str, phrase: str, seeds: Sequence[int], steps: int, guidance: float,
                 mask_mode: str = "attention", threshold: float = 0.5, size: int | None = None,
                 batch_size: int = DRAW_BATCH, on_batch: Callable[[int, int], None] | None = None) -> ConceptData:
    """Sample one image per seed of ``prompt`` with the (original) model, with attention masks."""
    layers = backend.cross_attention()
    tokens = phrase_token_mask(backend, [prompt], phrase)[0]
    neg = backend.encode([""])
    text1 = backend.encode([prompt])
    lats, masks = [], []
    side = (size or backend.resolution) // backend.vae_scale
    hw = (side, side)
    for s in range(0, len(seeds), batch_size):
        sd = list(seeds[s:s + batch_size])
        b = len(sd)
        text, uncond = TextBatch.cat([text1] * b), TextBatch.cat([neg] * b)
        maps: list[torch.Tensor] = []
        with QKCapture(layers) as cap:
            def accumulate(i: int, n: int) -> None:
                if mask_mode == "attention":
                    maps.append(_attention_map(cap, layers, tokens, b, hw))
            lat = sample_latents(backend, text, uncond, sd, steps, guidance, size, on_step=accumulate)
        lats.append(lat)
        if mask_mode == "attention":
            m = torch.stack(maps).mean(0)  # [b, h, w]
            m = m / m.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
            masks.append(m >= threshold)
        else:
            masks.append(torch.ones(b, *hw, dtype=torch.bool))
        if on_batch:
            on_batch(min(s + batch_size, len(seeds)), len(seeds))
    latents = torch.cat(lats)
    # decoded one at a time: the decoder's full-resolution activations would otherwise be drawing's peak
    # (SD1.5: 2.9 GB for 8 images, 0.3 GB for one; benchmarks/vram.py), and decoding is a small part of
    # the time next to the sampling steps
    images = np.concatenate([to_uint8(backend.decode_latents(latents[i:i + 1]).cpu()) for i in range(len(latents))])
    return ConceptData(latents, torch.cat(masks), images)


def draw_batch(settings: Settings, resolution: int = 512) -> int:
    """Images of ``resolution`` px sampled (and decoded) at once: a fixed pixel budget, so drawing's
    activations do not grow with the model's size (SDXL at 8 images a batch traces at ~26 GB,
    benchmarks/vram.py); one at a time in low-VRAM mode. The same images either way: noise is per seed."""
    return 1 if settings.low_vram else max(1, DRAW_PIXELS // resolution ** 2)


def _attention_map(cap: QKCapture, layers, tokens: torch.Tensor, b: int, hw: tuple[int, int]) -> torch.Tensor:
    """Mean over layers and heads of the attention mass on ``tokens``, upsampled to ``hw``: [b, h, w].

    Rows of the captured batch: [uncond x b, cond x b] under CFG (the cond half is used), else cond.
    """
    acc = torch.zeros(b, 1, *hw)
    for layer in layers:
        q, k = cap.q[layer.name][-b:], cap.k[layer.name][-b:]
        tok = tokens.to(k.device)[None].expand(b, -1)
        mass = token_attention(q, k, layer.heads, tok).mean(1)  # [b, N]
        s = int(round((hw[0] * hw[1] / mass.shape[-1]) ** 0.5))
        mass = mass.reshape(b, 1, hw[0] // s, hw[1] // s).float().cpu()
        acc += F.interpolate(mass, size=hw, mode="bilinear", align_corners=False)
    return acc[:, 0] / len(layers)


def save_data(data: ConceptData, folder: Path) -> None:
    """Images and masks as lossless PNGs paired by name: images/0003.png <-> masks/0003.png."""
    from ..files import write_png

    H, W = data.images.shape[1:3]
    for i, (img, m) in enumerate(zip(data.images, data.masks)):
        write_png(folder / "images" / f"{i:04d}.png", img, checked=True, what="the erasure project")
        mm = F.interpolate(m[None, None].float(), size=(H, W), mode="nearest")[0, 0]
        write_png(folder / "masks" / f"{i:04d}.png", (mm.numpy() * 255).astype(np.uint8), checked=True,
                  what="the erasure project")
