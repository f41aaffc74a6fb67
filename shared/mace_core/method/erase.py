"""The erasure pipeline, top to bottom: refine (stage 1), draw + mask + train (stage 2), fuse (stage 3).

Hosts and the CLI call `erase` with a `Backend`, an `ErasureSpec` and a project folder; progress
and cancellation are callbacks they supply. The result is plain data: new to_k / to_v weights
keyed by the file's tensor names, plus the metadata that records what was done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from .. import __version__
from ..model.backend import Backend, TextBatch
from .concepts import (Concept, ErasureSpec, anchor_prompt_sets, concept_prompts, get_type, settings_hash, train_prompt,
                       validate)
from ..errors import InterruptedRun, MaceError
from .fuse import fuse, naive_sum, separate
from .harden import adversarial_stats
from .masks import draw_batch, draw_concept, phrase_token_mask, save_data
from .prior import general_prior, mean_grams, prior_captions
from .project import Project
from .synonyms import unknown_lists, with_model_words
from .refine import ConceptStats, apply_map, apply_pooled, concept_stats, context_map, overlap, pooled_map
from .train import LoRA, train_lora

Progress = Callable[[str, int, int], None]  # (stage label, done, total)
POOLED_SUFFIX = "label_emb.0.0.weight"  # SDXL's added-condition projection (pooled text + size ids)


@dataclass
class ErasureResult:
    weights: dict[str, torch.Tensor]  # file key -> new to_k / to_v weight [C, D] float32
    metadata: dict[str, str]
    report: dict = field(default_factory=dict)

    @property
    def erased(self) -> list[str]:
        """The phrases erased in ``weights``, in order (from the metadata, which a re-fuse rewrites)."""
        return [c["phrase"] for c in json.loads(self.metadata["mace.concepts"])]


def concept_seed(seed: int, concept: Concept) -> int:
    """A per-concept seed independent of run order, so a resumed run draws exactly the same."""
    return (seed * 1_000_003 + int(hashlib.sha256(concept.phrase.encode()).hexdigest()[:8], 16)) % (2 ** 31)


def erase(backend: Backend, spec: ErasureSpec, project: Project, base_sha256: str, base_name: str = "",
          progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
          closed_form_only: bool = False, prior_dir: Path | None = None) -> ErasureResult:
    """Run all three stages for ``spec`` (resuming finished concepts from ``project``).

    ``progress(label, done, total)`` is called with ``done = 0`` when each phase starts (so a progress
    bar names the phase that is running), then as it advances; ``prior_dir``: where the general prior
    is kept (hosts: their ``models/mace/prior``; default `prior.default_prior_dir`).

    Under torch.distributed (``torchrun`` / ``accelerate launch``) each rank computes and trains
    its share of the concepts (concept i on rank i mod world) into the shared project; every rank
    then fuses (closed form, seconds) and the caller writes the output on rank 0.
    """
    prog = progress or (lambda *_: None)
    stop = should_stop or (lambda: False)
    rank, world, barrier = _world()
    validate(spec, backend.tokenize)
    unknown: dict[str, float] = {}
    stage = StageLog(backend.device)

    with stage("refine"):
        if rank == 0:
            # refused before any compute: a project another run holds, or one made from another model
            project.lock()
            project.check_base(base_sha256, base_name)
            # the priors first: a text encoder's first use computes the general prior (minutes on a CPU),
            # and the progress must name it from the start rather than after every concept's search
            priors, meta = _general(backend, project, project.merged(spec), prior_dir, prog, stop)
            # the model's own synonyms and nearby words of each new concept, before the project records it
            # (a concept it already holds keeps those it was erased with)
            known = {c.phrase for c in project.spec().concepts} if project.exists() else set()
            spec = with_model_words(backend, spec, skip=known, progress=prog, stop=stop)
            # whether the model knows the fixed lists the default protection keeps (said, not changed)
            unknown = unknown_lists(backend, spec, [c for c in spec.concepts if c.phrase not in known], stop)
            project.open(base_sha256, base_name, backend.family_name, spec)
            # what is kept, with the words found: the synonyms are erased, so not kept, and the nearby
            # words kept (re-encoded only if the list changed)
            priors = _kept(backend, project, project.spec(), priors, meta, prog, stop)
        barrier()
        if rank:  # the priors rank 0 stored before the barrier
            priors = project.load_priors()[0]
        spec = project.spec()  # a project accumulates: earlier concepts stay erased
        mine = [c for i, c in enumerate(spec.concepts) if i % world == rank]
        run = spec.settings_for()
        prog("encoding the concepts (stage 1)", 0, 1)
        anchors: dict[tuple[str, ...], TextBatch] = {}  # encoded once per run for concepts sharing one
        for c in mine:
            _stats(backend, project, c, anchors, stop)
        barrier()
        stats = {c.phrase: _stats(backend, project, c, anchors) for c in spec.concepts}
        prog("refining (stage 1)", 0, 1)
        original = backend.original_weights()
        refined = refine_weights(original, list(stats.values()), run, priors)

    loras: dict[str, LoRA] = {}
    reused: list[str] = []
    if not closed_form_only:
        with stage("train"):
            base_delta = {k: refined[k] - original[k] for k in original if not k.endswith(POOLED_SUFFIX)}
            for i, c in enumerate(mine):
                h = settings_hash(spec, c)
                if project.has_lora(c, h):
                    reused.append(c.phrase)
                else:
                    if stop():
                        raise InterruptedRun(f"stopped before training {c.phrase!r}; rerun to resume")
                    _train_concept(backend, project, spec, c, original, base_delta, h, prog, stop)
                prog("concepts", i + 1, len(mine))
            barrier()
            loras = {c.phrase: project.load_lora(c, settings_hash(spec, c)) for c in spec.concepts}

    with stage("fuse"):
        prog("fusing", 0, 1)
        weights = _fuse(original, refined, spec, stats, loras, priors, run)
    rounds: list[dict] = []
    if run.robust_rounds and not closed_form_only:
        with stage("harden"):
            for r in range(run.robust_rounds):
                deltas = {k: weights[k] - original[k] for k in original if not k.endswith(POOLED_SUFFIX)}
                for c in mine:
                    if stats[c.phrase].hardened > r:
                        continue  # done before an interruption
                    if stop():
                        raise InterruptedRun(f"stopped while hardening {c.phrase!r}; rerun to resume")
                    adv, loss, soft = adversarial_stats(backend, deltas, project.load_latents(c),
                                                        get_type(c.type).train_prompt, concept_prompts(c, "{}"),
                                                        c.anchor, run.attack_steps, concept_seed(run.seed, c) + r)
                    project.save_attack(c, r + 1, soft, get_type(c.type).train_prompt)
                    project.save_stats(c, stats[c.phrase].add(adv, r + 1))
                    rounds.append({"round": r + 1, "concept": c.phrase, "attack_loss": loss})
                    prog("hardening", r + 1, run.robust_rounds)
                barrier()
                stats = {c.phrase: project.load_stats(c) for c in spec.concepts}
                weights = _fuse(original, refine_weights(original, list(stats.values()), run, priors), spec, stats,
                                loras, priors, run)
    meta = erasure_metadata(spec, base_sha256, base_name, closed_form_only)
    return ErasureResult(weights, meta, {"timings": stage.seconds, "peak_memory_gb": stage.peak_gb,
                                         "reused_loras": reused, "robust": rounds,
                                         "unknown_lists": unknown,
                                         "losses": {c.phrase: project.lora_losses(c) for c in spec.concepts}})


class StageLog:
    """Wall time and peak memory of each stage of a run: on CUDA the most memory allocated on the
    device during the stage; elsewhere the process's peak resident memory so far (the OS keeps no
    per-stage peak; None where it cannot be read, e.g. Windows)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self.peak_gb: dict[str, float | None] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - t0
            self.peak_gb[name] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if cuda else _peak_rss_gb()


