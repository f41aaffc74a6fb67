"""`mace eval` end to end on the shipped toy model: the NudeNet classifier and its per-class table,
a local CLIP folder (zero-shot classifier and CLIP score), and the --protocol prompt sets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mace_core.cli.main import main
from mace_core.eval.evaluate import load_prompt_set
from mace_core.eval.metrics import harmonic_celebrity, harmonic_object
from mace_core.eval.quality import NUDENET_EXPOSED
from tiny import save_tiny_clip

TOY = str(Path(__file__).resolve().parents[1] / "shared" / "toyworld" / "data" / "toy-sd1.safetensors")
FAST = ["--steps", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return str(save_tiny_clip(tmp_path_factory.mktemp("clip")))


def _eval(out: Path, *args: str) -> tuple[dict, str]:
    """Runs `mace eval TOY ARGS --out OUT`; (report.json, report.md)."""
    assert main(["eval", TOY, *args, *FAST, "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def _percentages(scores: dict, keys: tuple[str, ...]) -> None:
    assert all(0.0 <= scores[k] <= 100.0 for k in keys), scores


def test_eval_nudenet_reports_zero_exposed_detections_per_class(tmp_path):
    pytest.importorskip("nudenet")
    rep, md = _eval(tmp_path, "--classifier", "nudenet", "--concept", "circle", "--synonym", "circle=disk",
                    "--retain", "square", "--seeds", "2")
    s = rep["scores"]
    _percentages(s, ("acc_e", "acc_g", "acc_s", "h_o"))
    # toy shapes are never nude: erased prompts are "erased", retained ones "kept"
    assert (s["acc_e"], s["acc_g"], s["acc_s"]) == (0.0, 0.0, 100.0)
    assert s["h_o"] == pytest.approx(harmonic_object(s["acc_e"], s["acc_s"], s["acc_g"]))
    assert rep["detections"] == dict.fromkeys(NUDENET_EXPOSED, 0)
    assert "| class (erased prompts) | detections |" in md and "| FEMALE_BREAST_EXPOSED | 0 |" in md


def test_eval_with_a_local_clip_folder(tmp_path, tiny_clip):
    rep, md = _eval(tmp_path, "--classifier", f"clip:{tiny_clip}", "--clip", tiny_clip, "--base", TOY,
                    "--concept", "circle", "--retain", "square", "--retain", "star", "--seeds", "2")
    s = rep["scores"]
    _percentages(s, ("acc_e", "acc_g", "acc_s", "h_o", "clip_score_retained", "clip_score_retained_base"))
    assert set(rep["per_prompt"]) == {"circle", "square", "star"}
    assert math.isfinite(s["clip_score_retained"])
    # the base is the model itself: no drift, same CLIP score, CLIP-feature distance ~0
    assert s["psnr_retained"] == 99.0 and s["ssim_retained"] == pytest.approx(1.0)
    assert s["clip_score_retained_base"] == pytest.approx(s["clip_score_retained"], abs=1e-4)
    assert s["clip_fd_retained"] == pytest.approx(0.0, abs=1e-3)
    assert rep["detections"] == {} and "detections" not in md
    assert (tmp_path / "grid.png").is_file()


def test_eval_celebrity_protocol_from_the_shipped_prompt_set(tmp_path):
    rep, md = _eval(tmp_path, "--protocol", "celebrity", "--concept", "circle", "--retain", "square")
    s = rep["scores"]
    assert set(s) == {"acc_e", "acc_retained", "h_c"}
    _percentages(s, tuple(s))
    # 5 templates x 5 seeds per word: every accuracy is a multiple of 4 %
    assert all(v % 4 == 0 for v in rep["per_prompt"].values())
    assert s["h_c"] == pytest.approx(harmonic_celebrity(s["acc_e"], s["acc_retained"]))
    assert f"| h_c | {s['h_c']:.2f} |" in md
    # the judged images are kept, one index row each: 2 words x 5 templates x 5 seeds
    rows = [json.loads(r) for r in (tmp_path / "images" / "index.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and len({r["file"] for r in rows}) == 50
    assert all((tmp_path / "images" / r["file"]).is_file() for r in rows)
    assert {r["seed"] for r in rows} == set(load_prompt_set("celebrity").seeds)
    assert sum("circle" in r["prompt"] for r in rows) == 25


def test_eval_interrupted_keeps_the_images_drawn_so_far(tmp_path, monkeypatch, capsys):
    import mace_core.eval.evaluate as evaluate

    calls, real = [], evaluate.generate

    def generate(*a, **kw):  # Ctrl-C while the third word is being drawn
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(evaluate, "generate", generate)
    assert main(["eval", TOY, "--concept", "circle", "--synonym", "circle=disk", "--retain", "square",
                 "--seeds", "2", *FAST, "--out", str(tmp_path)]) == 130
    assert "images drawn so far are in --out's images/" in capsys.readouterr().err
    rows = [json.loads(r) for r in (tmp_path / "images" / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a photo of a circle"] * 2 + ["a photo of a disk"] * 2
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted([r["file"] for r in rows]
                                                                             + ["index.jsonl"])
    assert not (tmp_path / "report.json").exists()
    # a second run into the same --out refuses to mix its images with these, before any compute
    assert main(["eval", TOY, "--concept", "circle", *FAST, "--out", str(tmp_path)]) == 2
    assert "already holds images" in capsys.readouterr().err


def test_eval_artist_protocol_from_a_file(tmp_path, tiny_clip, capsys):
    proto = tmp_path / "artist-small.yaml"
    proto.write_text("protocol: artist\ntemplates: ['a painting of a {}', '{} art']\nseeds: [0]\n"
                     "images_per_prompt: 2\n")
    rep, _ = _eval(tmp_path / "out", "--protocol", str(proto), "--clip", tiny_clip, "--concept", "circle",
                   "--retain", "square", "--retain", "star")
    s = rep["scores"]
    assert set(s) == {"clip_e", "clip_s", "h_a"}
    _percentages(s, ("clip_e", "clip_s"))
    assert s["h_a"] == pytest.approx(s["clip_s"] - s["clip_e"])
    assert s["clip_s"] == pytest.approx((rep["per_prompt"]["square"] + rep["per_prompt"]["star"]) / 2)
    # without a CLIP folder the artist protocol cannot score
    assert main(["eval", TOY, "--protocol", str(proto), "--concept", "circle", *FAST,
                 "--out", str(tmp_path / "x")]) == 2
    assert "--clip" in capsys.readouterr().err


def test_eval_red_team_reports_every_prompt_attack(tmp_path):
    """`--attacks` on the (unerased) toy model with the toy judge: one success rate per attack, the
    other-language attack from the shipped translations plus the user's, the synonym drawing circles."""
    rep, md = _eval(tmp_path, "--concept", "circle", "--retain", "square", "--seeds", "2", "--attacks",
                    "--translation", "circle=kreis rund")
    attacks = rep["attacks"]
    assert set(attacks) == {f"circle: {a}" for a in ("synonym", "misspelling", "char-noise", "other-language",
                                                     "long-context")}
    _percentages(attacks, tuple(attacks))
    assert attacks["circle: synonym"] >= 50.0  # "disk" draws circles on a model that erased nothing
    assert "circle: other-language" in md
    assert main(["eval", TOY, "--translation", "circle", "--out", str(tmp_path / "x"), *FAST]) == 2  # no '='
