"""Tiny models of the real SD1 / SD2 / SDXL architectures (random weights), written once per test
session in both layouts. Import from tests: `from tiny import tiny_file, tiny_folder`."""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
from pathlib import Path

import torch

from mace_core.model.checkpoint import save_new_checkpoint, save_new_diffusers
from synthetic import random_modules, tiny_family

# files that are not usable caption files (`Settings.prior_captions`) for the hostile-input catalogues
REPO = Path(__file__).resolve().parents[1]
FEW_CAPTIONS = str(REPO / "requirements.txt")  # text, fewer than 50 lines
NOT_TEXT = str(REPO / "shared" / "toyworld" / "data" / "toy-sd1.safetensors")  # binary

_ROOT = Path(tempfile.mkdtemp(prefix="mace-tiny-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)  # 150 MB a session: left behind, they filled /tmp
FAMILIES = ("sd1", "sd2", "sdxl")


@functools.lru_cache(maxsize=None)
def tiny_modules(name: str, seed: int = 0):
    return random_modules(tiny_family(name), seed)


@functools.lru_cache(maxsize=None)
def tiny_file(name: str, dtype: str = "float32") -> Path:
    """A single-file ldm-layout checkpoint (read-only use: tests must not modify it)."""
    path = _ROOT / f"{name}-{dtype}.safetensors"
    if path.is_file():  # tiny_file("sd1") and tiny_file("sd1", "float32") are two cache entries, one file
        return path
    unet, vae, tes = tiny_modules(name)
    return save_new_checkpoint(path, tiny_family(name), unet=unet, vae=vae,
                               text_encoder=tes[0], text_encoder_2=tes[1] if len(tes) > 1 else None,
                               dtype=getattr(torch, dtype))


@functools.lru_cache(maxsize=None)
def tiny_folder(name: str) -> Path:
    unet, vae, tes = tiny_modules(name)
    return save_new_diffusers(_ROOT / f"{name}-diffusers", tiny_family(name), unet=unet, vae=vae,
                              text_encoder=tes[0], text_encoder_2=tes[1] if len(tes) > 1 else None)


@contextlib.contextmanager
def one_thread():
    """Run the block on one CPU thread: float reductions then split the same way on every run (with
    several threads MKL picks its thread count by the machine's load), so two computations that are
    the same mathematically give the same bits, and comparisons of trained results need no tolerance."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A tiny random transformers CLIPModel + CLIPProcessor saved in ``path`` (8-dim projections,
    32 px images, the shipped SD1 BPE tokenizer): what `--clip PATH` / `clip:PATH` load."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from mace_core.model.checkpoint import make_tokenizer
    from mace_core.model.families import load_family

    torch.manual_seed(seed)
    tok = make_tokenizer(load_family("sd1").text_encoders[0])
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    CLIPModel(cfg).eval().save_pretrained(path)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    proc.save_pretrained(path)
    return path
