"""Time and memory of an erasure, estimated before it starts from a measured UNet step.

One warm UNet call at the training resolution is timed (and, on a GPU, its peak memory taken, and
for objectives that backpropagate through the UNet that of a differentiated call too); the run's
cost is that step times the number of UNet calls the settings imply (objectives.py counts each
objective's passes), plus the text encodings of stage 1, counting only what a
project does not already hold. A GPU too small for the measured peak is refused with advice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..model.backend import Backend
from ..method.concepts import (Concept, ErasureSpec, Settings, anchor_prompt_sets, concept_prompts,
                               settings_hash)
from ..errors import MaceError
from ..method.erase import general_missing, retain_missing
from ..method.masks import draw_batch
from ..method.objectives import grad_rows, unet_passes
from ..method.prior import float32_text, prior_missing
from ..method.project import Project
from ..method.synonyms import (NEARBY, TIMESTEPS, check_calls, checked_lists, compared_templates, keeps_nearby,
                               search_calls, searched)
from ..method.train import predict_for_backward

HEADROOM = 0.95  # share of the GPU's memory a run may plan on (the allocator's fragmentation takes some)


@dataclass
class Estimate:
    seconds: float
    peak_gb: float | None  # GPU peak (None on CPU)
    unet_calls: int
    step_seconds: float
    low_vram: bool = False  # whether the run already uses low-VRAM mode (its peak is the low one)
    prior_captions: int = 0  # captions the general prior still has to encode (first use of the encoder)
    prior_seconds: float = 0.0  # their share of ``seconds``
    text_encodings: int = 0  # prompts stage 1 encodes (concepts, their anchors, what is kept), prior not included

    def describe(self) -> str:
        mem = f", peak GPU memory ~{self.peak_gb:.1f} GB" if self.peak_gb is not None else ""
        prior = (f"; includes the general prior, first use of this text encoder: {self.prior_captions} captions, "
                 f"~{_duration(self.prior_seconds)}" if self.prior_captions else "")
        return (f"estimated {_duration(self.seconds)} ({self.unet_calls} UNet calls at "
                f"{self.step_seconds * 1000:.0f} ms{prior}){mem}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _planned(spec: ErasureSpec, project: Project | None) -> ErasureSpec:
    """What `erase` runs: ``spec`` merged into ``project`` (earlier concepts stay erased)."""
    return spec if project is None else project.merged(spec)


def _left(spec: ErasureSpec, project: Project | None) -> list[tuple[Concept, Settings, bool, bool, int]]:
    """What `erase` still does per concept of the planned ``spec`` (`_planned`): (concept, its
    settings, needs its stage-1 encodings, needs its LoRA trained, hardening rounds left); what
    ``project`` already holds (LoRAs trained with the same settings, rounds hardened) counts as done."""
    if project is None:
        return [(c, spec.settings_for(c), True, True, spec.settings_for(c).robust_rounds) for c in spec.concepts]
    out = []
    for c in spec.concepts:
        s, hardened = spec.settings_for(c), project.hardened(c)
        out.append((c, s, hardened is None, not project.has_lora(c, settings_hash(spec, c)),
                    max(0, s.robust_rounds - (hardened or 0))))
    return out


def unet_calls(spec: ErasureSpec, closed_form_only: bool = False, project: Project | None = None) -> int:
    """UNet calls of a run, counted in batch-of-one units: the synonym search and the fixed lists' check,
    drawing (CFG doubles), training (per step and sample, the objective's passes: mace 1, abo 3 (+1 with an
    alternative), mace-authors 1, esd 3, ant 8; a differentiated pass counts as one), hardening; with
    ``project``, only what is left."""
    spec = _planned(spec, project)
    return _calls(spec, _left(spec, project), closed_form_only)


def _new(left: list[tuple[Concept, Settings, bool, bool, int]]) -> list[Concept]:
    """The concepts of ``left`` not yet encoded: those `erase` searches, checks and encodes before stage 1."""
    return [c for c, _, encode, _, _ in left if encode]


def _probes(spec: ErasureSpec, left: list[tuple[Concept, Settings, bool, bool, int]]) -> int:
    """UNet calls (each with one text encoding) of what `erase` asks the model before stage 1: the synonym
    search of each concept not yet encoded (searching on), the check of each fixed list kept for them, and the
    subjectless prompt of each template whose nearby words are compared across them."""
    new = _new(left)
    return (search_calls() * sum(searched(spec, c) for c in new) + check_calls() * len(checked_lists(spec, new))
            + len(TIMESTEPS) * len(compared_templates(spec, new)))


def _kept(spec: ErasureSpec, left: list[tuple[Concept, Settings, bool, bool, int]]) -> int:
    """Phrases stage 1 keeps: those known now, and each searched concept's nearby words under the default
    protection (found by the search, so unknown before it)."""
    return len(spec.protected()[0]) + NEARBY * sum(keeps_nearby(spec, c) for c in _new(left))


def _calls(spec: ErasureSpec, left: list[tuple[Concept, Settings, bool, bool, int]], closed_form_only: bool) -> int:
    n = _probes(spec, left)
    if closed_form_only:
        return n
    for _, s, _, train, rounds in left:
        if train:
            n += s.images * s.sample_steps * 2
            n += s.steps * s.batch_size * unet_passes(s)
        n += rounds * s.attack_steps
    return n


@torch.no_grad()
def estimate(backend: Backend, spec: ErasureSpec, closed_form_only: bool = False, size: int | None = None,
             repeats: int = 2, project: Project | None = None, prior_dir=None) -> Estimate:
    """Time and peak GPU memory of erasing ``spec`` on ``backend``; with ``project``, of what `erase`
    would still do there (its concepts merged in, finished work reused); ``prior_dir``: where the run
    keeps the general prior (as given to `erase.erase`): its first computation is counted."""
    spec = _planned(spec, project)  # the memory is that of the whole merged run
    low_vram = all(spec.settings_for(c).low_vram for c in spec.concepts)
    size = size or backend.resolution
    h = size // backend.vae_scale
    x = torch.zeros(1, backend.latent_channels, h, h, device=backend.device)
    t = torch.tensor([500], device=backend.device)
    text = backend.encode([""])
    cuda = backend.device.type == "cuda"
    left = _left(spec, project)
    calls = _calls(spec, left, closed_form_only)
    step = 0.0
    if calls or cuda:  # a run without UNet calls on the CPU needs no UNet timing (3 passes: a minute there)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        backend.predict(x, t, text)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            backend.predict(x, t, text)
        if cuda:
            torch.cuda.synchronize()
        step = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    backend.encode(["a photo of a cat"] * 8)
    enc = (time.perf_counter() - t0) / 8
    captions, prior_s = _prior_cost(backend, spec, project, prior_dir)
    prompts = _stage1_encodings(_new(left))
    prompts += _probes(spec, left)
    if retain_missing(spec, project.load_priors()[1] if project is not None else {}):
        prompts += _kept(spec, left) * len(concept_prompts(spec.concepts[0]))  # kept, in the templates
    peak = None
    if cuda:
        resident = torch.cuda.memory_allocated()
        act = torch.cuda.max_memory_allocated() - resident  # one no-grad pass's activations, batch 1
        grad_act = _backward_activations(backend, x, t, text, low_vram) if train_rows(spec, closed_form_only) else 0
        peak = peak_gb(spec, resident, act, grad_act, closed_form_only, size)
    return Estimate(calls * step + prompts * enc + prior_s, peak, calls, step, low_vram, captions, prior_s, prompts)


def _stage1_encodings(concepts: list[Concept]) -> int:
    """Prompts stage 1 encodes for ``concepts``: each one's own (once a word: the phrase and each synonym
    found), and each distinct anchor prompt set once
    (`erase._stats` encodes the 8 ordinary names shared by ten celebrities once, not ten times)."""
    anchors = {prompts for c in concepts for prompts in anchor_prompt_sets(c)}
    return sum(len(concept_prompts(c)) * (1 + len(c.found_synonyms)) for c in concepts) + sum(map(len, anchors))


def _prior_cost(backend: Backend, spec: ErasureSpec, project: Project | None, prior_dir) -> tuple[int, float]:
    """(captions, seconds) of the general prior when the run must compute it: needed by its settings,
    not in the project, not in ``prior_dir``; timed on one batch encoded as the prior encodes (fp32 on
    the CPU)."""
    run = spec.settings_for()
    if project is not None and not general_missing(spec, *project.load_priors()):
        return 0, 0.0
    n = prior_missing(backend, run.prior, run.fuse_prior, prior_dir, captions_file=run.prior_captions)
    if not n:
        return 0, 0.0
    with float32_text(backend):
        backend.encode(["a photo of a cat"])  # warm-up (a cast, first call)
        t0 = time.perf_counter()
        backend.encode(["a photo of a cat"] * 8)
    return n, (time.perf_counter() - t0) / 8 * n


def _backward_activations(backend: Backend, x: torch.Tensor, t: torch.Tensor, text, low_vram: bool) -> int:
    """Bytes a differentiated UNet pass at batch 1 keeps for its backward (abo, mace-authors, esd, ant), measured
    with low-VRAM mode's gradient checkpointing when the run uses it."""
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.enable_grad(), predict_for_backward(backend, low_vram) as predict:
        xg = x.clone().requires_grad_()  # something must require grad for the pass to keep activations
        predict(xg, t, text).float().square().mean().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - resident


