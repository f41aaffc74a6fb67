"""Retained-quality metrics (CLIP score, FID, NudeNet count) against independent computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mace_core.errors import MaceError
from mace_core.eval.metrics import clip_score_from_embeddings, frechet_distance, frechet_from_stats, gaussian_stats
from mace_core.eval.quality import (NUDENET_EXPOSED, clip_image_extractor, clip_score, exposed_hits, fid, load_clip,
                               nudenet_detector, per_class_counts)
from tiny import save_tiny_clip


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
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


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
        nudenet_detector()


def _det(cls: str, score: float) -> dict:
    return {"class": cls, "score": score, "box": [0, 0, 10, 10]}  # NudeDetector.detect's format


# three images' detections: exposed and covered classes, scores around the paper's 0.6
DETECTIONS = [
    [_det("FEMALE_BREAST_EXPOSED", 0.71), _det("FACE_FEMALE", 0.93), _det("BELLY_EXPOSED", 0.59)],
    [_det("FEMALE_BREAST_EXPOSED", 0.6), _det("FEET_EXPOSED", 0.95), _det("FEMALE_BREAST_COVERED", 0.99)],
    [],
]


def test_exposed_hits_and_per_class_counts_by_hand():
    hits = [exposed_hits(d, 0.6) for d in DETECTIONS]
    # 0.59 is below the threshold, 0.6 is not; covered and face classes never count
    assert hits == [["FEMALE_BREAST_EXPOSED"], ["FEMALE_BREAST_EXPOSED", "FEET_EXPOSED"], []]
    counts = per_class_counts(hits)
    assert list(counts) == list(NUDENET_EXPOSED)  # every exposed class listed, in the paper's order
    assert counts == {**dict.fromkeys(NUDENET_EXPOSED, 0), "FEMALE_BREAST_EXPOSED": 2, "FEET_EXPOSED": 1}
    low = per_class_counts(exposed_hits(d, 0.5) for d in DETECTIONS)
    assert low["BELLY_EXPOSED"] == 1 and sum(low.values()) == 4
    assert sum(per_class_counts(exposed_hits(d, 0.96) for d in DETECTIONS).values()) == 0
    assert exposed_hits(DETECTIONS[1], 0.6, classes={"FEET_EXPOSED"}) == ["FEET_EXPOSED"]


def test_nudenet_classifier_labels_and_tallies_one_detection_pass(monkeypatch):
    import mace_core.eval.quality as quality
    from mace_core.eval.evaluate import NudeNetClassifier

    calls = []

    def fake_detector(threshold=0.6):
        def detect(images):  # image i gets DETECTIONS[i]'s counted classes
            calls.append(len(images))
            return [exposed_hits(DETECTIONS[i], threshold) for i in range(len(images))]
        return detect

    monkeypatch.setattr(quality, "nudenet_detector", fake_detector)
    judge = NudeNetClassifier(0.6)
    images = np.zeros((3, 8, 8, 3), np.uint8)
    assert judge(images) == ["nude", "nude", "none"]
    assert judge.tally(images)["FEMALE_BREAST_EXPOSED"] == 2
    assert calls == [3]  # tally() of the images just classified reuses their detections
    judge.tally(images.copy())
    assert calls == [3, 3]


def test_real_nudenet_finds_nothing_exposed_on_plain_images():
    pytest.importorskip("nudenet")
    gray = np.full((128, 128, 3), 128, np.uint8)
    yy, xx = np.mgrid[:128, :128]
    disk = np.where(((yy - 64) ** 2 + (xx - 64) ** 2 < 30 ** 2)[..., None], [200, 30, 30], 255).astype(np.uint8)
    images = np.stack([gray, disk])
    assert nudenet_detector(0.6)(images) == [[], []]
    from mace_core.eval.evaluate import NudeNetClassifier

    judge = NudeNetClassifier(0.6)
    assert judge(images) == ["none", "none"]
    assert judge.tally(images) == dict.fromkeys(NUDENET_EXPOSED, 0)


# ------------------------------------------------------------------------------------------------
# wiring into the object protocol (`mace eval --clip PATH`)


def test_object_protocol_reports_clip_quality(tiny_clip):
    from mace_core.model.checkpoint import load_checkpoint
    from mace_core.model.diffusers_backend import DiffusersBackend
    from mace_core.eval.evaluate import object_protocol
    from mace_core.model.sampling import generate
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
