"""Model families (SD 1.x, SD 2.x 512/768-v, SDXL base): their configs and detection from keys.

A family is plain data loaded from ``configs/<name>.json``: diffusers/transformers configs of the
UNet, VAE and text encoder(s), the file prefixes, the noise schedule, the prediction type, and how
each text encoder feeds cross-attention (which hidden layer, with or without the final norm).
Files we write for non-standard sizes (tiny test models, the toy world) carry the whole family
dict in their ``mace.arch`` metadata, so they load with no guessing.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import UnsupportedModelError

CONFIG_DIR = Path(__file__).parents[1] / "configs"
FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder: where it lives in the file and which of its outputs the UNet reads.

    ``layer`` indexes ``hidden_states`` from the end (-1 last, -2 penultimate = "clip skip 2");
    ``final_norm`` applies the final layer norm to that layer; ``projection`` marks the SDXL
    OpenCLIP-G encoder, whose projected pooled output also conditions the UNet.
    """

    prefix: str
    layout: str  # "hf" (CLIP-L keys) or "openclip" (SD2 / SDXL-G keys)
    config: dict
    layer: int = -1
    final_norm: bool = True
    pad_token: str = "<|endoftext|>"
    projection: bool = False

    @property
    def width(self) -> int:
        return int(self.config["hidden_size"])


@dataclass(frozen=True)
class Family:
    family: str
    architecture: str  # modelspec.architecture
    resolution: int
    prediction_type: str  # "epsilon" or "v_prediction"
    scheduler: dict
    unet: dict
    vae: dict
    text_encoders: tuple[TextEncoderSpec, ...] = field(default_factory=tuple)

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention context (the input of every attn2 to_k / to_v)."""
        return sum(te.width for te in self.text_encoders)

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def family_from_dict(d: Mapping) -> Family:
    d = dict(d)
    d["text_encoders"] = tuple(TextEncoderSpec(**te) for te in d["text_encoders"])
    return Family(**d)


def load_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UnsupportedModelError(f"unknown family {name!r}; supported: {', '.join(FAMILIES)}")
    return family_from_dict(json.loads((CONFIG_DIR / f"{name}.json").read_text()))


def with_clip_skip(fam: Family, clip_skip: int) -> Family:
    """The family with cross-attention fed from ``clip_skip`` layers before the last (A1111's meaning:
    1 = the family's default layer, 2 = one layer earlier, ...)."""
    if clip_skip < 1:
        raise UnsupportedModelError("clip skip counts from 1")
    for te in fam.text_encoders:
        layers = int(te.config.get("num_hidden_layers", 0))
        if layers and -(te.layer - (clip_skip - 1)) > layers:
            raise UnsupportedModelError(f"clip skip {clip_skip} is beyond this model's text encoder ({layers} layers): "
                                        f"use 1 to {layers + te.layer + 1}")
    tes = tuple(replace(te, layer=te.layer - (clip_skip - 1)) for te in fam.text_encoders)
    return replace(fam, text_encoders=tes)


_FOREIGN = [
    ("double_blocks.", "a FLUX model"),
    ("joint_blocks.", "an SD3 / SD3.5 model"),
    ("lora_down", "a LoRA adapter, not a full checkpoint"),
    ("lora_A", "a LoRA adapter (peft format), not a full checkpoint"),
    ("hada_w1", "a LyCORIS adapter, not a full checkpoint"),
    ("lora_unet_", "a LoRA adapter, not a full checkpoint"),
]
SUPPORTED = "Stable Diffusion 1.x, 2.x (512 and 768-v) or SDXL base single-file checkpoints or diffusers folders"


def detect_family(keys: Iterable[str], metadata: Mapping[str, str] | None = None,
                  name_hint: str = "", prediction_type: str | None = None) -> Family:
    """Pick the family of an ldm-layout state dict from its key names.

    ``metadata["mace.arch"]`` (written by us for non-standard sizes) wins; for SD2 the prediction
    type comes from ``prediction_type``, else ``modelspec.architecture``, else the file name.
    """
    keys = list(keys)
    metadata = metadata or {}
    if not keys:
        raise UnsupportedModelError(f"the file holds no tensors; expected {SUPPORTED}")
    if "mace.arch" in metadata:
        return _arch_family(metadata["mace.arch"])
    for marker, what in _FOREIGN:
        if any(marker in k for k in keys):
            raise UnsupportedModelError(f"this looks like {what} (found keys containing {marker!r}); "
                                        f"mace edits {SUPPORTED}")
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if not has_unet:
        if any(k.startswith(("encoder.down", "decoder.up", "first_stage_model.")) for k in keys):
            raise UnsupportedModelError("this looks like a VAE-only file (no UNet keys "
                                        f"'{UNET_PREFIX}*'); mace edits {SUPPORTED}")
        sample = ", ".join(sorted(keys)[:3])
        raise UnsupportedModelError(f"unknown model layout: no UNet keys '{UNET_PREFIX}*' (first keys: {sample}); "
                                    f"mace edits {SUPPORTED}")
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return load_family("sdxl")
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise UnsupportedModelError("this looks like the SDXL refiner (one OpenCLIP text encoder); it has no "
                                    "text path worth erasing from alone. Use the SDXL base model.")
    if any(k.startswith("cond_stage_model.model.transformer.") for k in keys):
        pred = prediction_type or _sd2_prediction(metadata, name_hint)
        return load_family("sd2-v" if pred == "v_prediction" else "sd2")
    if any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys):
        return load_family("sd1")
    if any(k.startswith("cond_stage_model.transformer.embeddings.") for k in keys):
        # Old SD1 files without the `text_model.` level (NAI-derived): same tensors, shorter prefix.
        fam = load_family("sd1")
        te = replace(fam.text_encoders[0], prefix="cond_stage_model.transformer.")
        return replace(fam, text_encoders=(te,))
    raise UnsupportedModelError("found UNet keys but no text encoder this tool knows "
                                f"(cond_stage_model.* / conditioner.embedders.*); mace edits {SUPPORTED}")


