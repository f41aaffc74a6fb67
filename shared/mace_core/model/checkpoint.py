"""Model files in and out: single-file checkpoints (.safetensors, .ckpt) and diffusers folders.

Loading reads a file into an ldm-layout state dict (`Checkpoint`) and, on request, builds
diffusers/transformers modules from it through `keymap`. A model a host already holds in memory
in the same layout (A1111's ``sd_model.state_dict()``) becomes a `Checkpoint` through the same
function (`checkpoint_from_state_dict`), so both give the same modules. Saving an erasure never
re-converts: it copies the input file's tensors and replaces only the edited ones, so every other
tensor is bit-identical and keeps its dtype. Writes are atomic (temp file + rename) and refuse to
touch the input file.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..errors import MaceError, UnsupportedModelError
from ..files import save_tensors, write_text
from .families import (UNET_PREFIX, VAE_PREFIX, Family, TextEncoderSpec, detect_family, family_from_dict, infer_family,
                       load_family)
from .keymap import Entry, apply, clip_entries, unet_entries, vae_entries

TOKENIZER_DIR = Path(__file__).parents[1] / "data" / "clip_tokenizer"
_HASH_PLACEHOLDER = "0x" + "0" * 64
#: `Checkpoint.source_format` of a model taken from a host's memory rather than read from its file
MEMORY = "memory"

log = logging.getLogger("mace.checkpoint")


@dataclass
class Checkpoint:
    """A loaded model: its family and its tensors in the original (ldm) layout.

    ``tensors`` maps full file keys (e.g. ``model.diffusion_model.input_blocks.1.1...``) to CPU
    tensors in the file's dtypes; for ``source_format == MEMORY`` to the host's own tensors (its
    device and dtypes, shared, not copied), while ``path`` is still the file they came from.
    """

    path: Path
    family: Family
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "safetensors"
    _sha256: str | None = None

    @property
    def sha256(self) -> str:
        """sha256 of the input file (of model_index.json + weights for a folder), as `sha256sum` prints."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    @property
    def dtype(self) -> torch.dtype:
        key = next(k for k in self.tensors if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
        return self.tensors[key].dtype


@dataclass
class Components:
    """diffusers/transformers modules built from a checkpoint (eval mode, no grad)."""

    family: Family
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a .safetensors file without reading its tensors."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    return dict(_read_header(path)[0].get("__metadata__") or {})


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UnsupportedModelError(f"{path}: file is truncated ({size} bytes); it is not a complete .safetensors file")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise UnsupportedModelError(f"{path}: corrupt or truncated .safetensors header "
                                        f"(header says {n} bytes, file has {size}); re-download the file")
        try:
            header = json.loads(f.read(n))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise UnsupportedModelError(f"{path}: corrupt .safetensors header ({e!r}); re-download or re-copy "
                                        "the file") from None
    if ends and 8 + n + max(ends) > size:
        raise UnsupportedModelError(f"{path}: file is truncated ({size} bytes, tensors need {8 + n + max(ends)}); "
                                    "re-download or re-copy it")
    return header, n


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file, checked first (a regular, complete file), or
    `UnsupportedModelError` naming the file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MaceError(f"file not found: {path}" if not path.exists() else f"{path} is not a regular file")
    header, _ = _read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise UnsupportedModelError(f"{path}: cannot read tensors ({e}); the file is damaged") from None
    return tensors, dict(header.get("__metadata__") or {})


def load_checkpoint(path: str | Path, prediction_type: str | None = None, family: Family | None = None,
                    sha256: str | None = None) -> Checkpoint:
    """Read a model file or diffusers folder into an ldm-layout `Checkpoint`.

    ``family`` overrides detection (a caller that knows the architecture of a file without metadata);
    ``sha256`` is the file's hash when the caller already knows it (a web UI caches it), which
    spares reading the whole file again to compute it.

    Raises `MaceError` with what was found and what is supported for anything else.
    """
    path = Path(path)
    if not path.exists():
        raise MaceError(f"model not found: {path}")
    if not path.is_dir() and not path.is_file():  # a FIFO or device would block or never end
        raise MaceError(f"{path} is not a regular file or a diffusers folder; give the model file itself")
    if path.is_dir():
        ckpt = _load_diffusers_folder(path, prediction_type)
        ckpt._sha256 = sha256
        return ckpt
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors, metadata = load_tensors(path)
        fmt = "safetensors"
    elif suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise UnsupportedModelError(f"{path}: cannot read as a weights-only torch checkpoint ({e}). "
                                        "Files that need pickled code are refused for safety; convert to "
                                        ".safetensors with a trusted tool.") from None
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        tensors, metadata, fmt = sd if isinstance(sd, dict) else {}, {}, "ckpt"
    else:
        raise UnsupportedModelError(f"{path}: unsupported file type {suffix!r}; expected .safetensors, .ckpt "
                                    "or a diffusers folder")
    return checkpoint_from_state_dict(tensors, path, metadata, prediction_type=prediction_type, family=family,
                                      sha256=sha256, source_format=fmt)


def checkpoint_from_state_dict(state_dict: Mapping[str, object], path: str | Path,
                               metadata: Mapping[str, str] | None = None, *, prediction_type: str | None = None,
                               family: Family | None = None, sha256: str | None = None,
                               source_format: str = MEMORY) -> Checkpoint:
    """A `Checkpoint` of an ldm-layout state dict: the one way from tensors to a checkpoint, for a
    file (`load_checkpoint`) and for a model a host holds in memory (A1111's ``sd_model.state_dict()``
    with its wrappers' names removed), so both detect the same family and build the same modules.

    ``path`` is the model's file: it names the model and, for a checkpoint from memory, is what
    `save_edited` writes the output from. ``metadata`` is the file's (`read_metadata` reads just the
    header); ``sha256`` the file's hash when known (else computed from the file on first use).
    Non-tensor values are dropped; tensors are kept as they are (any device and dtype, no copy),
    except inference tensors (made under ``torch.inference_mode``), which autograd cannot save for
    the LoRA training's backward pass: those are copied.

    Raises `UnsupportedModelError` when the keys or shapes are not a supported family's.
    """
    path = Path(path)
    metadata = dict(metadata or {})
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    inference = [k for k, v in tensors.items() if v.is_inference()]
    if inference:
        log.info("copying %d inference tensors of %s so that training can backpropagate through them",
                 len(inference), path.name)
        tensors.update({k: tensors[k].clone() for k in inference})
    ckpt = Checkpoint(path, family or detect_family(tensors.keys(), metadata, path.name, prediction_type), tensors,
                      metadata, source_format, sha256)
    try:
        _check_layout(ckpt)
    except UnsupportedModelError:
        if family is not None or "mace.arch" in metadata:
            raise
        # a known layout at other sizes (distilled or custom-width models): sizes from the tensors' shapes
        ckpt.family = infer_family(ckpt.family, {k: tuple(v.shape) for k, v in tensors.items()})
        _check_layout(ckpt)
        log.info("%s: %s layout at non-standard sizes; config inferred from its tensors", path.name,
                 ckpt.family.family)
    _check_values(ckpt)
    return ckpt


def _check_layout(ckpt: Checkpoint) -> None:
    """Every tensor the family needs is present with the right shape (else a clear error)."""
    for entries, modules in _entries_and_shapes(ckpt.family):
        for e in entries:
            t = ckpt.tensors.get(e.file_key)
            if t is None:
                raise UnsupportedModelError(
                    f"{ckpt.path.name}: looks like {ckpt.family.family} but tensor {e.file_key!r} is missing; "
                    "the file is incomplete or of an unsupported variant (inpainting, refiner, pruned text encoder)")
            want = e.to_file([torch.empty(modules[k], device="meta") for k in e.module_keys]).shape
            if tuple(t.shape) != tuple(want):
                raise UnsupportedModelError(
                    f"{ckpt.path.name}: looks like {ckpt.family.family} but {e.file_key} has shape "
                    f"{list(t.shape)}, expected {list(want)}; unknown layout")


def _check_values(ckpt: Checkpoint) -> None:
    """The model's weights are floating point and the ones an erasure edits finite (else a clear error)."""
    for entries, _ in _entries_and_shapes(ckpt.family):
        for e in entries:
            t = ckpt.tensors[e.file_key]
            if not t.is_floating_point() and not e.file_key.endswith("position_ids"):
                raise UnsupportedModelError(
                    f"{ckpt.path.name}: {e.file_key} is {str(t.dtype).removeprefix('torch.')}; quantized or integer "
                    "weights are not supported: use the fp16/fp32/bf16 checkpoint")
    for k, t in ckpt.tensors.items():
        if k.startswith(UNET_PREFIX) and k.endswith(EDITED_SUFFIXES) and not bool(torch.isfinite(t).all()):
            raise UnsupportedModelError(f"{ckpt.path.name}: {k} holds NaN or infinite values; the checkpoint is "
                                        "damaged (a bad merge or fp16 overflow): use an intact copy")


#: the UNet weights an erasure edits (cross-attention keys/values, SDXL's pooled-text projection)
EDITED_SUFFIXES = ("attn2.to_k.weight", "attn2.to_v.weight", "label_emb.0.0.weight")


def _entries_and_shapes(fam: Family) -> list[tuple[list[Entry], dict[str, torch.Size]]]:
    """Each component's key map and module tensor shapes (shared: callers must not modify them)."""
    return _entries_and_shapes_of(fam.to_json())


@functools.lru_cache(maxsize=16)
def _entries_and_shapes_of(family_json: str) -> list[tuple[list[Entry], dict[str, torch.Size]]]:
    # cached: building even meta modules costs about a second (diffusers initialises every weight)
    fam = family_from_dict(json.loads(family_json))
    out = []
    for comp, entries in _component_entries(fam, _meta_modules(fam)):
        out.append((entries, {k: v.shape for k, v in comp.state_dict().items()}))
    return out


def _meta_modules(fam: Family) -> tuple[torch.nn.Module, torch.nn.Module, list[torch.nn.Module]]:
    with torch.device("meta"):
        return _build_unet(fam), _build_vae(fam), [_build_text_encoder(te) for te in fam.text_encoders]


def _build_unet(fam: Family):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**fam.unet)


