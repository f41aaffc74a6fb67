"""Time and memory of an erasure, estimated before it starts from a measured UNet step.

One warm UNet call at the training resolution is timed (and, on a GPU, its peak memory taken);
the run's cost is that step times the number of UNet calls the settings imply, plus the text
encodings of stage 1. A GPU too small for the measured peak is refused with advice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .backend import Backend
from .concepts import ErasureSpec, concept_prompts
from .errors import MaceError


@dataclass
class Estimate:
    seconds: float
    peak_gb: float | None  # GPU peak (None on CPU)
    unet_calls: int
    step_seconds: float

    def describe(self) -> str:
        mem = f", peak GPU memory ~{self.peak_gb:.1f} GB" if self.peak_gb is not None else ""
        return (f"estimated {self.seconds / 60:.1f} min ({self.unet_calls} UNet calls at "
                f"{self.step_seconds * 1000:.0f} ms){mem}")


def unet_calls(spec: ErasureSpec, closed_form_only: bool = False) -> int:
    """UNet calls of a run, counted in batch-of-one units: drawing (CFG doubles), training
    (one pass per step and sample; abo: three)."""
    if closed_form_only:
        return 0
    n = 0
    for c in spec.concepts:
        s = spec.settings_for(c)
        n += s.images * s.sample_steps * 2
        n += s.steps * s.batch_size * (3 if s.objective == "abo" else 1)
        n += s.robust_rounds * s.attack_steps
    return n


@torch.no_grad()
def estimate(backend: Backend, spec: ErasureSpec, closed_form_only: bool = False, size: int | None = None,
             repeats: int = 2) -> Estimate:
    size = size or backend.resolution
    h = size // backend.vae_scale
    x = torch.zeros(1, backend.latent_channels, h, h, device=backend.device)
    text = backend.encode([""])
    cuda = backend.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    backend.predict(x, torch.tensor([500], device=backend.device), text)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        backend.predict(x, torch.tensor([500], device=backend.device), text)
    if cuda:
        torch.cuda.synchronize()
    step = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    backend.encode(["a photo of a cat"] * 8)
    enc = (time.perf_counter() - t0) / 8
    prompts = sum(2 * len(concept_prompts(c)) for c in spec.concepts)
    calls = unet_calls(spec, closed_form_only)
    peak = None
    if cuda:
        # the probe's peak at batch 1; drawing runs 8 images x 2 (CFG) at once
        act = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
        peak = (torch.cuda.memory_allocated() + 16 * act) / 2 ** 30
    return Estimate(calls * step + prompts * enc, peak, calls, step)


def check_fits(est: Estimate, device: torch.device) -> None:
    """Refuse, with advice, a run whose estimated peak exceeds the GPU's memory."""
    if est.peak_gb is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    if est.peak_gb > 0.95 * total:
        raise MaceError(f"this run needs ~{est.peak_gb:.1f} GB of GPU memory, the GPU has {total:.1f} GB. "
                        "Use --dtype fp16, fewer --images per batch, a smaller --size, or --closed-form-only.")
