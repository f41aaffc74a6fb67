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
from .masks import draw_batch

HEADROOM = 0.95  # share of the GPU's memory a run may plan on (the allocator's fragmentation takes some)


@dataclass
class Estimate:
    seconds: float
    peak_gb: float | None  # GPU peak (None on CPU)
    unet_calls: int
    step_seconds: float
    low_vram: bool = False  # whether the run already uses low-VRAM mode (its peak is the low one)

    def describe(self) -> str:
        mem = f", peak GPU memory ~{self.peak_gb:.1f} GB" if self.peak_gb is not None else ""
        return (f"estimated {_duration(self.seconds)} ({self.unet_calls} UNet calls at "
                f"{self.step_seconds * 1000:.0f} ms){mem}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


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
        # the probe's activations at batch 1, times the rows drawn at once (CFG doubles them)
        act = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
        peak = (torch.cuda.memory_allocated() + peak_rows(spec, closed_form_only) * act) / 2 ** 30
    low_vram = all(spec.settings_for(c).low_vram for c in spec.concepts)
    return Estimate(calls * step + prompts * enc, peak, calls, step, low_vram)


def peak_rows(spec: ErasureSpec, closed_form_only: bool = False) -> int:
    """UNet batch rows at the run's peak: drawing's, two per image under CFG (none: stage 1 alone)."""
    if closed_form_only:
        return 0
    return max(2 * min(draw_batch(s), s.images) for s in map(spec.settings_for, spec.concepts))


def gpu_memory_gb(device: torch.device) -> float | None:
    """Total memory of a CUDA device in GB; None for other devices."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2 ** 30


def refusal(est: Estimate, gpu_gb: float | None) -> str | None:
    """Why a run of estimate ``est`` does not fit a GPU of ``gpu_gb`` GB, and what to change; None
    when it fits or runs without a GPU. Every host shows it as is, so remedies are named both ways."""
    if est.peak_gb is None or gpu_gb is None or est.peak_gb <= HEADROOM * gpu_gb:
        return None
    advice = [] if est.low_vram else ["turn on low-VRAM mode (`--low-vram`, the nodes' and the tab's low_vram "
                                      "option): one training image at a time, activations recomputed"]
    advice.append("use closed-form only (stage 1 alone: seconds, no training, little memory)")
    if est.low_vram:
        advice.append("or run it on a GPU with more memory")
    return (f"this run needs ~{est.peak_gb:.1f} GB of GPU memory, the GPU has {gpu_gb:.1f} GB. To fit: "
            + ", ".join(advice) + ".")


def check_fits(est: Estimate, device: torch.device) -> None:
    """Refuse, with advice, a run whose estimated peak exceeds the GPU's memory."""
    why = refusal(est, gpu_memory_gb(device))
    if why:
        raise MaceError(why)
