"""Evaluation metrics against hand-computed values, and the red team's machinery."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mace_core.method.attacks import misspellings, prompt_attacks, soft_prompt, with_soft_tokens
from mace_core.model.checkpoint import load_checkpoint
from mace_core.model.diffusers_backend import DiffusersBackend
from mace_core.errors import MaceError
from mace_core.eval.evaluate import PromptSet, load_prompt_set, prompt_pairs, psnr, run_protocol, ssim
from mace_core.eval.metrics import accuracy, artist_gap, harmonic_celebrity, harmonic_object
from tiny import tiny_file


def test_harmonic_means_by_hand():
    assert harmonic_object(10, 90, 10) == pytest.approx(90.0)
    # the paper's full-MACE celebrity row: Acc_e 4.31, Acc_retained 84.56 -> H_c 89.78
    assert harmonic_celebrity(4.31, 84.56) == pytest.approx(89.78, abs=0.01)
    # CIFAR-10 average: 8.49 / 97.35 / 10.53 -> 92.61 (paper, rounding of the averages aside)
    assert harmonic_object(8.49, 97.35, 10.53) == pytest.approx(92.7, abs=0.2)
    assert harmonic_object(100, 90, 0) == 0.0
    assert accuracy(["a", "b", "a", "none"], "a") == 50.0
    # H_c = 2 / (1/(100 - 50) + 1/25) = 2 / 0.06
    assert harmonic_celebrity(50, 25) == pytest.approx(100 / 3)
    assert harmonic_celebrity(100, 80) == 0.0
    # the paper's full-MACE artist row: CLIP_e 22.59, CLIP_s 28.58 -> H_a 5.99
    assert artist_gap(22.59, 28.58) == pytest.approx(5.99)


# ------------------------------------------------------------------------------------------------
# prompt sets and the three protocols, on a stub generator whose images say what they show


def test_shipped_prompt_sets_expand_seeds():
    obj = load_prompt_set("object")
    assert obj.protocol == "object" and obj.templates == ("a photo of the {}",)
    assert obj.seeds == tuple(range(200))  # seeds [0], 200 images per prompt: image k uses seed 0 + k
    celeb = load_prompt_set("celebrity")
    assert len(celeb.templates) == 5 and celeb.seeds == (1, 2, 3, 4, 5)
    assert load_prompt_set("artist").protocol == "artist"


def test_prompt_set_file_and_errors(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("protocol: celebrity\ntemplates: ['a {}', '{} smiling']\nseeds: [10, 20]\nimages_per_prompt: 2\n")
    assert load_prompt_set(str(f)) == PromptSet("celebrity", ("a {}", "{} smiling"), (10, 11, 20, 21))
    assert prompt_pairs(["x", "y"], ["a {}", "{}!"], [3, 4]) == (
        ["a x", "a x", "x!", "x!", "a y", "a y", "y!", "y!"], [3, 4, 3, 4, 3, 4, 3, 4])
    with pytest.raises(MaceError, match="unknown protocol"):
        load_prompt_set(tmp_path / "missing.yaml")
    for bad, message in [("protocol: faces\ntemplates: ['{}']\nseeds: [1]\n", "protocol"),
                         ("protocol: artist\ntemplates: ['no slot']\nseeds: [1]\n", "templates"),
                         ("protocol: artist\ntemplates: ['{}']\nseeds: []\n", "seeds"),
                         ("protocol: artist\ntemplates: ['{}']\nseeds: [1]\nimages_per_prompt: 0\n", "seeds")]:
        f.write_text(bad)
        with pytest.raises(MaceError, match=message):
            load_prompt_set(f)


def _stub_generate(model, prompts, seeds, steps=50, guidance=7.5):
    """Images [N, 1, 2, 3]: pixel 0 holds the seed, pixel 1 the code of the prompt's last letter."""
    out = np.zeros((len(prompts), 1, 2, 3), np.uint8)
    out[:, 0, 0, 0] = seeds
    out[:, 0, 1, 0] = [ord(p[-1]) for p in prompts]
    return out


# word (its prompts end with it) -> (what its images show, how many of seeds 0..4 the stub recognises);
# Z is a synonym of A
RECOGNISED = {"A": ("A", 1), "Z": ("A", 2), "D": ("D", 2), "B": ("B", 4), "C": ("C", 4)}