def _peak_rss_gb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 2 ** 20 if sys.platform != "darwin" else kb / 2 ** 30  # macOS reports bytes


def describe_stages(report: dict) -> str:
    """"refine 1.2 s (peak 0.5 GB), train ..." from an `ErasureResult.report`."""
    peaks = report.get("peak_memory_gb", {})
    return ", ".join(f"{k} {v:.1f} s" + (f" (peak {peaks[k]:.2f} GB)" if peaks.get(k) is not None else "")
                     for k, v in report.get("timings", {}).items())


def _world() -> tuple[int, int, Callable[[], None]]:
    """(rank, world size, barrier) when torch.distributed is initialised, else (0, 1, no-op)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist.barrier
    return 0, 1, lambda: None


def refuse(project: Project, original: Mapping[str, torch.Tensor], only=None, exclude=(),
           closed_form_only: bool = False) -> ErasureResult:
    """Re-fuse a subset of a project's concepts in closed form (no model, no training): restoring
    X = fusing everything but X. Stage 1 is re-solved exactly from the stored sums."""
    spec = project.spec(only, exclude)
    m = project.manifest()
    run = spec.settings_for() if spec.concepts else None
    if not spec.concepts:
        return ErasureResult({k: v.float() for k, v in original.items()},
                             erasure_metadata(spec, m["base"]["sha256"], m["base"]["path"], closed_form_only))
    stats = {}
    for c in spec.concepts:
        st = project.load_stats(c)
        if st is None:
            raise MaceError(f"concept {c.phrase!r} has no stage-1 statistics yet (its run stopped before them): erase "
                            "again with this project to compute them")
        stats[c.phrase] = st
    priors = project.load_priors()[0]
    refined = refine_weights(original, list(stats.values()), run, priors)
    loras = {}
    if not closed_form_only:
        for c in spec.concepts:
            lora = project.load_lora(c)
            if lora is None:
                raise MaceError(f"concept {c.phrase!r} has no trained LoRA (its run stopped before training, or was "
                                "closed-form only): re-fuse closed-form only, or erase again with this project to "
                                "train it")
            loras[c.phrase] = lora
    weights = _fuse(original, refined, spec, stats, loras, priors, run)
    return ErasureResult(weights, erasure_metadata(spec, m["base"]["sha256"], m["base"]["path"], closed_form_only))


# ---------------------------------------------------------------------------------------------


def _stats(backend: Backend, project: Project, c: Concept, anchors: dict[tuple[str, ...], TextBatch],
           stop: Callable[[], bool] | None = None) -> ConceptStats:
    """The concept's stage-1 sums, onto the mean of its stage-1 anchors (`ConceptType.stage1_anchors`):
    sum_k ||W e - W0 e*_k||^2 / K has the same minimiser as ||W e - W0 mean_k e*_k||^2, so the sums of
    the K pairings, each divided by K, are the mean's. The phrase and each of its found synonyms are
    mapped alike and weigh 1/W each (W words): the concept pulls on the weights as hard as the phrase alone
    did, shared among the words that draw it (summed, one synonym doubled the pull, and the other
    identities paid for it: benchmarks/RESULTS.md)."""
    st = project.load_stats(c)
    if st is None:
        parts = []
        for word in (c.phrase, *c.found_synonyms):
            prompts = concept_prompts(c, word)
            text = backend.encode(prompts)
            for anchor_prompts in anchor_prompt_sets(c):
                if stop is not None and stop():  # 60 prompts an anchor: seconds each on a CPU
                    raise InterruptedRun(f"stopped while encoding {c.phrase!r} (stage 1); rerun to resume")
                if anchor_prompts not in anchors:
                    anchors[anchor_prompts] = backend.encode(list(anchor_prompts))
                parts.append(concept_stats(backend, prompts, anchor_prompts, concept_text=text,
                                           anchor_text=anchors[anchor_prompts]))
        st = parts[0] if len(parts) == 1 else ConceptStats.mean(parts)
        project.save_stats(c, st)
    return st


#: the progress label while the retain list (or the default protection) is encoded
KEPT_LABEL = "encoding what is kept (stage 1)"


def retain_key(spec: ErasureSpec) -> str:
    """Identity of the project's retain-list Gram: the kept phrases, put into the first concept's
    templates (either changing re-encodes them)."""
    kept, _ = spec.protected()
    key = [sorted(kept), get_type(spec.concepts[0].type).templates_key] if kept else []
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def general_missing(spec: ErasureSpec, priors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> bool:
    """Whether the run needs a general prior that its project's priors (``priors``, ``meta``: their
    metadata) do not hold: none stored, or one made from other captions (the built-in corpus, id "", or
    another caption file)."""
    run = spec.settings_for()
    if not (run.prior or run.fuse_prior):
        return False
    return "general" not in priors or meta.get("general", "") != prior_captions(run.prior_captions)[1]


def retain_missing(spec: ErasureSpec, meta: Mapping[str, str]) -> bool:
    """Whether the run must encode its kept phrases: it keeps some, with a retain prior, and the project's
    priors (``meta``, their metadata) hold none for them."""
    kept, _ = spec.protected()
    return bool(kept) and bool(spec.settings_for().domain) and meta.get("retain") != retain_key(spec)


def _general(backend: Backend, project: Project, spec: ErasureSpec, prior_dir: Path | None = None,
             prog: Progress | None = None, stop: Callable[[], bool] | None = None
             ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The project's priors and their metadata, with the general prior ("general", and "general_pooled" for
    SDXL) computed and stored if `general_missing`."""
    priors, meta = project.load_priors()
    if general_missing(spec, priors, meta):
        run = spec.settings_for()
        for name, g in general_prior(backend, backend.text_encoder_key(), folder=prior_dir, progress=prog,
                                     should_stop=stop, captions_file=run.prior_captions).items():
            priors["general" if name == "context" else "general_pooled"] = g
        meta["general"] = prior_captions(run.prior_captions)[1]
        project.save_priors(priors, meta)
    return priors, meta


