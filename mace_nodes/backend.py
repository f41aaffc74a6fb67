"""`mace_core.model.backend.Backend` over ComfyUI's own MODEL (ModelPatcher), CLIP and VAE objects.

No second copy of the model is loaded: the UNet, text encoder and VAE are the ones the user's
graph already holds. Nothing here writes into a module ComfyUI shares between clones; the core's
stages add their weight deltas and capture queries/keys with forward hooks on the attn2
``to_q / to_k / to_v`` modules, and results are applied by the nodes as ``add_patches`` on a
``clone()``.

Key names: the core speaks file keys (``model.diffusion_model.<...>.attn2.to_k.weight``), a
ModelPatcher state-dict keys (``diffusion_model.<...>``): `comfy_key` / `file_key` convert.

ComfyUI modules are imported inside functions only, so this file imports without ComfyUI (the
repository root ``__init__.py`` may be imported by tools that are not ComfyUI).
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Iterator, Mapping, Sequence

import torch

from mace_core.model.backend import CrossAttentionLayer, TextBatch
from mace_core.errors import MaceError

FILE_PREFIX = "model."  # file key = FILE_PREFIX + ComfyUI key
UNET_PREFIX = "diffusion_model."
POOLED_KEY = "diffusion_model.label_emb.0.0.weight"  # SDXL's added-condition projection
MACE_OPTION = "mace"  # model_options entry recording what our patches are (small, deep-copied by clone())
_BATCH = 64  # prompts per text-encoder call


def comfy_key(file_key: str) -> str:
    return file_key[len(FILE_PREFIX):] if file_key.startswith(FILE_PREFIX) else file_key


def file_key(key: str) -> str:
    return key if key.startswith(FILE_PREFIX + UNET_PREFIX) else FILE_PREFIX + key


# ---------------------------------------------------------------------------------------------
# What a ComfyUI MODEL is


def family_name(model) -> str:
    """The mace_core family of a ComfyUI MODEL: sd1, sd2, sd2-v or sdxl (else a readable error)."""
    import comfy.supported_models as sm

    cfg = getattr(model.model, "model_config", None)
    v = prediction_type(model) == "v_prediction"
    if isinstance(cfg, sm.SDXL):
        return "sdxl"
    if isinstance(cfg, sm.SD20):
        return "sd2-v" if v else "sd2"
    if isinstance(cfg, sm.SD15):
        return "sd1"
    raise MaceError(f"MACE erases concepts from Stable Diffusion 1.x, 2.x and SDXL base models; this MODEL is "
                    f"{type(cfg).__name__} ({type(model.model).__name__}). Load an SD1/SD2/SDXL checkpoint.")


def prediction_type(model) -> str:
    import comfy.model_sampling as ms

    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, ms.ModelSamplingDiscrete):
        raise MaceError(f"MACE needs a model with discrete (DDPM) timesteps; this MODEL samples with "
                        f"{type(sampling).__name__}. Remove model-sampling patches before the MACE nodes.")
    if isinstance(sampling, ms.V_PREDICTION):
        return "v_prediction"
    if isinstance(sampling, ms.EPS):
        return "epsilon"
    raise MaceError(f"unsupported prediction type of this MODEL ({type(sampling).__mro__[1].__name__}); "
                    "MACE supports epsilon and v prediction")


def alphas_cumprod(model) -> torch.Tensor:
    """[T] float64. ComfyUI keeps only float32 sigmas; when they are SD's schedule (the usual case) the
    float64 values are recomputed exactly as the core does, else taken from the sigmas."""
    from mace_core.model.diffusers_backend import alphas_cumprod as core_schedule

    sampling = model.get_model_object("model_sampling")
    sigmas = sampling.sigmas.detach().double().cpu()
    ours = 1.0 / (sigmas * sigmas + 1.0)
    settings = getattr(getattr(model.model, "model_config", None), "sampling_settings", {}) or {}
    schedule = settings.get("beta_schedule", "linear")
    if schedule in ("linear", "scaled_linear") and not getattr(sampling, "zsnr", False):
        ref = core_schedule({"num_train_timesteps": len(sigmas),
                             "beta_start": settings.get("linear_start", 0.00085),
                             "beta_end": settings.get("linear_end", 0.012),
                             "beta_schedule": "scaled_linear"})
        if torch.allclose(ref, ours, rtol=1e-5, atol=1e-7):
            return ref
    return ours


# ---------------------------------------------------------------------------------------------
# Weights and patches


def attn2_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """(ComfyUI module path under the UNet, module) of every cross-attention layer, in UNet order."""
    out = []
    for path, mod in model.model.diffusion_model.named_modules():
        if path.endswith("attn2") and all(hasattr(mod, a) for a in ("to_q", "to_k", "to_v", "heads")):
            out.append((path, mod))
    if not out:
        raise MaceError("this MODEL has no cross-attention (attn2) layers: it is not a text-to-image UNet")
    return out


def edited_keys(model) -> list[str]:
    """ComfyUI keys of the weights MACE edits: every attn2 to_k / to_v (+ SDXL's pooled projection)."""
    keys = []
    for path, _ in attn2_modules(model):
        keys += [f"{UNET_PREFIX}{path}.to_k.weight", f"{UNET_PREFIX}{path}.to_v.weight"]
    if family_name(model) == "sdxl":
        keys.append(POOLED_KEY)
    return keys


def effective_weights(model, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The weights ``model`` samples with (its unpatched values with ITS patches applied, e.g. a LoRA
    loaded before MACE), fp32 on CPU, by ComfyUI key; never the values another clone patched in.
    Patches are applied as ``ModelPatcher.patch_weight_to_device`` applies them: in fp32, the result
    rounded to the weight's dtype (fp16 on most GPUs), so these are also the values ComfyUI's Save
    Checkpoint writes of ``model``."""
    import comfy.float
    import comfy.lora
    import comfy.model_patcher

    patches = model.get_key_patches(UNET_PREFIX)
    out = {}
    for k in keys:
        if k not in patches:
            raise MaceError(f"this MODEL has no weight {k}")
        entry = patches[k]
        w, convert = entry[0] if isinstance(entry[0], tuple) else (entry[0], None)  # (weight, convert) since 2024
        dtype = w.dtype
        w = w.detach().to(device="cpu", dtype=torch.float32, copy=True)
        if convert is not None:
            w = convert(w, inplace=True)
        if len(entry) > 1:
            w = comfy.lora.calculate_weight(entry[1:], w, k)
            w = comfy.float.stochastic_rounding(w, dtype, seed=comfy.model_patcher.string_to_seed(k))
        out[k] = w.float()
    return out


def weights_id(model) -> str:
    """Identity of the edited weights ``model`` samples with (`mace_core.method.project.weights_id`): what an
    erasure project made in ComfyUI records as its base (a MODEL does not know the file it came from);
    the CLI computes the same id from a file."""
    from mace_core.method.project import weights_id as core_weights_id

    return core_weights_id({file_key(k): w for k, w in effective_weights(model, edited_keys(model)).items()})


def mace_info(model) -> dict | None:
    """What MACE patched on this MODEL (project, stage, metadata), or None."""
    return (getattr(model, "model_options", None) or {}).get(MACE_OPTION)


def strip_mace(model):
    """A clone of ``model`` without the patches MACE nodes added (the model they started from).
    Other patches (LoRAs, ...) stay. The input is not modified."""
    m = model.clone()
    info = m.model_options.pop(MACE_OPTION, None)
    if not info:
        return m
    removed = False
    for key, idx in info.get("patched", {}).items():
        lst = m.patches.get(key)
        if lst and idx < len(lst) and isinstance(lst[idx][1], tuple) and lst[idx][1] and lst[idx][1][0] == "set":
            lst = lst[:idx] + lst[idx + 1:]
            removed = True
            if lst:
                m.patches[key] = lst
            else:
                del m.patches[key]
    if removed:
        m.patches_uuid = uuid.uuid4()
    return m


def patched_model(model, weights: Mapping[str, torch.Tensor], info: Mapping) -> object:
    """``model`` (its MACE patches removed first) with ``weights`` (file or ComfyUI keys) replacing the
    current values through ``add_patches({key: ("set", (W,))})`` on a clone."""
    m = strip_mace(model)
    patched = {}
    patches = {}
    for k, w in weights.items():
        ck = comfy_key(k)
        patched[ck] = len(m.patches.get(ck, []))
        patches[ck] = ("set", (w.detach().to("cpu", torch.float32).contiguous(),))
    applied = set(m.add_patches(patches, 1.0, 1.0))
    missing = sorted(set(patches) - applied)
    if missing:
        raise MaceError(f"this MODEL has no weight {missing[0]} (and {len(missing) - 1} more): the erasure was "
                        "computed for another architecture")
    m.model_options[MACE_OPTION] = {**dict(info), "patched": patched}
    return m


# ---------------------------------------------------------------------------------------------
# The seam


class ComfyBackend:
    """`mace_core.model.backend.Backend` over ComfyUI's MODEL / CLIP / VAE (see module docstring)."""

    def __init__(self, model, clip=None, vae=None, resolution: int | None = None):
        import comfy.model_management as mm
        from mace_core.model.families import load_family

        self.patcher = model
        self.clip = clip
        self.vae = vae
        self.family_name = family_name(model)
        self.family = load_family(self.family_name)
        self.prediction_type = prediction_type(model)
        self.device = torch.device(model.load_device) if model.load_device is not None else mm.get_torch_device()
        base = model.model
        self.dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
        self.resolution = int(resolution or self.family.resolution)  # side of the training images
        self.latent_channels = int(base.latent_format.latent_channels)
        self.vae_scale = _vae_scale(vae) if vae is not None else 2 ** (len(self.family.vae["block_out_channels"]) - 1)
        self.alphas_cumprod = alphas_cumprod(model)
        self._layers = [CrossAttentionLayer(f"{FILE_PREFIX}{UNET_PREFIX}{path}", mod.to_q, mod.to_k, mod.to_v,
                                            int(mod.heads)) for path, mod in attn2_modules(model)]
        self._unet_ready = False
        self._text_key = None

    # --- text -------------------------------------------------------------------------------

    def _need_clip(self):
        if self.clip is None:
            raise MaceError("this step needs the CLIP of the checkpoint: connect the CLIP input")
        return self.clip

    def _main_key(self, tokens: Mapping) -> str:
        return "l" if "l" in tokens else next(iter(tokens))

    def _specials(self, key: str) -> tuple[int, int]:
        tok = getattr(self._need_clip().tokenizer, f"clip_{key}", None) or getattr(self.clip.tokenizer, key, None)
        start = getattr(tok, "start_token", None)
        end = getattr(tok, "end_token", None)
        return (49406 if start is None else int(start)), (49407 if end is None else int(end))

    def text_encoder_key(self) -> str:
        if self._text_key is None:
            from mace_core.model.backend import tensors_key

            clip = self._need_clip()
            how = repr((type(clip.cond_stage_model).__name__, clip.layer_idx, "comfyui"))
            if clip.patcher.patches:  # a LoRA on the text encoder: no cross-session caching
                how += f"|patches {clip.patcher.patches_uuid}"
            self._text_key = tensors_key(clip.cond_stage_model.state_dict(), how)
        return self._text_key

    def tokenize(self, prompt: str) -> list[int]:
        tokens = self._need_clip().tokenize(prompt)
        key = self._main_key(tokens)
        start, end = self._specials(key)
        ids = [start]
        for chunk in tokens[key]:
            toks = [_token_id(t[0]) for t in chunk]
            body = toks[1:] if toks and toks[0] == start else toks
            if end in body:
                body = body[:body.index(end)]
            ids += body
        return ids + [end]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextBatch:
        return self._encode(prompts)

    def encode_with_grad(self, prompts: Sequence[str]) -> TextBatch:
        """`encode` inside autograd (the soft-token attack optimises token embeddings through it;
        within `differentiable`). ComfyUI's CLIP adds its residuals in place (``x += ...``), which
        autograd refuses for tensors it saved; saving copies instead makes the same arithmetic
        differentiable."""
        with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda t: t):
            return self._encode(prompts)

    def _encode(self, prompts: Sequence[str]) -> TextBatch:
        clip = self._need_clip()
        self._unet_ready = False  # encoding loads the text encoder; the UNet may have been offloaded
        tokenized = [{k: v[:1] for k, v in clip.tokenize(p).items()} for p in prompts]
        key = self._main_key(tokenized[0])
        ids = torch.tensor([[_token_id(t[0]) for t in tk[key][0]] for tk in tokenized], dtype=torch.long)
        contexts, pooled = [], []
        batched = self.family_name != "sdxl" and all(
            t[1] == 1.0 and isinstance(t[0], int) for tk in tokenized for chunks in tk.values() for t in chunks[0])
        if batched:
            # ComfyUI encodes the 77-token sections of one prompt in one batch and concatenates them along
            # the sequence; with unit weights, N prompts given as N sections are N independent encodings
            for s in range(0, len(tokenized), _BATCH):
                part = tokenized[s:s + _BATCH]
                merged = {k: [tk[k][0] for tk in part] for k in part[0]}
                cond, _ = clip.encode_from_tokens(merged, return_pooled=True)
                contexts.append(cond.reshape(len(part), -1, cond.shape[-1]))
        else:
            for tk in tokenized:
                cond, pool = clip.encode_from_tokens(tk, return_pooled=True)
                contexts.append(cond[:, :ids.shape[1]])
                pooled.append(pool)
        context = torch.cat(contexts).float()
        pooled_t = torch.cat(pooled).float() if self.family_name == "sdxl" else None
        return TextBatch(context, ids, pooled_t)

    def text_token_embeddings(self) -> list[torch.nn.Module]:
        """The token-embedding module of each text encoder (the soft-token attack hooks them)."""
        return [m for n, m in self._need_clip().cond_stage_model.named_modules() if n.endswith("token_embedding")]

    # --- UNet -------------------------------------------------------------------------------

    def cross_attention(self) -> list[CrossAttentionLayer]:
        return self._layers

    def original_weights(self) -> dict[str, torch.Tensor]:
        w = effective_weights(self.patcher, edited_keys(self.patcher))
        return {file_key(k): v for k, v in w.items()}

    def _ensure_unet(self) -> None:
        if not self._unet_ready:
            import comfy.model_management as mm

            mm.load_models_gpu([self.patcher])
            self._unet_ready = True

    def predict(self, latents: torch.Tensor, t: torch.Tensor, text: TextBatch) -> torch.Tensor:
        self._ensure_unet()
        base = self.patcher.model
        x = latents.to(self.device, self.dtype)
        ctx = text.context.to(self.device, self.dtype)
        kw = {}
        if self.family_name == "sdxl":
            h, w = latents.shape[-2] * self.vae_scale, latents.shape[-1] * self.vae_scale
            y = base.encode_adm(pooled_output=text.pooled.to(self.device), width=w, height=h, crop_w=0, crop_h=0,
                                target_width=w, target_height=h)
            kw["y"] = y.to(self.device, self.dtype)
        ts = t.to(self.device).float().expand(x.shape[0]) if t.ndim == 0 else t.to(self.device).float()
        return base.diffusion_model(x, ts, context=ctx, transformer_options={}, **kw)

    @contextlib.contextmanager
    def differentiable(self) -> Iterator[None]:
        """UNet and text-encoder passes that autograd can differentiate through (the abo objective,
        the soft-token attack of robust erasure). ComfyUI loads weights as inference tensors, which
        cannot be saved for backward; inside this context they are ordinary copies (one more copy of
        the UNet and text encoder in memory while it lasts)."""
        self._ensure_unet()
        with contextlib.ExitStack() as stack:
            stack.enter_context(_ordinary_parameters(self.patcher.model.diffusion_model))
            if self.clip is not None:
                self.clip.load_model()
                stack.enter_context(_ordinary_parameters(self.clip.cond_stage_model))
            yield

    # --- VAE --------------------------------------------------------------------------------

    def _need_vae(self):
        if self.vae is None:
            raise MaceError("this step needs the VAE of the checkpoint: connect the VAE input")
        return self.vae

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self._need_vae()
        self._unet_ready = False
        z = self.patcher.model.latent_format.process_out(latents.float())
        img = vae.decode(z)
        while img.ndim > 4:  # video VAEs add a frame axis
            img = img.flatten(0, 1)
        return (img.float() * 2 - 1).clamp(-1, 1).movedim(-1, 1)


@contextlib.contextmanager
def _ordinary_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s inference-tensor parameters are ordinary tensors holding the same
    values; the originals are put back afterwards. The swap is what torch.func.functional_call does
    for one call, held for a block that reaches the module through ComfyUI's own methods; ComfyUI runs
    one graph at a time, so nothing else sees it, and the values never change."""
    swapped = []
    with torch.inference_mode(False):
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and p.is_inference():
                    mod._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                    swapped.append((mod, name, p))
    try:
        yield
    finally:
        for mod, name, p in swapped:
            mod._parameters[name] = p


def _token_id(t) -> int:
    """A token id; ComfyUI puts embedding vectors (textual inversion) where ids would be: -1."""
    return int(t) if isinstance(t, int) or (torch.is_tensor(t) and t.ndim == 0) else -1


def _vae_scale(vae) -> int:
    try:
        return int(vae.spacial_compression_encode())
    except Exception:  # noqa: BLE001 - older/odd VAEs
        r = getattr(vae, "downscale_ratio", 8)
        return int(r if isinstance(r, int) else 8)