class StubClassifier:
    """Labels an image with what its word shows when its seed is below that word's count, else
    "none"; tallies one "HIT" per recognised image."""

    def __call__(self, images):
        labels = []
        for img in images:
            shows, n = RECOGNISED[chr(img[0, 1, 0])]
            labels.append(shows if img[0, 0, 0] < n else "none")
        return labels

    def tally(self, images):
        return {"HIT": sum(label != "none" for label in self(images))}


@pytest.fixture
def stub_generate(monkeypatch):
    import mace_core.eval.evaluate as evaluate

    monkeypatch.setattr(evaluate, "generate", _stub_generate)


def test_object_protocol_scores_by_hand(stub_generate):
    # two templates, five seeds: 10 images per word
    ps = PromptSet("object", ("a {}", "the {}"), (0, 1, 2, 3, 4))
    rep = run_protocol(ps, None, StubClassifier(), {"A": "A"}, {"A": ["Z"]}, {"B": "B", "C": "C"})
    assert rep.per_prompt == {"A": 20.0, "Z": 40.0, "B": 80.0, "C": 80.0}
    # H_o = 3 / (1/(100 - 20) + 1/80 + 1/(100 - 40)) = 3 / (0.0125 + 0.0125 + 1/60) = 72
    assert rep.scores == pytest.approx({"acc_e": 20.0, "acc_g": 40.0, "acc_s": 80.0, "h_o": 72.0})
    # tallied over the erased word's and its synonym's images only: 2 x 1 + 2 x 2
    assert rep.detections == {"HIT": 6}
    assert "| HIT | 6 |" in rep.markdown()


def test_celebrity_protocol_scores_by_hand(stub_generate):
    ps = PromptSet("celebrity", ("a {}",), (0, 1, 2, 3, 4))
    rep = run_protocol(ps, None, StubClassifier(), {"A": "A", "D": "D"}, {"A": ["Z"]}, {"B": "B"})
    # Acc_e over both erased words' 10 images: (1 + 2) / 10; synonyms do not count here
    assert set(rep.per_prompt) == {"A", "D", "B"}
    assert rep.scores["acc_e"] == pytest.approx(30.0) and rep.scores["acc_retained"] == pytest.approx(80.0)
    assert rep.scores["h_c"] == pytest.approx(2 / (1 / 70 + 1 / 80))
    assert set(rep.scores) == {"acc_e", "acc_retained", "h_c"}


def test_artist_protocol_scores_by_hand(stub_generate, monkeypatch):
    import mace_core.eval.quality as quality

    seen = []

    def fake_clip_score(images, prompts, clip):
        seen.append(list(prompts))
        return {"A": 20.0, "B": 30.0, "C": 28.0}[prompts[0][-1]]

    monkeypatch.setattr(quality, "load_clip", lambda path: "model")
    monkeypatch.setattr(quality, "clip_score", fake_clip_score)
    ps = PromptSet("artist", ("art by {}", "{} style"), (1, 2))
    rep = run_protocol(ps, None, None, {"A": "A"}, {}, {"B": "B", "C": "C"}, clip="clip-folder")
    assert seen[0] == ["art by A", "art by A", "A style", "A style"]  # each image against its own prompt
    assert rep.scores == pytest.approx({"clip_e": 20.0, "clip_s": 29.0, "h_a": 9.0})
    with pytest.raises(MaceError, match="--clip"):
        run_protocol(ps, None, None, {"A": "A"}, {}, {"B": "B"})


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
    # other languages: the shipped table, plus the user's own words; none known: no prompts (skipped)
    assert a["other-language"] == ["a photo of a cercle", "a photo of a Kreis", "a photo of a círculo",
                                   "a photo of a cerchio"]
    assert prompt_attacks("Cat", "{}", other_languages=["neko", "chat"])["other-language"] == \
        ["chat", "Katze", "gato", "gatto", "neko"]
    assert prompt_attacks("Tom Cruise", "{}")["other-language"] == []


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
    from mace_core.eval.evaluate import before_after_grid

    rng = np.random.default_rng(1)
    before = [rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8) for _ in range(2)]
    after = [rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8) for _ in range(2)]
    g = before_after_grid(before, after, scale=2, gap=6)
    assert g.shape == (2 * 8 + 2, 2 * 8 + 6 + 2 * 8, 3)
    assert np.array_equal(g[0:8:2, 0:8:2], before[0][0])  # first image, upscaled 2x
    assert np.array_equal(g[10:18:2, 22:30:2], after[1][0])  # second row, first "after" image
    assert (g[:, 16:22] == 255).all() and (g[8:10] == 255).all()
