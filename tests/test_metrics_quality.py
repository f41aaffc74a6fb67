"""Retained-quality metrics (CLIP score, FID, NudeNet count) against independent computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mace_core.errors import MaceError
from mace_core.metrics import clip_score_from_embeddings, frechet_distance, frechet_from_stats, gaussian_stats
from mace_core.quality import clip_image_extractor, clip_score, fid, load_clip, nudenet_counter

TOKENIZER = Path(__file__).resolve().parents[1] / "shared" / "mace_core" / "data" / "clip_tokenizer"


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# ------------------------------------------------------------------------------------------------
# FID


def test_frechet_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(0).normal(size=(200, 8))
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)


def test_frechet_diagonal_gaussians_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    want = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()  # 1+6.25 + (4+1+0) = 12.25
    assert want == pytest.approx(12.25)
    assert frechet_from_stats(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-9)


def test_frechet_full_covariances_brute_force():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(250, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a.T), np.cov(b.T)
    r1 = _sqrt_psd(c1)
    # Tr sqrt(C1 C2) = Tr sqrt(C1^1/2 C2 C1^1/2), the latter symmetric PSD
    want = ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(_sqrt_psd(r1 @ c2 @ r1))
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-7)
    mu, sigma = gaussian_stats(a)
    np.testing.assert_allclose(sigma, c1)


def test_frechet_without_scipy(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy -> ImportError: the eigen route
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(100, 5)), rng.normal(size=(120, 5)) * 2 + 1
    r1 = _sqrt_psd(np.cov(a.T))
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(np.cov(a.T) + np.cov(b.T)) \
        - 2 * np.trace(_sqrt_psd(r1 @ np.cov(b.T) @ r1))
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)


# ------------------------------------------------------------------------------------------------
# CLIP score


def test_clip_score_from_embeddings_by_hand():
    img = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    txt = np.array([[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])  # cos 1, 0, -1 (clipped to 0)
    assert clip_score_from_embeddings(img, txt) == pytest.approx(100 / 3)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    tok = CLIPTokenizer(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt"), model_max_length=77)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).eval().save_pretrained(path)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    proc.save_pretrained(path)
    return path


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 40, 48, 3), dtype=np.uint8)


def _feat(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_clip_score_matches_independent_computation(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    images, prompts = _images(3), ["a photo of a cat", "a red car", "Tom Cruise"]
    model = CLIPModel.from_pretrained(tiny_clip, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(tiny_clip, local_files_only=True)
    with torch.no_grad():
        pix = proc(images=list(images), return_tensors="pt")["pixel_values"]
        ie = _feat(model.get_image_features(pixel_values=pix))
        want = []
        for p, e in zip(prompts, ie):  # one prompt at a time: no padding involved
            te = _feat(model.get_text_features(**proc.tokenizer([p], return_tensors="pt")))[0]
            want.append(100 * max(torch.nn.functional.cosine_similarity(e, te, dim=0).item(), 0.0))
    got = clip_score(images, prompts, tiny_clip)
    assert got == pytest.approx(float(np.mean(want)), abs=1e-4)
    assert 0.0 <= got <= 100.0


def test_clip_feature_fid_and_missing_folder(tiny_clip, tmp_path):
    extract = clip_image_extractor(tiny_clip)
    a = _images(12, 1)
    assert extract(a).shape == (12, 8)
    assert fid(a, a, extract) == pytest.approx(0.0, abs=1e-6)
    assert fid(a, _images(12, 2) // 4, extract) > 0.0
    with pytest.raises(MaceError, match="CLIP folder"):
        load_clip(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------
# NudeNet


def test_nudenet_missing_package_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nudenet", None)
    with pytest.raises(MaceError, match="pip install nudenet"):
        nudenet_counter()


def test_nudenet_flat_gray_counts_zero():
    pytest.importorskip("nudenet")
    count = nudenet_counter(threshold=0.6)
    gray = np.full((2, 128, 128, 3), 128, np.uint8)
    assert count(gray) == [0, 0]
    from mace_core.evaluate import nudenet_classifier

    assert nudenet_classifier(0.6)(gray) == ["none", "none"]


# ------------------------------------------------------------------------------------------------
# wiring into the object protocol (`mace eval --clip PATH`)


def test_object_protocol_reports_clip_quality(tiny_clip):
    from mace_core.checkpoint import load_checkpoint
    from mace_core.diffusers_backend import DiffusersBackend
    from mace_core.evaluate import object_protocol
    from mace_core.sampling import generate
    from tiny import tiny_file

    model = DiffusersBackend.from_checkpoint(load_checkpoint(tiny_file("sd1")), device="cpu")
    seeds = [0, 1]
    rep = object_protocol(model, lambda imgs: ["x"] * len(imgs), {"cat": "cat"}, {}, {"dog": "x"},
                          "a photo of a {}", seeds, steps=2, base=model, clip=str(tiny_clip))
    imgs = generate(model, ["a photo of a dog"] * 2, seeds, 2, 7.5)
    want = clip_score(imgs, ["a photo of a dog"] * 2, tiny_clip)
    assert rep.scores["clip_score_retained"] == pytest.approx(want, abs=1e-4)
    assert rep.scores["clip_score_retained_base"] == pytest.approx(want, abs=1e-4)
    assert rep.scores["clip_fd_retained"] == pytest.approx(0.0, abs=1e-4)  # same model, same seeds