def _kept(backend: Backend, project: Project, spec: ErasureSpec, priors: dict[str, torch.Tensor],
          meta: dict[str, str], prog: Progress | None = None, stop: Callable[[], bool] | None = None
          ) -> dict[str, torch.Tensor]:
    """``priors`` (the project's, with their metadata ``meta``: `_general`'s) with the retain-list Grams
    ("domain", and "domain_pooled" for SDXL) computed and stored if `retain_missing`: per-token general and
    retain-list Grams kept in the project so that re-fusion needs no model."""
    kept, _ = spec.protected()
    if retain_missing(spec, meta):
        # the sum of each kept phrase's own mean Gram: `domain` weighs per kept concept, so a long
        # retain list keeps each of its concepts as strongly as a short one instead of diluting them
        sums: dict[str, torch.Tensor] = {}
        for i, r in enumerate(kept):
            if prog is not None:  # a hundred names in 60 prompts each: minutes on a CPU
                prog(KEPT_LABEL, i, len(kept))
            if stop is not None and stop():
                raise InterruptedRun("stopped while encoding the retain list; nothing was kept")
            for name, g in mean_grams(backend, concept_prompts(spec.concepts[0], r)).items():
                sums[name] = sums[name] + g if name in sums else g
        priors.update({("domain" if name == "context" else "domain_pooled"): g for name, g in sums.items()})
        meta["retain"] = retain_key(spec)
        project.save_priors(priors, meta)
    return priors


