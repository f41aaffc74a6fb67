"""Peak GPU memory of each erasure stage on full-size SD1.5 / SDXL, traced without a GPU.

    python benchmarks/vram.py --arch sd1 sdxl            # default settings and low-VRAM mode

The real pipeline functions (stage-1 statistics, drawing with attention masks, one LoRA training
step for each objective, one hardening attack step) run on the full-size architecture in fp16 under
``FakeTensorMode``: every tensor has its real shape, dtype and lifetime but no data, so a 2-core
CPU traces an SDXL step in seconds. A dispatch hook adds up the bytes of the live tensors after every
operation, plus the weights of the parts the backend holds on the device at that moment (it parks
the text encoders and the VAE while the UNet runs). Not counted: the CUDA context (~0.3-0.5 GB),
cuDNN/cuBLAS workspaces and allocator fragmentation, which a real ``max_memory_allocated`` also
leaves out except fragmentation; SDPA is traced with the CPU's kernel choice (flash-style, no
attention matrix), as CUDA's flash/memory-efficient kernels. A step that ends by reading its loss
back (a loss value, images as numpy: data a fake tensor does not have) is traced up to that read,
which comes after the step's backward pass / the first batch's decoding.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary, weakref  # noqa: E402

from mace_core.model.checkpoint import Components, make_tokenizer  # noqa: E402
from mace_core.method.concepts import Settings, concept_prompts, make_concept  # noqa: E402
from mace_core.model.diffusers_backend import DiffusersBackend  # noqa: E402
from mace_core.model.families import load_family  # noqa: E402
from mace_core.method.masks import ConceptData, draw_batch, draw_concept, phrase_token_mask  # noqa: E402
from mace_core.method.refine import concept_stats  # noqa: E402
from mace_core.method.train import train_lora  # noqa: E402

GB = 2 ** 30
READBACK = ("DataDependent", "data-dependent", ".numpy() is not supported")  # fake tensors hold no values


class LiveBytes(TorchDispatchMode):
    """Peak of (bytes of tensors created inside + weights of the backend's resident parts)."""

    def __init__(self, backend: DiffusersBackend):
        super().__init__()
        self.backend = backend
        self.part_bytes = {part: sum(p.numel() * p.element_size() for m in backend._modules(part)
                                     for p in m.parameters()) for part in ("text", "unet", "vae")}
        self.seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0

    def _release(self, nbytes: int):
        def cb(_):
            self.live -= nbytes
        return cb

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st not in self.seen:
                    self.live += st.nbytes()
                    self.seen[st] = weakref.ref(st, self._release(st.nbytes()))
        weights = sum(self.part_bytes[p] for p in self.backend.resident)
        self.peak = max(self.peak, self.live + weights)
        return out


def fake_backend(arch: str, dtype: torch.dtype) -> DiffusersBackend:
    """The full-size architecture as fake tensors (built on the meta device, then given fake storage)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.__future__.set_overwrite_module_params_on_conversion(True)  # fake parameters cannot be swapped in place
    fam = load_family(arch)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**fam.unet).eval(), AutoencoderKL(**fam.vae).eval()
        tes = [(CLIPTextModelWithProjection if te.projection else CLIPTextModel)(CLIPTextConfig(**te.config)).eval()
               for te in fam.text_encoders]
    for m in (unet, vae, *tes):
        for mod in m.modules():
            for k, p in mod._parameters.items():
                if p is not None:
                    mod._parameters[k] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=False)
            for k, b in mod._buffers.items():
                if b is not None:
                    mod._buffers[k] = torch.zeros(b.shape, dtype=dtype if b.is_floating_point() else b.dtype)
    comp = Components(fam, unet, vae, tes, [make_tokenizer(t) for t in fam.text_encoders])
    return DiffusersBackend(comp, "cpu", dtype, offload=True)


def stage1_flops(arch: str, dtype: torch.dtype = torch.float16) -> float:
    """FLOPs of one concept's stage-1 statistics on the full-size ``arch`` (text encoding of its
    prompts and the anchor's, plus the Gram sums), counted on fake tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    c = make_concept("amber basil", "a thing")
    with FakeTensorMode(allow_non_fake_inputs=True):
        be = fake_backend(arch, dtype)
        with FlopCounterMode(display=False) as fc:
            concept_stats(be, concept_prompts(c), concept_prompts(c, c.anchor))
    return float(fc.get_total_flops())


def trace(backend: DiffusersBackend, fn) -> tuple[float, str]:
    """Peak GB of ``fn()`` and how far it ran."""
    with LiveBytes(backend) as lb:
        try:
            fn()
            how = "complete"
        except Exception as e:  # noqa: BLE001 - a fake tensor cannot be read back; the trace ends there
            if not any(m in f"{type(e).__name__} {e}" for m in READBACK):
                raise
            how = "to the read-back"
    return lb.peak / GB, how


def stages(backend: DiffusersBackend, low_vram: bool):
    c = make_concept("amber basil", "a thing")
    s = Settings(steps=1, images=8, sample_steps=1, low_vram=low_vram)
    prompt = f"a photo of the {c.phrase}"
    side = backend.resolution // backend.vae_scale
    n = min(draw_batch(s, backend.resolution), s.images)
    data = ConceptData(torch.zeros(n, backend.latent_channels, side, side),
                       torch.ones(n, side, side, dtype=torch.bool), None)
    prompts = [prompt] + concept_prompts(c)[:8]
    tokens = phrase_token_mask(backend, prompts, c.phrase, with_end=True)
    delta = {l.k_key: torch.zeros(l.to_k.weight.shape) for l in backend.cross_attention()}
    delta.update({l.v_key: torch.zeros(l.to_v.weight.shape) for l in backend.cross_attention()})
    original = backend.original_weights()  # W0 as erase passes it: built before the traces, not counted in them
    yield "stage 1 (text encoding, 1 concept)", lambda: concept_stats(backend, concept_prompts(c),
                                                                          concept_prompts(c, c.anchor))
    yield f"drawing {n} image(s) at once + masks", lambda: draw_concept(
        backend, prompt, c.phrase, list(range(n)), 1, 7.5, batch_size=n)
    yield "LoRA step, mace objective", lambda: train_lora(backend, data, prompts, tokens, delta, s, 0,
                                                          original=original)
    abo = Settings(steps=1, images=8, low_vram=low_vram, objective="abo", alternative="a photo of a dog")
    yield f"LoRA step, abo objective (batch {abo.batch_size})", lambda: train_lora(
        backend, data, prompts, tokens, delta, abo, 0)
    if len(backend.text_token_embeddings()) > 1:
        return  # the soft-token attack (and so --robust) covers single-text-encoder models
    from mace_core.method.harden import adversarial_stats

    yield "hardening attack step", lambda: adversarial_stats(backend, delta, data.latents[:1], "a photo of {}",
                                                             concept_prompts(c, "{}"), c.anchor, 1, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["sd1", "sdxl"], choices=["sd1", "sd2", "sdxl"])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    args = ap.parse_args()
    for arch in args.arch:
        print(f"{arch}: stage-1 statistics of one concept = {stage1_flops(arch) / 1e12:.2f} TFLOP")
    print("| model | mode | stage | traced peak GB | traced |\n|---|---|---|---:|---|")
    for arch in args.arch:
        with FakeTensorMode(allow_non_fake_inputs=True):
            be = fake_backend(arch, getattr(torch, args.dtype))
            for low in (False, True):
                for name, fn in stages(be, low):
                    t0 = time.perf_counter()
                    gb, how = trace(be, fn)
                    print(f"| {arch} {be.resolution} px | {'low-VRAM' if low else 'default'} | {name} | {gb:.2f} | "
                          f"{how} ({time.perf_counter() - t0:.0f} s) |", flush=True)


if __name__ == "__main__":
    main()
