"""Evaluation metrics against hand-computed values, and the red team's machinery."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mace_core.attacks import misspellings, prompt_attacks, soft_prompt, with_soft_tokens
from mace_core.checkpoint import load_checkpoint
from mace_core.diffusers_backend import DiffusersBackend
from mace_core.evaluate import psnr, ssim
from mace_core.metrics import accuracy, harmonic_celebrity, harmonic_object
from tiny import tiny_file


def test_harmonic_means_by_hand():
    assert harmonic_object(10, 90, 10) == pytest.approx(90.0)
    # the paper's full-MACE celebrity row: Acc_e 4.31, Acc_retained 84.56 -> H_c 89.78
    assert harmonic_celebrity(4.31, 84.56) == pytest.approx(89.78, abs=0.01)
    # CIFAR-10 average: 8.49 / 97.35 / 10.53 -> 92.61 (paper, rounding of the averages aside)
    assert harmonic_object(8.49, 97.35, 10.53) == pytest.approx(92.7, abs=0.2)
    assert harmonic_object(100, 90, 0) == 0.0
    assert accuracy(["a", "b", "a", "none"], "a") == 50.0


def test_psnr_and_ssim_by_hand():
    a = np.zeros((16, 16, 3), np.uint8)
    b = np.ones((16, 16, 3), np.uint8)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2))  # mse = 1
    assert psnr(a, a) == math.inf
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert ssim(img, img) == pytest.approx(1.0)
    # constant shift c: luminance term only, (2 mu (mu + c) + C1) / (mu^2 + (mu + c)^2 + C1) per window
    flat, shifted = np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    want = (2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1)
    assert ssim(flat, shifted) == pytest.approx(want, rel=1e-9)


def test_prompt_attacks_are_deterministic_rewrites():
    m = misspellings("circle", 3)
    assert len(m) == 3 and len(set(m)) == 3 and "circle" not in m
    assert m == misspellings("circle", 3)
    a = prompt_attacks("circle", "a photo of a {}", ["disk"])
    assert a["synonym"] == ["a photo of a disk"]
    assert all("circle" in p for p in a["long-context"]) and len(a["long-context"][0]) > 80
    assert a["char-noise"][0] in ("a photo of a c-i-r-c-l-e", "a photo of a c i r c l e")


@pytest.fixture(scope="module")
def backend():
    return DiffusersBackend.from_checkpoint(load_checkpoint(tiny_file("sd1")), device="cpu")


def test_soft_tokens_replace_placeholder_embeddings(backend):
    """A soft token set to a word's own embedding encodes exactly like the word."""
    emb = backend.text_token_embeddings()[0]
    cat = emb.weight[backend.tokenize("cat")[1]].detach()[None]
    with with_soft_tokens(backend, cat):
        soft = backend.encode([soft_prompt("a photo of a {}", 1)]).context
    plain = backend.encode(["a photo of a cat"]).context
    assert torch.allclose(soft, plain, atol=1e-6)
    # and outside the block nothing is replaced
    assert not torch.allclose(backend.encode([soft_prompt("a photo of a {}", 1)]).context, plain)


def test_before_after_grid_layout():
    from mace_core.evaluate import before_after_grid

    rng = np.random.default_rng(1)
    before = [rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8) for _ in range(2)]
    after = [rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8) for _ in range(2)]
    g = before_after_grid(before, after, scale=2, gap=6)
    assert g.shape == (2 * 8 + 2, 2 * 8 + 6 + 2 * 8, 3)
    assert np.array_equal(g[0:8:2, 0:8:2], before[0][0])  # first image, upscaled 2x
    assert np.array_equal(g[10:18:2, 22:30:2], after[1][0])  # second row, first "after" image
    assert (g[:, 16:22] == 255).all() and (g[8:10] == 255).all()
