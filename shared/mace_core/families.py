"""Model families (SD 1.x, SD 2.x 512/768-v, SDXL base): their configs and detection from keys.

A family is plain data loaded from ``configs/<name>.json``: diffusers/transformers configs of the
UNet, VAE and text encoder(s), the file prefixes, the noise schedule, the prediction type, and how
each text encoder feeds cross-attention (which hidden layer, with or without the final norm).
Files we write for non-standard sizes (tiny test models, the toy world) carry the whole family
dict in their ``mace.arch`` metadata, so they load with no guessing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping

from .errors import UnsupportedModelError

CONFIG_DIR = Path(__file__).parent / "configs"
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
        raise ValueError("clip skip counts from 1")
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
        return family_from_dict(json.loads(metadata["mace.arch"]))
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
