"""Key maps between the original (ldm/sgm) single-file layout and diffusers/transformers modules.

All format conversion lives here, in one table per component, used in both directions: loading a
single file into diffusers modules and writing diffusers modules out as a single file. Each
`Entry` ties one tensor of the file to one or more tensors of a module state dict:

- ``same``: identical tensor, same shape;
- ``conv1x1``: file holds a 1x1 conv ``[C, C, 1, 1]``, module a linear ``[C, C]`` (SD VAE attention);
- ``transpose``: file holds ``[C, P]``, module ``[P, C]`` (OpenCLIP ``text_projection``);
- ``qkv``: file holds a fused ``in_proj`` ``[3C, ...]``, module q/k/v ``[C, ...]`` each (OpenCLIP).

Module keys are canonical: transformers >= 5.6 drops the ``text_model.`` prefix of ``CLIPTextModel``
state dicts while ``CLIPTextModelWithProjection`` keeps it; `canonical_clip_key` strips it and the
loader maps it back for whatever the installed transformers expects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal

import torch

Kind = Literal["same", "conv1x1", "transpose", "qkv"]


@dataclass(frozen=True)
class Entry:
    """One file tensor and the module tensor(s) it corresponds to."""

    file_key: str
    module_keys: tuple[str, ...]
    kind: Kind = "same"

    def to_module(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.kind == "same":
            return [t]
        if self.kind == "conv1x1":
            return [t.reshape(t.shape[0], t.shape[1])]
        if self.kind == "transpose":
            return [t.t().contiguous()]
        return [c.contiguous() for c in t.chunk(3, dim=0)]

    def to_file(self, ts: list[torch.Tensor]) -> torch.Tensor:
        if self.kind == "same":
            return ts[0]
        if self.kind == "conv1x1":
            return ts[0].reshape(*ts[0].shape, 1, 1)
        if self.kind == "transpose":
            return ts[0].t().contiguous()
        return torch.cat(ts, dim=0)


# --------------------------------------------------------------------------------------------
# UNet


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _layers(config: dict) -> int:
    lpb = config.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        if len(set(lpb)) != 1:
            raise ValueError("per-block layers_per_block is not supported by the ldm layout")
        lpb = lpb[0]
    return lpb


def unet_file_key(key: str, config: dict) -> str:
    """Map a diffusers ``UNet2DConditionModel`` state-dict key to its ldm key (no prefix)."""
    n = _layers(config)
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    head, _, rest = key.partition(".")
    simple = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if head in simple:
        return f"{simple[head]}.{rest}"
    if head == "time_embedding":
        lin, _, p = rest.partition(".")
        return f"time_embed.{ {'linear_1': 0, 'linear_2': 2}[lin] }.{p}"
    if head == "add_embedding":
        lin, _, p = rest.partition(".")
        return f"label_emb.0.{ {'linear_1': 0, 'linear_2': 2}[lin] }.{p}"
    if head == "mid_block":
        m = re.match(r"(resnets|attentions)\.(\d+)\.(.*)", rest)
        kind, j, p = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return f"middle_block.1.{p}"
        return f"middle_block.{0 if j == 0 else 2}.{_resnet(p)}"
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
    if not m:
        raise KeyError(f"no ldm name for UNet key {key!r}")
    blocks, i, kind, j, p = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if blocks == "down_blocks":
        base = 1 + i * (n + 1)
        if kind == "resnets":
            return f"input_blocks.{base + j}.0.{_resnet(p)}"
        if kind == "attentions":
            return f"input_blocks.{base + j}.1.{p}"
        return f"input_blocks.{base + n}.0.op.{p.removeprefix('conv.')}"
    base = i * (n + 1)
    if kind == "resnets":
        return f"output_blocks.{base + j}.0.{_resnet(p)}"
    if kind == "attentions":
        return f"output_blocks.{base + j}.1.{p}"
    return f"output_blocks.{base + n}.{2 if up_has_attn[i] else 1}.{p}"


def _resnet(p: str) -> str:
    name, _, rest = p.partition(".")
    return f"{_RESNET[name]}.{rest}"


def unet_entries(module_keys: Iterable[str], config: dict, prefix: str) -> list[Entry]:
    return [Entry(prefix + unet_file_key(k, config), (k,)) for k in module_keys]


# --------------------------------------------------------------------------------------------
# VAE


def vae_entries(module_keys: Iterable[str], config: dict, prefix: str) -> list[Entry]:
    """Entries for a diffusers ``AutoencoderKL`` against the ldm ``first_stage_model`` layout."""
    n_up = len(config["up_block_types"])
    out = []
    for k in module_keys:
        fk, kind = k, "same"
        fk = re.sub(r"(encoder|decoder)\.conv_norm_out", r"\1.norm_out", fk)
        fk = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", fk)
        fk = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", fk)
        fk = re.sub(r"decoder\.up_blocks\.(\d+)\.",
                    lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.", fk)
        fk = re.sub(r"(decoder\.up\.\d+\.)resnets\.", r"\1block.", fk)
        fk = re.sub(r"(decoder\.up\.\d+\.)upsamplers\.0\.", r"\1upsample.", fk)
        fk = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", fk)
        fk = fk.replace("conv_shortcut", "nin_shortcut")
        m = re.match(r"(.*)mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", fk)
        if m:
            name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m.group(2)]
            fk = f"{m.group(1)}mid.attn_1.{name}.{m.group(3)}"
            if name != "norm" and m.group(3) == "weight":
                kind = "conv1x1"
        out.append(Entry(prefix + fk, (k,), kind))
    return out


# --------------------------------------------------------------------------------------------
# Text encoders


def canonical_clip_key(k: str) -> str:
    return k.removeprefix("text_model.")


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def clip_entries(module_keys: Iterable[str], layout: str, prefix: str) -> list[Entry]:
    """Entries for a transformers CLIP text model, in HF (SD1/SDXL-L) or OpenCLIP (SD2/SDXL-G) layout.

    ``module_keys`` are the module's own state-dict keys (with or without ``text_model.``).
    """
    keys = list(module_keys)
    if layout == "hf":
        return [Entry(prefix + canonical_clip_key(k), (k,)) for k in keys]
    by_canon = {canonical_clip_key(k): k for k in keys}
    out: list[Entry] = []
    for ck, k in by_canon.items():
        if ck == "embeddings.token_embedding.weight":
            out.append(Entry(prefix + "token_embedding.weight", (k,)))
        elif ck == "embeddings.position_embedding.weight":
            out.append(Entry(prefix + "positional_embedding", (k,)))
        elif ck.startswith("final_layer_norm."):
            out.append(Entry(prefix + "ln_final." + ck.split(".")[-1], (k,)))
        elif ck == "text_projection.weight":
            out.append(Entry(prefix + "text_projection", (k,), "transpose"))
        else:
            m = re.match(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", ck)
            if not m:
                raise KeyError(f"no OpenCLIP name for text-encoder key {k!r}")
            i, name, p = m.groups()
            if name == "self_attn.q_proj":
                qkv = tuple(by_canon[f"encoder.layers.{i}.self_attn.{x}_proj.{p}"] for x in "qkv")
                out.append(Entry(f"{prefix}transformer.resblocks.{i}.attn.in_proj_{p}", qkv, "qkv"))
            elif name in ("self_attn.k_proj", "self_attn.v_proj"):
                continue  # part of the fused in_proj entry
            else:
                out.append(Entry(f"{prefix}transformer.resblocks.{i}.{_OPENCLIP_LAYER[name]}.{p}", (k,)))
    return out



def attn2_name(diffusers_key: str, config: dict, prefix: str = "model.diffusion_model.") -> str:
    """ldm name of a diffusers attn2 module path, e.g. ``down_blocks.0.attentions.0...attn2``."""
    return prefix + unet_file_key(diffusers_key + ".to_k.weight", config).removesuffix(".to_k.weight")


def apply(entries: list[Entry], source: dict[str, torch.Tensor],
          direction: Literal["to_module", "to_file"]) -> dict[str, torch.Tensor]:
    """Convert a state dict through ``entries`` in one direction; missing tensors raise KeyError."""
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        if direction == "to_module":
            for k, t in zip(e.module_keys, e.to_module(source[e.file_key])):
                out[k] = t
        else:
            out[e.file_key] = e.to_file([source[k] for k in e.module_keys])
    return out