def peak_rows(spec: ErasureSpec, closed_form_only: bool = False, size: int = 512) -> int:
    """UNet batch rows at drawing's peak: two per image of ``size`` px drawn at once under CFG (none:
    stage 1 alone)."""
    if closed_form_only:
        return 0
    return max(2 * min(draw_batch(s, size), s.images) for s in map(spec.settings_for, spec.concepts))


def train_rows(spec: ErasureSpec, closed_form_only: bool = False) -> int:
    """Batch rows differentiated at once in training: abo and ant backpropagate through two UNet rows
    per sample (concept and empty prompt), mace-authors and esd through one; the mace loss through none
    (its gradient reaches the LoRA through the captured queries alone), so it adds no activations."""
    if closed_form_only:
        return 0
    return max(grad_rows(s) * s.batch_size for s in map(spec.settings_for, spec.concepts))


def peak_gb(spec: ErasureSpec, resident: int, act: int, grad_act: int, closed_form_only: bool = False,
            size: int = 512) -> float:
    """Peak GPU memory in GB: what is resident (weights) plus the larger of drawing's activations
    (``act`` bytes per no-grad row) and training's (``grad_act`` bytes kept per differentiated row)."""
    extra = max(peak_rows(spec, closed_form_only, size) * act, train_rows(spec, closed_form_only) * grad_act)
    return (resident + extra) / 2 ** 30


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
