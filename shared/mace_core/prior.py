"""Prior knowledge to preserve: Gram matrices of text embeddings, cached on disk.

The general prior stands for "everything else the model draws": the Gram matrix sum_p p p^T over
every token position of a generated caption corpus (`corpus.general_captions`), divided by the
number of embeddings so that its strength means the same for any corpus size. It depends only on
the text encoder, so it is computed once per text encoder and cached, keyed by a hash of the
encoder's weights and of how its output is taken (layer, final norm) — d x d, e.g. 768 x 768 for
SD 1.x, not a file per UNet.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from .backend import Backend

CORPUS_VERSION = "1"


def cache_dir() -> Path:
    return Path(os.environ.get("MACE_CACHE", Path.home() / ".cache" / "mace"))


def mean_grams(backend: Backend, prompts: Sequence[str], batch_size: int = 64,
               on_batch: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """Per-embedding Gram matrices of ``prompts``, float64: "context" [D, D] over all T positions
    of every prompt and, for SDXL, "pooled" [P, P] over the prompts' pooled embeddings."""
    sums: dict[str, torch.Tensor] = {}
    counts = {"context": 0, "pooled": 0}
    for s in range(0, len(prompts), batch_size):
        text = backend.encode(list(prompts[s:s + batch_size]))
        parts = {"context": text.context.double().cpu().reshape(-1, text.context.shape[-1])}
        if text.pooled is not None:
            parts["pooled"] = text.pooled.double().cpu()
        for name, e in parts.items():
            sums[name] = sums[name] + e.T @ e if name in sums else e.T @ e
            counts[name] += e.shape[0]
        if on_batch:
            on_batch(min(s + batch_size, len(prompts)), len(prompts))
    return {name: g / counts[name] for name, g in sums.items()}


def general_prior(backend: Backend, text_key: str, n_captions: int = 6000,
                  on_batch: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """The cached per-token general prior ("context" [D, D], SDXL also "pooled" [P, P]) for the
    text encoder identified by ``text_key``."""
    from safetensors.torch import load_file, save_file

    from .corpus import general_captions

    key = hashlib.sha256(f"{text_key}|{CORPUS_VERSION}|{n_captions}".encode()).hexdigest()[:24]
    path = cache_dir() / "prior" / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))
        except Exception:  # a damaged cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    grams = mean_grams(backend, general_captions(n_captions), on_batch=on_batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in grams.items()}, str(tmp), metadata={"captions": str(n_captions)})
    os.replace(tmp, path)
    return grams


def tensors_key(tensors: dict[str, torch.Tensor], how: str) -> str:
    """Hash of text-encoder tensors (name, dtype, shape, bytes) plus how its output is taken."""
    h = hashlib.sha256(how.encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
