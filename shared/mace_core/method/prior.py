"""Prior knowledge to preserve: Gram matrices of text embeddings, cached on disk.

The general prior stands for "everything else the model draws": the Gram matrix sum_p p p^T over
every token position of a generated caption corpus (`corpus.general_captions`), divided by the
number of embeddings so that its strength means the same for any corpus size. A fine-tune whose
prompts that everyday-English corpus does not speak gets its prior from the user's own captions
(`Settings.prior_captions`, `prior_captions`): the edit is held where the prior's captions put
embeddings, so what the prior does not cover is not protected (benchmarks/RESULTS.md). It depends only on
the text encoder, so it is computed once per text encoder and kept in a folder, keyed by a hash of
the encoder's weights and of how its output is taken (layer, final norm) — d x d, e.g. 768 x 768
for SD 1.x, not a file per UNet.

Where: the hosts keep it in their model folder (``models/mace/prior/``: ComfyUI's and A1111/Forge's);
the CLI in ``$MACE_CACHE/prior`` (default ``~/.cache/mace/prior``).

How many captions: `PRIOR_CAPTIONS`, measured by benchmarks/prior_captions.py (fp32, CPU): the
relative change ||G_N - G_6000|| / ||G_6000|| of the prior computed from the first N captions of the
corpus instead of 6,000 (figures in benchmarks/RESULTS.md, "General prior: captions").

On a CPU the encodings run in fp32 whatever the backend's dtype (fp16 matmuls there are slow and
round the sums); batched, with progress and an interrupt check between batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..model.backend import Backend

CORPUS_VERSION = "1"
PRIOR_CAPTIONS = 2000  # see the module docstring for the measurement
BATCH = 50
# the prior's batches: small on a CPU, so that an interrupt (checked between batches) acts within
# seconds there (SD1.5's text encoder: ~0.2-0.8 s per caption on one core), large on a GPU
PRIOR_BATCH = {"cpu": 10, "cuda": 100}
PRIOR_LABEL = "general prior (first use of this text encoder)"

Progress = Callable[[str, int, int], None]


def cache_dir() -> Path:
    return Path(os.environ.get("MACE_CACHE", Path.home() / ".cache" / "mace"))


def default_prior_dir() -> Path:
    """Where the CLI keeps general priors (hosts pass their own ``models/mace/prior``)."""
    return cache_dir() / "prior"


def accumulate_grams(backend: Backend, prompts: Sequence[str], batch_size: int = BATCH,
                     on_sums: Callable[[int, int, dict, dict], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> dict[str, torch.Tensor]:
    """Per-embedding Gram matrices of ``prompts``, float64: "context" [D, D] over all T positions
    of every prompt and, for SDXL, "pooled" [P, P] over the prompts' pooled embeddings.

    ``on_sums(done, total, sums, counts)`` after each batch (the running sums, not normalised);
    ``should_stop()`` before each batch: True raises `errors.InterruptedRun`."""
    from ..errors import InterruptedRun

    sums: dict[str, torch.Tensor] = {}
    counts = {"context": 0, "pooled": 0}
    for s in range(0, len(prompts), batch_size):
        if should_stop is not None and should_stop():
            raise InterruptedRun(f"stopped while encoding captions ({s}/{len(prompts)}); nothing was kept")
        text = backend.encode(list(prompts[s:s + batch_size]))
        parts = {"context": text.context.double().cpu().reshape(-1, text.context.shape[-1])}
        if text.pooled is not None:
            parts["pooled"] = text.pooled.double().cpu()
        for name, e in parts.items():
            sums[name] = sums[name] + e.T @ e if name in sums else e.T @ e
            counts[name] += e.shape[0]
        if on_sums:
            on_sums(min(s + batch_size, len(prompts)), len(prompts), sums, counts)
    return normalised(sums, counts)


def normalised(sums: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """The per-embedding priors from `accumulate_grams`' running sums (each sum over its count)."""
    return {name: g / counts[name] for name, g in sums.items()}