def _build_vae(fam: Family):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**fam.vae)


def _build_text_encoder(spec: TextEncoderSpec):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**spec.config)
    return CLIPTextModelWithProjection(cfg) if spec.projection else CLIPTextModel(cfg)


def _component_entries(fam: Family, modules) -> list[tuple[torch.nn.Module, list[Entry]]]:
    unet, vae, tes = modules
    out = [(unet, unet_entries(unet.state_dict().keys(), fam.unet, UNET_PREFIX)),
           (vae, vae_entries(vae.state_dict().keys(), fam.vae, VAE_PREFIX))]
    for te, spec in zip(tes, fam.text_encoders):
        keys = [k for k in te.state_dict().keys() if not k.endswith("position_ids")]
        out.append((te, clip_entries(keys, spec.layout, spec.prefix)))
    return out


def build_components(ckpt: Checkpoint, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> Components:
    """Instantiate UNet, VAE and text encoder(s) from the checkpoint's tensors (strict: every
    module tensor must come from the file, so nothing is silently left at random init).

    A tensor already on ``device`` in ``dtype`` is used as it is, not copied: modules built from a
    host's in-memory checkpoint share its storage (never written: the stages edit through hooks).
    """
    fam = ckpt.family
    modules = _meta_modules(fam)
    for module, entries in _component_entries(fam, modules):
        sd = apply(entries, ckpt.tensors, "to_module")
        sd = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in sd.items()}
        for k, buf in module.state_dict().items():
            if k.endswith("position_ids") and k not in sd:  # persistent in transformers < 4.31, never in files we need
                sd[k] = torch.arange(buf.shape[-1], device=device).expand(buf.shape)
        _assign(module, sd)
        _materialize_buffers(module, device)
        module.requires_grad_(False).eval()
    unet, vae, tes = modules
    return Components(fam, unet, vae, list(tes), [make_tokenizer(te) for te in fam.text_encoders])