def refine_weights(original: Mapping[str, torch.Tensor], stats: list[ConceptStats], run,
                   priors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stage 1 for every K/V weight (and SDXL's pooled projection, keys ending in ``POOLED_SUFFIX``)."""
    kv = {k: v for k, v in original.items() if not k.endswith(POOLED_SUFFIX)}
    k2 = overlap(stats) if run.balance == "overlap" else 1.0
    lam, s, s2 = run.lam * k2, run.prior * k2, run.domain * k2
    m = context_map(stats, lam, prior=priors.get("general"), s=s, domain=priors.get("domain"), s2=s2)
    out = apply_map(kv, m)
    for k in set(original) - set(kv):
        mp = pooled_map(stats, lam, prior=priors.get("general_pooled"), s=s, domain=priors.get("domain_pooled"),
                        s2=s2)
        out[k] = apply_pooled(original[k], mp)
    return out


def _train_concept(backend: Backend, project: Project, spec: ErasureSpec, c: Concept,
                   original: Mapping[str, torch.Tensor], base_delta: Mapping[str, torch.Tensor], h: str,
                   prog: Progress, stop) -> LoRA:
    s = spec.settings_for(c)
    seed = concept_seed(s.seed, c)
    prompt = train_prompt(c)
    prog(f"drawing {c.phrase}", 0, s.images)
    data = draw_concept(backend, prompt, c.phrase, [seed + i for i in range(s.images)], s.sample_steps,
                        s.guidance, "none" if s.mask == "none" else "attention", s.mask_threshold,
                        batch_size=draw_batch(s, backend.resolution), on_batch=lambda d, n: prog(f"drawing {c.phrase}", d, n))
    if not bool(torch.isfinite(data.latents).all()):
        # a LoRA trained on them is NaN, and so is every fused weight: refuse before writing anything
        fix = ("erase closed-form only (no images)" if backend.dtype == torch.float32 else
               "run it in fp32 (CLI --dtype fp32, A1111 --no-half, ComfyUI --force-fp32) or erase closed-form only")
        raise MaceError(f"the model's own images of {c.phrase!r} are not finite (NaN or inf, sampled in "
                        f"{str(backend.dtype).replace('torch.', '')}), so nothing can be trained on them: {fix}")
    if s.mask == "sam":
        from .sam import refine_masks  # optional dependency, imported only when asked for

        data.masks = refine_masks(data, s.sam_checkpoint, backend.vae_scale, backend.device)
    save_data(data, project.concept_dir(c))
    project.save_latents(c, data.latents)
    prompts = [prompt] + concept_prompts(c)
    tokens = phrase_token_mask(backend, prompts, c.phrase, with_end=True)

    def on_step(i: int, n: int, loss: float) -> None:
        prog(f"training {c.phrase}", i, n)
        if stop():
            raise InterruptedRun(f"stopped while training {c.phrase!r}; finished concepts are saved, rerun to resume")

    prog(f"training {c.phrase}", 0, s.steps)
    lora, losses = train_lora(backend, data, prompts, tokens, base_delta, s, seed, on_step, original)
    project.save_lora(c, lora, h, losses)
    return lora


def _fuse(original, refined, spec: ErasureSpec, stats, loras: Mapping[str, LoRA], priors, run):
    """Stage 3 over the K/V weights; SDXL's pooled projection has no LoRA and keeps its stage-1 value."""
    if not loras:
        return dict(refined)
    kv = {k: v for k, v in refined.items() if not k.endswith(POOLED_SUFFIX)}
    chosen = [loras[c.phrase] for c in spec.concepts]
    grams = [stats[c.phrase].fusion_gram for c in spec.concepts]
    if run.separable:
        chosen = separate(chosen, grams)
    if run.fusion == "naive":
        fused = naive_sum(kv, chosen)
    else:
        fused = fuse(original, kv, zip(chosen, grams), run.fuse_lam, priors.get("general"), run.fuse_prior)
    return {**refined, **fused}


def editable_weights(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """From a file's tensors, fp32 copies of the weights stage 1 edits (what `refuse` needs)."""
    return {k: v.float() for k, v in tensors.items() if k.startswith("model.diffusion_model.") and
            k.endswith(("attn2.to_k.weight", "attn2.to_v.weight", POOLED_SUFFIX))}


def save_result(ckpt, result: ErasureResult, out, overwrite: bool = False, inputs: tuple = ()) -> list[str]:
    """Write the erased checkpoint (input tensors + edits, modelspec + mace.* metadata); returns the
    erased phrases. ``overwrite``: replace an existing ``out``; ``inputs``: files never replaced."""
    from ..model.checkpoint import modelspec, save_edited

    out = Path(out)
    names = result.erased
    desc = "concepts erased with mace: " + (", ".join(names) or "none")
    save_edited(ckpt, result.weights, out, {**modelspec(ckpt.family, out.stem, desc), **result.metadata},
                overwrite, inputs)
    return names


def erasure_metadata(spec: ErasureSpec, base_sha256: str, base_name: str, closed_form_only: bool = False
                     ) -> dict[str, str]:
    """The ``mace.*`` keys recording what was erased and how."""
    run = spec.settings_for() if spec.concepts else None
    return {
        "mace.version": __version__,
        "mace.concepts": json.dumps([{"phrase": c.phrase, "anchor": c.anchor, "type": c.type,
                                      "stage1_anchors": list(get_type(c.type).stage1_anchors(c)),
                                      "found_synonyms": list(c.found_synonyms),
                                      "found_neighbours": list(c.found_neighbours)}
                                     for c in spec.concepts]),
        "mace.retain": json.dumps(list(spec.retain)),
        # what stage 1 actually kept: the retain list, or the types' default protection (named)
        "mace.protected": json.dumps(dict(zip(("phrases", "source"), spec.protected())) if spec.concepts else {}),
        "mace.settings": json.dumps(run.to_dict() if run else {}),
        "mace.concept_settings": json.dumps({c.phrase: spec.settings_for(c).to_dict() for c in spec.concepts}),
        "mace.stages": "refine" if closed_form_only else "refine+lora+fuse",
        "mace.base_sha256": base_sha256,
        "mace.base_name": base_name,
        "mace.clip_skip": str(run.clip_skip if run else 1),
    }
