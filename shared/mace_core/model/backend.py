"""The seam: what the erasure algorithm may ask of a model, whoever loaded it.

A host (our file loader, ComfyUI's MODEL/CLIP/VAE, A1111's ``sd_model``) implements `Backend`;
the stages only talk to this protocol. The erasure result is plain data keyed by the file's
tensor names (``model.diffusion_model....attn2.to_k.weight``), which every host can apply its own
way (file rewrite, ComfyUI ``add_patches``, A1111 weights).

Shapes: B = batch, T = 77 context tokens, D = context width (768 / 1024 / 2048), P = pooled
width (SDXL 1280), C = channels of an attn2 layer, N = pixels of a layer's feature map.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import ContextManager, Protocol, Sequence

import torch


@dataclass
class TextBatch:
    """Encoded prompts as the UNet consumes them.

    ``context`` [B, T, D] is the input of every attn2 to_k/to_v; ``pooled`` [B, P] (SDXL only) feeds
    the added-condition embedding; ``ids`` [B, T] are the token ids of the first tokenizer.
    """

    context: torch.Tensor
    ids: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.context.shape[0]

    def select(self, idx) -> "TextBatch":
        return TextBatch(self.context[idx], self.ids[idx], None if self.pooled is None else self.pooled[idx])

    @staticmethod
    def cat(batches: Sequence["TextBatch"]) -> "TextBatch":
        pooled = None if batches[0].pooled is None else torch.cat([b.pooled for b in batches])
        return TextBatch(torch.cat([b.context for b in batches]), torch.cat([b.ids for b in batches]), pooled)


@dataclass
class CrossAttentionLayer:
    """One attn2 layer. ``name`` is its ldm module path (``model.diffusion_model.<...>.attn2``), so
    ``name + ".to_k.weight"`` is the file key of its K weight [C, D]."""

    name: str
    to_q: torch.nn.Module
    to_k: torch.nn.Linear
    to_v: torch.nn.Linear
    heads: int

    @property
    def k_key(self) -> str:
        return self.name + ".to_k.weight"

    @property
    def v_key(self) -> str:
        return self.name + ".to_v.weight"


class Backend(Protocol):
    """What the algorithm needs from a loaded text-to-image model."""

    family_name: str
    prediction_type: str  # "epsilon" or "v_prediction"
    device: torch.device
    dtype: torch.dtype
    resolution: int  # default image side in pixels
    latent_channels: int
    vae_scale: int  # pixels per latent pixel
    alphas_cumprod: torch.Tensor  # [1000] float64

    def text_encoder_key(self) -> str:
        """A hash identifying the text encoder(s) and the layer read (keys the prior cache)."""

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of one prompt with start/end tokens and no padding."""

    def encode(self, prompts: Sequence[str]) -> TextBatch:
        """Encode prompts (padded to T tokens) with the layer the UNet samples with."""

    def cross_attention(self) -> list[CrossAttentionLayer]:
        """Every attn2 layer, in UNet order."""

    def original_weights(self) -> dict[str, torch.Tensor]:
        """Weights stage 1 edits, unedited, by file key, fp32 on CPU: every attn2 to_k / to_v, and for
        SDXL the added-condition projection ``...label_emb.0.0.weight`` (its first P columns read
        the pooled text embedding)."""

    def predict(self, latents: torch.Tensor, t: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """UNet output (eps or v) for latents [B, c, h, w] at timesteps t [B]."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents -> images [B, 3, H, W] in [-1, 1]."""


def differentiable(backend: Backend) -> ContextManager[None]:
    """A context in which ``backend``'s passes can be differentiated through: its own
    ``differentiable()`` where it has one (a host holding weights autograd cannot save for backward,
    e.g. ComfyUI's inference tensors), else nothing to do."""
    enter = getattr(backend, "differentiable", None)
    return enter() if enter is not None else contextlib.nullcontext()


def tensors_key(tensors: dict[str, torch.Tensor], how: str) -> str:
    """Hash of text-encoder tensors (name, dtype, shape, bytes) plus how its output is taken."""
    h = hashlib.sha256(how.encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