def _arch_family(text: str) -> Family:
    """The family a file's ``mace.arch`` metadata records, or a clear error when it is malformed."""
    try:
        fam = family_from_dict(json.loads(text))
        if not (isinstance(fam.unet, dict) and isinstance(fam.vae, dict) and fam.text_encoders
                and all(isinstance(te.config, dict) for te in fam.text_encoders)):
            raise ValueError("unet, vae and text_encoders must be configs")
        int(fam.resolution)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UnsupportedModelError(f"the file's mace.arch metadata is malformed ({type(e).__name__}: {e}); it was "
                                    "not written by mace or was edited: restore the file, or remove the mace.arch "
                                    "key to detect the model from its tensors") from None
    return fam


def _sd2_prediction(metadata: Mapping[str, str], name_hint: str) -> str:
    arch = metadata.get("modelspec.architecture", "")
    if arch.startswith("stable-diffusion-v2-768-v"):
        return "v_prediction"
    if arch.startswith("stable-diffusion-v2"):
        return "epsilon"
    hint = name_hint.lower()
    if any(s in hint for s in ("768-v", "768v", "v-pred", "vpred", "v_pred")):
        return "v_prediction"
    return "epsilon"


# ---------------------------------------------------------------------------------------------
# Sizes from tensor shapes (single files of a known layout at other sizes, as ComfyUI's
# model_detection reads them): distilled UNets with fewer transformer blocks (SSD-1B, Vega, BK-SDM),
# other widths, other text-encoder depths. What weights cannot tell (attention heads, norm groups)
# follows the family's convention: SD1 8 heads, SD2/SDXL and CLIP 64-wide heads, 32 norm groups.


