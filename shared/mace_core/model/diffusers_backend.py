"""`Backend` over diffusers/transformers modules: the CLI's, the tests' and the toy world's model."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import torch

from .backend import CrossAttentionLayer, TextBatch
from .checkpoint import MEMORY, Checkpoint, Components, build_components, load_checkpoint
from .families import Family, with_clip_skip
from .keymap import attn2_name

POOLED_KEY = "model.diffusion_model.label_emb.0.0.weight"
HOST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # a host's weights the stages can run in as they are


def alphas_cumprod(scheduler: dict) -> torch.Tensor:
    """SD's training schedule, [num_train_timesteps] float64."""
    n = scheduler["num_train_timesteps"]
    b0, b1 = scheduler["beta_start"], scheduler["beta_end"]
    if scheduler.get("beta_schedule", "scaled_linear") == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(b0, b1, n, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class DiffusersBackend:
    """A model held as diffusers UNet/VAE and transformers CLIP text encoder(s)."""

    def __init__(self, components: Components, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 offload: bool = False):
        """``offload``: keep the text encoder(s) and the VAE in CPU memory while the UNet runs (they are
        idle then: prompts are encoded before a sampling or training loop, images decoded after it),
        fetched back when next used. Only worth it on a GPU; the outputs are the same either way."""
        self.components = components
        self.family: Family = components.family
        self.family_name = self.family.family
        self.prediction_type = self.family.prediction_type
        self.device = torch.device(device)
        self.dtype = dtype
        self.resolution = self.family.resolution
        self.latent_channels = int(self.family.vae["latent_channels"])
        self.vae_scale = 2 ** (len(self.family.vae["block_out_channels"]) - 1)
        self.alphas_cumprod = alphas_cumprod(self.family.scheduler)
        _move(self._modules(), self.device)
        self._layers = self._find_layers()
        self.offload = offload
        self.resident = {"text", "unet", "vae"}  # parts on self.device (the others are parked on the CPU)
        self._text_in_graph = False  # the last encoding is being differentiated: its encoder must stay put

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, device: str = "auto", dtype: torch.dtype | None = None,
                        clip_skip: int = 1) -> "DiffusersBackend":
        """The model on ``device`` (auto: cuda when available) in ``dtype``.

        Default dtype: fp16 on CUDA, fp32 elsewhere; on CUDA a checkpoint from a host's memory keeps
        the host's dtype, so its tensors are shared rather than copied, and a host run in fp32
        because its GPU computes fp16 badly (A1111 ``--no-half``) is not switched to fp16. The
        modules are built on ``device`` directly, so tensors already there are not copied either.
        """
        dev = resolve_device(device)
        if dtype is None:
            dtype = torch.float16 if dev.type == "cuda" else torch.float32
            if ckpt.source_format == MEMORY and dev.type == "cuda" and ckpt.dtype in HOST_DTYPES:
                dtype = ckpt.dtype
        if clip_skip != 1:
            ckpt = Checkpoint(ckpt.path, with_clip_skip(ckpt.family, clip_skip), ckpt.tensors, ckpt.metadata,
                              ckpt.source_format, ckpt._sha256)
        # Parking a host's tensors would free nothing (the host still holds them) and copy them to RAM.
        offload = dev.type == "cuda" and ckpt.source_format != MEMORY
        return cls(build_components(ckpt, dtype=dtype, device=dev), dev, dtype, offload)

    @classmethod
    def from_file(cls, path: str | Path, **kw) -> "DiffusersBackend":
        return cls.from_checkpoint(load_checkpoint(path), **kw)

    def _modules(self, part: str | None = None) -> list[torch.nn.Module]:
        c = self.components
        parts = {"unet": [c.unet], "vae": [c.vae], "text": list(c.text_encoders)}
        return parts[part] if part else [m for ms in parts.values() for m in ms]

    def _use(self, part: str) -> None:
        """Make ``part`` ("text", "unet", "vae") resident; with ``offload``, a UNet pass first parks the
        text encoders (unless a graph through them is alive) and the VAE on the CPU."""
        if not self.offload:
            return
        if part == "unet":
            for idle in ("vae",) if self._text_in_graph else ("text", "vae"):
                if idle in self.resident:
                    _move(self._modules(idle), torch.device("cpu"))
                    self.resident.discard(idle)
        if part not in self.resident:
            _move(self._modules(part), self.device)
            self.resident.add(part)

    def _find_layers(self) -> list[CrossAttentionLayer]:
        out = []
        for path, mod in self.components.unet.named_modules():
            if path.endswith("attn2"):
                out.append(CrossAttentionLayer(attn2_name(path, self.family.unet), mod.to_q, mod.to_k, mod.to_v,
                                               mod.heads))
        return out

    # --- text -------------------------------------------------------------------------------

    def text_encoder_key(self) -> str:
        from .backend import tensors_key

        tensors = {f"{i}.{k}": v for i, te in enumerate(self.components.text_encoders) for k, v in te.state_dict().items()}
        how = repr([(s.layer, s.final_norm) for s in self.family.text_encoders])
        return tensors_key(tensors, how)

    def tokenize(self, prompt: str) -> list[int]:
        return list(token_ids(self.components.tokenizers[0], prompt))

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextBatch:
        return self.encode_with_grad(prompts)

    def encode_with_grad(self, prompts: Sequence[str]) -> TextBatch:
        """`encode` inside autograd (the embedding attack optimises token embeddings through it)."""
        self._text_in_graph = torch.is_grad_enabled()
        self._use("text")
        contexts, pooled, ids0 = [], None, None
        for te, tok, spec in zip(self.components.text_encoders, self.components.tokenizers, self.family.text_encoders):
            ids = padded_ids(tok, prompts).to(self.device)
            ids0 = ids if ids0 is None else ids0
            out = te(ids, output_hidden_states=True)
            h = out.hidden_states[spec.layer]
            if spec.final_norm:
                h = _final_norm(te)(h)
            contexts.append(h)
            if spec.projection:
                pooled = out.text_embeds
        return TextBatch(torch.cat(contexts, dim=-1), ids0, pooled)

    def text_token_embeddings(self) -> list[torch.nn.Module]:
        """The token-embedding module of each text encoder (for the embedding attack's hook)."""
        return [next(m for n, m in te.named_modules() if n.endswith("token_embedding"))
                for te in self.components.text_encoders]

    # --- UNet -------------------------------------------------------------------------------

    def cross_attention(self) -> list[CrossAttentionLayer]:
        return self._layers

    def original_weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer in self._layers:
            out[layer.k_key] = layer.to_k.weight.detach().float().cpu()
            out[layer.v_key] = layer.to_v.weight.detach().float().cpu()
        if self.family.is_sdxl:
            out[POOLED_KEY] = self.components.unet.add_embedding.linear_1.weight.detach().float().cpu()
        return out

    def predict(self, latents: torch.Tensor, t: torch.Tensor, text: TextBatch) -> torch.Tensor:
        self._use("unet")
        unet = self.components.unet
        kw = {}
        if self.family.is_sdxl:
            h, w = latents.shape[-2] * self.vae_scale, latents.shape[-1] * self.vae_scale
            time_ids = torch.tensor([h, w, 0, 0, h, w], device=self.device, dtype=self.dtype)
            kw["added_cond_kwargs"] = {"text_embeds": text.pooled.to(self.device, self.dtype),
                                       "time_ids": time_ids.expand(latents.shape[0], 6)}
        return unet(latents.to(self.device, self.dtype), t.to(self.device),
                    encoder_hidden_states=text.context.to(self.device, self.dtype), **kw).sample

    def gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the UNet's block activations in backward passes instead of keeping them."""
        if enabled:
            self.components.unet.enable_gradient_checkpointing()
        else:
            self.components.unet.disable_gradient_checkpointing()

    # --- VAE --------------------------------------------------------------------------------

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        self._use("vae")
        vae = self.components.vae
        return vae.decode(latents.to(self.device, self.dtype) / vae.config.scaling_factor).sample.clamp(-1, 1)