def _assign(module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """``module.load_state_dict(sd, strict=True, assign=True)`` without torch's method: A1111 replaces
    ``torch.nn.Module.load_state_dict`` process-wide while it loads a model (its ``LoadStateDictOnMeta``,
    with no ``assign``), and a tab job started meanwhile called its version and failed."""
    want = module.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise RuntimeError(f"{type(module).__name__}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, value in sd.items():
        if value.shape != want[key].shape:
            raise RuntimeError(f"{type(module).__name__}: size mismatch for {key}: {tuple(value.shape)} in the "
                               f"checkpoint, {tuple(want[key].shape)} in the model")
        owner, _, name = key.rpartition(".")
        sub = module.get_submodule(owner)
        if name in sub._parameters:
            sub._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
        else:
            sub._buffers[name] = value


def _materialize_buffers(module: torch.nn.Module, device) -> None:
    """Non-persistent buffers are not in any file; rebuild the known ones (CLIP position ids)."""
    for name, buf in list(module.named_buffers()):
        if not buf.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise RuntimeError(f"buffer {name} has no value after loading")
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        parent.register_buffer(attr, torch.arange(buf.shape[-1], device=device).expand(buf.shape), persistent=False)


def make_tokenizer(spec: TextEncoderSpec):
    """The CLIP BPE tokenizer from the shipped vocabulary (offline), with the encoder's pad token."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
                         model_max_length=spec.config.get("max_position_embeddings", 77), pad_token=spec.pad_token)


# ---------------------------------------------------------------------------------------------
# diffusers folders


_DIFFUSERS_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionXLPipeline"}


def _load_diffusers_folder(path: Path, prediction_type: str | None) -> Checkpoint:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UnsupportedModelError(f"{path}: a folder without model_index.json is not a diffusers model; "
                                    f"expected {SUPPORTED_FILES}")
    index = json.loads(index_file.read_text())
    cls = index.get("_class_name", "?")
    if cls not in _DIFFUSERS_PIPELINES:
        raise UnsupportedModelError(f"{path}: diffusers pipeline {cls!r} is not supported; expected one of "
                                    f"{sorted(_DIFFUSERS_PIPELINES)}")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True)
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    pred = prediction_type or sched.get("prediction_type", "epsilon")
    if cls == "StableDiffusionXLPipeline":
        base = load_family("sdxl")
        tes = [CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True),
               CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", local_files_only=True)]
    else:
        tes = [CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)]
        # the text encoder says which: SD1's is OpenAI CLIP (quick_gelu), SD2's OpenCLIP (gelu), at any width
        name = index.get("_mace_family") or ("sd1" if tes[0].config.hidden_act == "quick_gelu" else "sd2")
        base = load_family("sd2-v" if name.startswith("sd2") and pred == "v_prediction" else name)
    specs = []
    for te, spec in zip(tes, base.text_encoders):
        cfg = {k: v for k, v in te.config.to_dict().items() if k in spec.config}
        layer = spec.layer
        if spec.layout == "openclip" and not spec.projection and cfg["num_hidden_layers"] == 23:
            layer = -1  # diffusers' SD2 text encoder already dropped the last layer
        specs.append(TextEncoderSpec(**{**spec.__dict__, "config": cfg, "layer": layer}))
    # the folder's own configs are the model: its native resolution is the UNet's latent size times the VAE's scale
    resolution = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    fam = family_from_dict({**_family_dict(base), "prediction_type": pred, "resolution": resolution,
                            "unet": _public(unet.config), "vae": _public(vae.config), "text_encoders": []})
    fam = Family(**{**fam.__dict__, "text_encoders": tuple(specs)})
    ckpt = Checkpoint(path, fam, modules_to_file_tensors(fam, unet, vae, tes), {}, "diffusers")
    _check_values(ckpt)
    return ckpt


SUPPORTED_FILES = ".safetensors, .ckpt or a diffusers folder (model_index.json)"


def _public(config: Mapping) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _family_dict(fam: Family) -> dict:
    return json.loads(fam.to_json())


def modules_to_file_tensors(fam: Family, unet, vae, text_encoders) -> dict[str, torch.Tensor]:
    """ldm-layout state dict of diffusers/transformers modules (inverse of `build_components`)."""
    out: dict[str, torch.Tensor] = {}
    for module, entries in _component_entries(fam, (unet, vae, text_encoders)):
        sd = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        out.update(apply(entries, sd, "to_file"))
    return out


# ---------------------------------------------------------------------------------------------
# Writing


def modelspec(fam: Family, title: str, description: str = "") -> dict[str, str]:
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": fam.architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if fam.is_sdxl else "https://github.com/Stability-AI/stablediffusion",
        "modelspec.title": title,
        "modelspec.resolution": f"{fam.resolution}x{fam.resolution}",
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "modelspec.description": description,
        "modelspec.hash_sha256": _HASH_PLACEHOLDER,
    }


def write_safetensors(tensors: Mapping[str, torch.Tensor], out: str | Path, metadata: Mapping[str, str],
                      protect: tuple[Path, ...] = (), overwrite: bool = False, what: str = "--out") -> Path:
    """Write ``tensors`` to ``out`` through `files.save_tensors` (checked, atomic, ordinary mode;
    never over ``protect``, the command's inputs, nor over an existing file unless ``overwrite``);
    fills ``modelspec.hash_sha256`` (sha256 of the tensor data section, as kohya's sd-scripts
    compute it) when the metadata asks for it."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise MaceError(f"{what} must be a .safetensors file, got {out.name!r}")
    fill = fill_modelspec_hash if metadata.get("modelspec.hash_sha256") == _HASH_PLACEHOLDER else None
    return save_tensors(out, tensors, metadata, then=fill, inputs=protect, overwrite=overwrite, what=what)


def fill_modelspec_hash(path: Path) -> None:
    """Replace the hash placeholder in the header (same length) with the data section's sha256."""
    digest = data_sha256(path)
    _, n = _read_header(path)
    with open(path, "r+b") as f:
        header = f.read(8 + n)
        f.seek(header.find(_HASH_PLACEHOLDER.encode()))
        f.write(digest.encode())
        f.flush()
        os.fsync(f.fileno())


def data_sha256(path: str | Path) -> str:
    """sha256 of a .safetensors data section (what ``modelspec.hash_sha256`` records)."""
    path = Path(path)
    _, n = _read_header(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return "0x" + h.hexdigest()


def with_resolution(ckpt: Checkpoint, resolution: int | None) -> Checkpoint:
    """The checkpoint drawn at ``resolution`` pixels (None: its own), checked against its VAE's scale."""
    if resolution is None:
        return ckpt
    scale = 2 ** (len(ckpt.family.vae["block_out_channels"]) - 1)
    if resolution < scale or resolution % scale:
        raise MaceError(f"--resolution {resolution}: must be a positive multiple of {scale} (the VAE's downscale) "
                        "for this model")
    from dataclasses import replace

    return replace(ckpt, family=replace(ckpt.family, resolution=resolution))


def with_edits(ckpt: Checkpoint, edits: Mapping[str, torch.Tensor]) -> Checkpoint:
    """The checkpoint with ``edits`` (file key -> weight) in place, each cast to the dtype it replaces;
    other tensors are shared, not copied."""
    tensors = dict(ckpt.tensors)
    for k, v in edits.items():
        if k not in tensors:
            raise KeyError(f"edit for unknown tensor {k}")
        if tuple(v.shape) != tuple(tensors[k].shape):
            raise ValueError(f"edit for {k} has shape {list(v.shape)}, file has {list(tensors[k].shape)}")
        tensors[k] = v.detach().to(device="cpu", dtype=tensors[k].dtype)
    return Checkpoint(ckpt.path, ckpt.family, tensors, ckpt.metadata, ckpt.source_format, ckpt._sha256)


def save_edited(ckpt: Checkpoint, edits: Mapping[str, torch.Tensor], out: str | Path,
                metadata: Mapping[str, str], overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> Path:
    """Write the checkpoint with ``edits`` (full file keys -> new weights) replacing its tensors.

    Edited tensors are cast to the dtype of the tensor they replace; every other tensor is the
    input's own object, so it is bit-identical. ``metadata`` is merged over the input's.

    A checkpoint taken from a host's memory is written from its file, read now: the host's copy
    may be cast (A1111 holds fp16 of an fp32 file), lack the file's EMA weights or carry its own
    buffers, and the output must be the file with the edits, as `mace erase` writes it.

    ``overwrite``: replace an existing ``out``; ``inputs``: other files the command read (never
    replaced, nor is the checkpoint's own file).
    """
    if ckpt.source_format == MEMORY:
        ckpt = load_checkpoint(ckpt.path, sha256=ckpt._sha256)
    tensors = with_edits(ckpt, edits).tensors
    meta = {k: v for k, v in ckpt.metadata.items() if not k.startswith(("modelspec.", "mace."))}
    if ckpt.family.family not in ("sd1", "sd2", "sd2-v", "sdxl") or _nonstandard(ckpt.family):
        meta["mace.arch"] = ckpt.family.to_json()
    meta.update(metadata)
    return write_safetensors(tensors, out, meta, protect=(ckpt.path, *inputs), overwrite=overwrite)


def _nonstandard(fam: Family) -> bool:
    try:
        std = load_family(fam.family)
    except UnsupportedModelError:
        return True
    return std.unet != fam.unet or std.vae != fam.vae or [t.config for t in std.text_encoders] != \
        [t.config for t in fam.text_encoders]


def family_of_modules(family: str | Family, unet, vae, text_encoders: Sequence[torch.nn.Module],
                      prediction_type: str | None = None, resolution: int | None = None) -> Family:
    """``family`` with the sizes of these diffusers/transformers modules (non-standard models)."""
    base = load_family(family) if isinstance(family, str) else family
    if len(text_encoders) != len(base.text_encoders):
        raise ValueError(f"{base.family} needs {len(base.text_encoders)} text encoder(s), got {len(text_encoders)}")
    specs = tuple(TextEncoderSpec(**{**spec.__dict__, "config": {k: v for k, v in te.config.to_dict().items()
                                                                  if k in spec.config}})
                  for te, spec in zip(text_encoders, base.text_encoders))
    return Family(**{**base.__dict__, "unet": _public(unet.config), "vae": _public(vae.config),
                     "text_encoders": specs, "prediction_type": prediction_type or base.prediction_type,
                     "resolution": resolution or base.resolution})


def save_new_checkpoint(path: str | Path, family: str | Family, *, unet, vae, text_encoder,
                        text_encoder_2=None, metadata: Mapping[str, str] | None = None,
                        dtype: torch.dtype | None = None, prediction_type: str | None = None) -> Path:
    """Write diffusers/transformers modules as an ldm-layout single file of ``family``.

    The modules' configs go into ``mace.arch`` so non-standard sizes (tests, toy world) load back
    exactly. Used to make test models and to ship the toy model.
    """
    tes = [text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
    fam = family_of_modules(family, unet, vae, tes, prediction_type)
    tensors = modules_to_file_tensors(fam, unet, vae, tes)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    meta = {**modelspec(fam, Path(path).stem), "mace.arch": fam.to_json(), **(metadata or {})}
    return write_safetensors(tensors, path, meta)


def save_new_diffusers(path: str | Path, family: str | Family, *, unet, vae, text_encoder,
                       text_encoder_2=None) -> Path:
    """Write modules as a diffusers pipeline folder (model_index.json, components, tokenizer)."""
    import shutil

    base = load_family(family) if isinstance(family, str) else family
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    xl = text_encoder_2 is not None
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "_diffusers_version": "0.27.0", "_mace_family": base.family, "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    text_encoder.save_pretrained(path / "text_encoder")
    tok_dirs = ["tokenizer"]
    if xl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"])
        text_encoder_2.save_pretrained(path / "text_encoder_2")
        tok_dirs.append("tokenizer_2")
    for d in tok_dirs:
        (path / d).mkdir(exist_ok=True)
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(TOKENIZER_DIR / f, path / d / f)
    write_text(path / "scheduler" / "scheduler_config.json", json.dumps(
        {"_class_name": "DDIMScheduler", **base.scheduler, "prediction_type": base.prediction_type}), checked=True)
    write_text(path / "model_index.json", json.dumps(index, indent=1), checked=True)
    return path