def _count(shapes: Mapping[str, tuple], pattern: str) -> int:
    """How many distinct values ``(\\d+)`` in ``pattern`` (a regex on full keys) takes."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def _need(shapes: Mapping[str, tuple], key: str, what: str) -> tuple:
    if key not in shapes:
        raise UnsupportedModelError(f"cannot infer {what}: tensor {key!r} is missing; the file is incomplete or of "
                                    "an unknown layout")
    return shapes[key]


def _heads(width: int, what: str, sd1: bool = False) -> int:
    """Attention heads by the family's convention (SD1: 8; else 64 channels each, at least 1)."""
    heads = 8 if sd1 else max(1, width // 64)
    if width % heads:
        raise UnsupportedModelError(f"cannot infer the attention heads of {what} (width {width} is not a multiple "
                                    f"of {heads}, the convention of this family)")
    return heads


def infer_unet(fam: Family, shapes: Mapping[str, tuple]) -> dict:
    """The family's UNet config with the sizes read from the ldm-layout tensor ``shapes``."""
    p = UNET_PREFIX
    conv_in = _need(shapes, p + "input_blocks.0.0.weight", "the UNet's input width")
    levels: list[dict] = [{"res": 0, "depth": 0, "ch": 0}]
    i = 1
    while any(k.startswith(f"{p}input_blocks.{i}.") for k in shapes):
        if f"{p}input_blocks.{i}.0.op.weight" in shapes:  # a downsampler ends the level
            levels.append({"res": 0, "depth": 0, "ch": 0})
        else:
            lv = levels[-1]
            lv["res"] += 1
            lv["ch"] = _need(shapes, f"{p}input_blocks.{i}.0.out_layers.3.weight", "a UNet block's width")[0]
            lv["depth"] = max(lv["depth"], _count(shapes, rf"{re.escape(p)}input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\."))
        i += 1
    per_level = {lv["res"] for lv in levels}
    if len(per_level) != 1:
        raise UnsupportedModelError(f"cannot infer the UNet: its levels hold different numbers of blocks "
                                    f"({[lv['res'] for lv in levels]}), which the ldm layout cannot express")
    n = per_level.pop()
    channels = [int(lv["ch"]) for lv in levels]
    depths = [lv["depth"] for lv in levels]
    up_depths = [[_count(shapes, rf"{re.escape(p)}output_blocks\.{lvl * (n + 1) + j}\.1\.transformer_blocks\.(\d+)\.")
                  for j in range(n + 1)] for lvl in range(len(levels))]
    mid = _count(shapes, rf"{re.escape(p)}middle_block\.1\.transformer_blocks\.(\d+)\.")
    attn = [d > 0 for d in depths]
    if mid and mid != (depths[-1] or 1):
        raise UnsupportedModelError(f"cannot infer the UNet: its middle block has {mid} transformer blocks and its "
                                    f"deepest level {depths[-1] or 1}; diffusers builds them alike")
    proj = next((v for k, v in shapes.items() if k.startswith(p) and k.endswith("proj_in.weight")), None)
    unet = {**fam.unet, "in_channels": int(conv_in[1]), "out_channels": int(_need(shapes, p + "out.2.weight",
                                                                                     "the UNet's output")[0]),
            "layers_per_block": n, "block_out_channels": channels,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
            "cross_attention_dim": int(next(v for k, v in shapes.items() if k.endswith("attn2.to_k.weight"))[1]),
            "use_linear_projection": proj is not None and len(proj) == 2,
            "transformer_layers_per_block": [d or 1 for d in depths],
            "attention_head_dim": [_heads(c, f"UNet level {lvl}", fam.family == "sd1") for lvl, c in enumerate(channels)]}
    reverse = [[d or 1 for d in row] for row in up_depths]
    if reverse != [[unet["transformer_layers_per_block"][-1 - lvl]] * (n + 1) for lvl in range(len(levels))]:
        unet["reverse_transformer_layers_per_block"] = reverse
    if fam.family == "sd1":
        unet["attention_head_dim"] = 8
    if p + "label_emb.0.0.weight" in shapes:
        unet["projection_class_embeddings_input_dim"] = int(shapes[p + "label_emb.0.0.weight"][1])
    for c in channels:
        if c % unet["norm_num_groups"]:
            raise UnsupportedModelError(f"cannot infer the UNet's norm groups: width {c} is not a multiple of "
                                        f"{unet['norm_num_groups']}, this family's convention")
    return unet


def infer_vae(fam: Family, shapes: Mapping[str, tuple]) -> dict:
    """The family's VAE config with the widths read from the file."""
    p = VAE_PREFIX + "encoder.down."
    n = _count(shapes, rf"{re.escape(p)}(\d+)\.")
    if not n:
        return fam.vae
    chans = [int(_need(shapes, f"{p}{i}.block.0.conv2.weight", "the VAE's widths")[0]) for i in range(n)]
    latent = int(_need(shapes, VAE_PREFIX + "decoder.conv_in.weight", "the VAE's latent channels")[1])
    return {**fam.vae, "block_out_channels": chans, "latent_channels": latent,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "layers_per_block": _count(shapes, rf"{re.escape(p)}0\.block\.(\d+)\.")}


def infer_text_encoder(spec: TextEncoderSpec, shapes: Mapping[str, tuple]) -> TextEncoderSpec:
    """A text encoder's config with the sizes read from the file (hf or OpenCLIP layout)."""
    p = spec.prefix
    if spec.layout == "hf":
        tok, pos = p + "text_model.embeddings.token_embedding.weight", p + "text_model.embeddings.position_embedding.weight"
        if tok not in shapes:  # old SD1 files without the text_model level
            tok, pos = p + "embeddings.token_embedding.weight", p + "embeddings.position_embedding.weight"
        layers = _count(shapes, rf"{re.escape(p)}(?:text_model\.)?encoder\.layers\.(\d+)\.")
        fc = next((v for k, v in shapes.items() if k.startswith(p) and k.endswith("mlp.fc1.weight")), None)
        proj = None
    else:
        tok, pos = p + "token_embedding.weight", p + "positional_embedding"
        layers = _count(shapes, rf"{re.escape(p)}transformer\.resblocks\.(\d+)\.")
        fc = next((v for k, v in shapes.items() if k.startswith(p) and k.endswith("mlp.c_fc.weight")), None)
        proj = shapes.get(p + "text_projection")
    vocab, width = _need(shapes, tok, "the text encoder's width")
    cfg = {**spec.config, "vocab_size": int(vocab), "hidden_size": int(width), "num_hidden_layers": layers,
           "intermediate_size": int(fc[0]) if fc else spec.config["intermediate_size"],
           "max_position_embeddings": int(_need(shapes, pos, "the text encoder's context length")[0]),
           "num_attention_heads": _heads(int(width), "the text encoder")}
    if proj is not None:
        cfg["projection_dim"] = int(proj[1])
    layer = spec.layer
    if spec.layout == "openclip" and not spec.projection and -layer > layers:
        layer = -1
    return replace(spec, config=cfg, layer=layer)


def infer_family(fam: Family, shapes: Mapping[str, tuple]) -> Family:
    """``fam`` (detected from key names) with every size read from the tensor ``shapes``; the
    resolution follows the UNet's native latent size as the family's does."""
    unet = infer_unet(fam, shapes)
    vae = infer_vae(fam, shapes)
    tes = tuple(infer_text_encoder(te, shapes) for te in fam.text_encoders)
    if fam.is_sdxl:
        pooled = sum(int(te.config.get("projection_dim", 0)) for te in tes if te.projection)
        extra = unet["projection_class_embeddings_input_dim"] - pooled
        if extra <= 0 or extra % 6:
            raise UnsupportedModelError("cannot infer SDXL's size conditioning width from label_emb.0.0.weight")
        unet["addition_time_embed_dim"] = extra // 6
    return replace(fam, unet=unet, vae=vae, text_encoders=tes)