def _move(modules: Sequence[torch.nn.Module], device: torch.device) -> None:
    """Move modules to ``device``, leaving alone those already there (no copy, no tree walk)."""
    for m in modules:
        if any(p.device != device for p in m.parameters()):
            m.to(device)


@functools.lru_cache(maxsize=4096)
def token_ids(tok, prompt: str) -> tuple[int, ...]:
    """Ids of one prompt with start/end tokens, untruncated. Cached: stage 1 tokenises every template
    prompt twice (encoding, alignment) and the anchor's prompts once per concept."""
    return tuple(tok(prompt, truncation=False).input_ids)


def padded_ids(tok, prompts: Sequence[str]) -> torch.Tensor:
    """[B, T] token ids, truncated to T keeping the end token, padded with the pad token.

    Per-prompt calls: transformers' batched padding path is ~40x slower for short prompts."""
    n = tok.model_max_length
    rows = []
    for p in prompts:
        ids = list(token_ids(tok, p))
        if len(ids) > n:
            ids = ids[:n - 1] + ids[-1:]
        rows.append(ids + [tok.pad_token_id] * (n - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def _final_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    for name, mod in text_encoder.named_modules():
        if name.endswith("final_layer_norm"):
            return mod
    raise AttributeError("text encoder has no final_layer_norm")
