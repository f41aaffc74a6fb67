"""Tiny models of the real SD1 / SD2 / SDXL architectures (random weights), written once per test
session in both layouts. Import from tests: `from tiny import tiny_file, tiny_folder`."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from mace_core.checkpoint import save_new_checkpoint, save_new_diffusers
from mace_core.synthetic import random_modules, tiny_family

_ROOT = Path(tempfile.mkdtemp(prefix="mace-tiny-"))
FAMILIES = ("sd1", "sd2", "sdxl")


@functools.lru_cache(maxsize=None)
def tiny_modules(name: str, seed: int = 0):
    return random_modules(tiny_family(name), seed)


@functools.lru_cache(maxsize=None)
def tiny_file(name: str, dtype: str = "float32") -> Path:
    """A single-file ldm-layout checkpoint (read-only use: tests must not modify it)."""
    unet, vae, tes = tiny_modules(name)
    return save_new_checkpoint(_ROOT / f"{name}-{dtype}.safetensors", tiny_family(name), unet=unet, vae=vae,
                               text_encoder=tes[0], text_encoder_2=tes[1] if len(tes) > 1 else None,
                               dtype=getattr(torch, dtype))


@functools.lru_cache(maxsize=None)
def tiny_folder(name: str) -> Path:
    unet, vae, tes = tiny_modules(name)
    return save_new_diffusers(_ROOT / f"{name}-diffusers", tiny_family(name), unet=unet, vae=vae,
                              text_encoder=tes[0], text_encoder_2=tes[1] if len(tes) > 1 else None)


def file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