def mean_grams(backend: Backend, prompts: Sequence[str], batch_size: int = BATCH,
               on_batch: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> dict[str, torch.Tensor]:
    """`accumulate_grams` reporting ``on_batch(done, total)``."""
    report = (lambda done, total, _s, _c: on_batch(done, total)) if on_batch else None
    return accumulate_grams(backend, prompts, batch_size, report, should_stop)


def prior_captions(captions_file: str | None, n_captions: int = PRIOR_CAPTIONS) -> tuple[list[str] | None, str]:
    """The general prior's source: (None, "") for the built-in corpus, else the captions of the user's
    file (`Settings.prior_captions`; at most ``n_captions``, evenly spread over a longer file so that a
    file sorted by topic is still covered) and the id of the file's captions (`corpus.captions_id`)."""
    from .corpus import captions_id, read_captions

    if not captions_file:
        return None, ""
    captions = read_captions(captions_file)
    n = len(captions)
    chosen = captions if n <= n_captions else [captions[i * n // n_captions] for i in range(n_captions)]
    return chosen, captions_id(captions)


def prior_path(folder: str | Path, text_key: str, n_captions: int = PRIOR_CAPTIONS, source: str = "") -> Path:
    """The cache file of a general prior: ``source`` is "" for the built-in corpus (whose keys predate
    user caption files), else the id of the captions (`prior_captions`)."""
    key = hashlib.sha256(f"{text_key}|{CORPUS_VERSION}|{n_captions}{'|' + source if source else ''}".encode())
    return Path(folder) / f"{key.hexdigest()[:24]}.safetensors"


def _cache_entry(folder: str | Path | None, text_key: str, n_captions: int, captions_file: str | None
                 ) -> tuple[Path, list[str] | None, int, str]:
    """(cache file, the file's chosen captions or None for the corpus, how many captions, source id) of a
    general prior (`prior_captions`, `prior_path`; ``folder`` None: `default_prior_dir`)."""
    chosen, source = prior_captions(captions_file, n_captions)
    n = len(chosen) if chosen is not None else n_captions
    return prior_path(folder if folder is not None else default_prior_dir(), text_key, n, source), chosen, n, source


@contextlib.contextmanager
def float32_text(backend: Backend) -> Iterator[None]:
    """The backend's text encoders in fp32 for the block when it runs on the CPU in half precision,
    through its ``text_encoders_float32`` context manager where it has one; a backend without one
    encodes in its own arithmetic (DiffusersBackend: fp32 on the CPU; ComfyUI stores CLIP in fp16 on
    the CPU but computes in fp32, its manual-cast layers casting each weight to the fp32 input)."""
    hook = getattr(backend, "text_encoders_float32", None)
    if hook is None or backend.device.type != "cpu":
        yield
        return
    with hook():
        yield


def general_prior(backend: Backend, text_key: str, n_captions: int = PRIOR_CAPTIONS, *,
                  folder: str | Path | None = None, progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None, captions_file: str | None = None
                  ) -> dict[str, torch.Tensor]:
    """The per-token general prior ("context" [D, D], SDXL also "pooled" [P, P]) for the text encoder
    identified by ``text_key``: read from ``folder`` (default `default_prior_dir`), else computed from
    ``n_captions`` captions of the built-in corpus or of ``captions_file`` (`prior_captions`), reporting
    ``progress(PRIOR_LABEL, done, total)`` from its start, and stopping (`errors.InterruptedRun`, nothing
    written) when ``should_stop()`` turns True."""
    from safetensors.torch import load_file

    from .corpus import general_captions
    from ..files import save_tensors

    path, chosen, n, source = _cache_entry(folder, text_key, n_captions, captions_file)
    if path.is_file():
        try:
            return load_file(str(path))
        except Exception:  # a damaged cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    captions = chosen if chosen is not None else general_captions(n_captions)
    report = (lambda done, total: progress(PRIOR_LABEL, done, total)) if progress else None
    if report:
        report(0, len(captions))
    batch = PRIOR_BATCH.get(backend.device.type, BATCH)
    with float32_text(backend):
        grams = mean_grams(backend, captions, batch, on_batch=report, should_stop=should_stop)
    save_tensors(path, grams, {"captions": str(n), "source": source or f"corpus v{CORPUS_VERSION}"}, checked=True,
                 what="the prior cache")
    return grams


def prior_missing(backend: Backend, spec_prior: float, spec_fuse_prior: float, folder: str | Path | None,
                  n_captions: int = PRIOR_CAPTIONS, captions_file: str | None = None) -> int:
    """Captions a run still has to encode for the general prior (0 when off or already computed)."""
    if not (spec_prior or spec_fuse_prior):
        return 0
    path, _, n, _ = _cache_entry(folder, backend.text_encoder_key(), n_captions, captions_file)
    return 0 if path.is_file() else n
