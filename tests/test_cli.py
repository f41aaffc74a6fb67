"""The `mace` command line end to end on tiny models: info, generate, erase (+ resume after a
kill), fuse subsets (restore), and clear errors for bad requests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mace_core.model.checkpoint import load_checkpoint
from mace_core.cli.main import main
from mace_core.method.concepts import ErasureSpec, make_concept
from mace_core.model.diffusers_backend import DiffusersBackend
from mace_core.method.erase import describe_stages, erase, refuse
from mace_core.method.project import Project
from tiny import file_digest, one_thread, tiny_file

FAST = ["--images", "2", "--sample-steps", "3", "--steps", "6", "--device", "cpu"]
SHARED = Path(__file__).resolve().parents[1] / "shared"


def _kv(path):
    return {k: v for k, v in load_file(str(path)).items() if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}


def test_info_reports_family_and_erasure(tmp_path, capsys):
    assert main(["info", str(tiny_file("sdxl"))]) == 0
    out = capsys.readouterr().out
    assert "sdxl" in out and "nothing" in out and "text width:  64 (32 + 32)" in out


def test_erase_two_concepts_end_to_end(tmp_path, capsys):
    src = tiny_file("sd1")
    before = file_digest(src)
    out = tmp_path / "erased.safetensors"
    rc = main(["erase", str(src), "--concept", "cat", "--concept", "dog | a horse", "--retain", "house",
               "--out", str(out), *FAST])
    assert rc == 0
    assert file_digest(src) == before
    meta = load_checkpoint(out).metadata
    concepts = json.loads(meta["mace.concepts"])
    assert [c["phrase"] for c in concepts] == ["cat", "dog"]
    assert concepts[1]["anchor"] == "a horse" and concepts[0]["anchor"] == "a scene"
    assert json.loads(meta["mace.retain"]) == ["house"]
    assert json.loads(meta["mace.settings"])["steps"] == 6
    assert meta["mace.base_sha256"] == load_checkpoint(src).sha256
    new, old = _kv(out), _kv(src)
    assert all(not torch.equal(new[k], old[k]) for k in old)  # every K/V edited
    # the work folder is an erasure project with one LoRA per concept
    proj = Project(tmp_path / "erased.safetensors.mace")
    assert [c["phrase"] for c in proj.manifest()["concepts"]] == ["cat", "dog"]
    assert main(["info", str(out)]) == 0
    assert "erased:      cat, dog" in capsys.readouterr().out


def _erase_cmd(src, out, work):
    return [sys.executable, "-m", "mace_core", "erase", str(src), "--concept", "cat", "--concept", "dog",
            "--concept", "house", "--out", str(out), "--work-dir", str(work), "--images", "2", "--sample-steps", "3",
            "--steps", "25", "--device", "cpu"]


def test_resume_after_kill_is_bit_identical(tmp_path):
    src = tiny_file("sd1")
    env = {**os.environ, "PYTHONPATH": str(SHARED), "MACE_CACHE": str(tmp_path / "cache")}
    work = tmp_path / "work"
    first = work / "concepts" / make_concept("cat").slug / "lora.safetensors"
    proc = subprocess.Popen(_erase_cmd(src, tmp_path / "a.safetensors", work), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert not (tmp_path / "a.safetensors").exists()
    assert b"rerun" in err
    # resume, then compare with an uninterrupted run in a fresh folder
    subprocess.run(_erase_cmd(src, tmp_path / "a.safetensors", work), env=env, check=True, capture_output=True)
    subprocess.run(_erase_cmd(src, tmp_path / "b.safetensors", tmp_path / "fresh"), env=env, check=True,
                   capture_output=True)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args,message", [
    ([], "no concepts"),
    (["--concept", "cat", "--concept", "Cat"], "listed twice"),
    (["--concept", "cat", "--retain", "cat"], "both erased and retained"),
    (["--concept", "cat " * 80], "too long"),
    (["--concept", "cat", "--type", "sculpture"], "unknown concept type"),
    (["--concept", "cat", "--mask", "sam"], "--sam-checkpoint"),
    (["--concept", "cat", "--mask", "sam", "--sam-checkpoint", "sam_vit_b.pth", *FAST], "segment-anything"),
])
def test_bad_requests_fail_clearly(tmp_path, capsys, args, message):
    out = tmp_path / "o.safetensors"
    assert main(["erase", str(tiny_file("sd1")), *args, "--out", str(out), "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_erase_refuses_missing_model_and_bad_output(tmp_path, capsys):
    assert main(["erase", str(tmp_path / "nope.safetensors"), "--concept", "cat", "--out",
                 str(tmp_path / "o.safetensors")]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["erase", str(tiny_file("sd1")), "--concept", "cat", "--out", str(tmp_path / "o.ckpt")]) == 2
    assert ".safetensors" in capsys.readouterr().err


def test_generate_writes_deterministic_pngs_and_index(tmp_path):
    args = ["generate", str(tiny_file("sd1")), "--prompt", "a cat", "--prompt", "a dog", "--seed", "5",
            "--num-images", "2", "--steps", "3", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--batch-size", "1"]) == 0
    rows = [json.loads(l) for l in (tmp_path / "a" / "index.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [("a cat", 5), ("a cat", 6), ("a dog", 5), ("a dog", 6)]
    imgs = {r["file"]: np.asarray(Image.open(tmp_path / "a" / r["file"])) for r in rows}
    for r in rows:  # same seed -> same image, whatever the batch size
        assert np.array_equal(imgs[r["file"]], np.asarray(Image.open(tmp_path / "b" / r["file"])))
    assert not np.array_equal(imgs[rows[0]["file"]], imgs[rows[1]["file"]])  # seed N+1 differs


def test_restore_is_exact_for_stage_one(tmp_path):
    """Erase {X, Y}; restoring X equals a fresh {Y}-only stage 1 to solver precision. (Without default
    protection: "cat" and "dog" are in the object type's list, and a fresh {Y} run would keep X, which a
    re-fuse, made without the model, cannot encode: README, "Sharing and restoring".)"""
    ck = load_checkpoint(tiny_file("sd1"))
    be = DiffusersBackend.from_checkpoint(ck, device="cpu")
    over = {"lam": 1.0, "protection": "none"}
    x, y = make_concept("cat"), make_concept("dog")
    erase(be, ErasureSpec((x, y), (), over), Project(tmp_path / "xy"), ck.sha256, closed_form_only=True)
    only_y = erase(be, ErasureSpec((y,), (), over), Project(tmp_path / "y"), ck.sha256, closed_form_only=True)
    original = be.original_weights()
    restored = refuse(Project(tmp_path / "xy"), original, exclude=["cat"], closed_form_only=True)
    for k in original:
        rel = (restored.weights[k] - only_y.weights[k]).norm() / only_y.weights[k].norm()
        assert rel < 1e-6, k
    assert [c["phrase"] for c in json.loads(restored.metadata["mace.concepts"])] == ["dog"]
    # restoring everything gives back the base weights exactly
    nothing = refuse(Project(tmp_path / "xy"), original, exclude=["cat", "dog"], closed_form_only=True)
    assert all(torch.equal(nothing.weights[k], original[k]) for k in original)


def test_estimate_counts_unet_calls_and_prints_before_running(tmp_path, capsys):
    from mace_core.run.estimate import unet_calls

    search = (24 + 2) * 4  # the synonym search: 24 candidates, the phrase and "", at 4 timesteps
    check = (12 + 1) * 4  # once for the object type's fixed list: 12 of its entries and ""
    compare = 4  # once: the subjectless prompt the two concepts' nearby words are compared against
    spec = ErasureSpec((make_concept("cat"), make_concept("dog")), (),
                       {"images": 3, "sample_steps": 10, "steps": 20, "batch_size": 2})
    assert unet_calls(spec) == 2 * (search + 3 * 10 * 2 + 20 * 2) + check + compare
    assert unet_calls(spec, closed_form_only=True) == 2 * search + check + compare
    assert unet_calls(ErasureSpec(spec.concepts, (), {"synonyms": "none"}), closed_form_only=True) == 0
    abo = ErasureSpec((make_concept("cat"),), (), {"images": 1, "sample_steps": 5, "steps": 4, "objective": "abo",
                                                   "robust_rounds": 2, "attack_steps": 7, "synonyms": "none"})
    assert unet_calls(abo) == 1 * 5 * 2 + 4 * 3 + 2 * 7
    out = tmp_path / "o.safetensors"
    assert main(["erase", str(tiny_file("sd1")), "--concept", "cat", "--estimate", "--out", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    assert "estimated" in text and "UNet calls" in text
    assert not out.exists() and not (tmp_path / "o.safetensors.mace").exists()


def test_estimate_peak_follows_low_vram_and_a_too_small_gpu_is_refused_with_advice():
    from mace_core.run.estimate import Estimate, check_fits, peak_rows, refusal

    spec = ErasureSpec((make_concept("cat"), make_concept("dog")), (), {"images": 8})
    low = ErasureSpec(spec.concepts, (), {"images": 8, "low_vram": True})
    assert peak_rows(spec) == 16 and peak_rows(low) == 2  # 8 images at once vs 1, CFG doubles
    assert peak_rows(ErasureSpec(spec.concepts, (), {"images": 3})) == 6
    assert peak_rows(spec, closed_form_only=True) == 0
    est = Estimate(600.0, 14.0, 1000, 0.5)
    assert est.describe() == "estimated 10.0 min (1000 UNet calls at 500 ms), peak GPU memory ~14.0 GB"
    assert Estimate(42.0, None, 80, 0.5).describe() == "estimated 42 s (80 UNet calls at 500 ms)"
    assert refusal(est, 24.0) is None and refusal(est, None) is None  # fits; no GPU
    why = refusal(est, 12.0)
    assert "~14.0 GB" in why and "12.0 GB" in why and "--low-vram" in why and "closed-form only" in why
    already = refusal(Estimate(600.0, 14.0, 1000, 0.5, low_vram=True), 12.0)
    assert "--low-vram" not in already and "more memory" in already
    assert refusal(Estimate(600.0, 11.9, 1000, 0.5), 12.0) is not None  # within 5% of the GPU: no margin left
    check_fits(est, torch.device("cpu"))  # a CPU run is never refused


def test_estimate_counts_the_nearby_words_the_search_adds_to_what_is_kept():
    """Before the search its nearby words are unknown, so the estimate counts NEARBY of them a new concept
    (encoded in every template) on top of the fixed list, with the search's own encodings and the fixed
    list's check, and for two such concepts the subjectless prompt their nearby words are compared against; a
    retain list, or a type without a fixed list, adds none."""
    from mace_core.method.concepts import concept_prompts, get_type
    from mace_core.method.synonyms import NEARBY, TIMESTEPS, check_calls, search_calls
    from mace_core.run.estimate import estimate

    be = DiffusersBackend.from_checkpoint(load_checkpoint(tiny_file("sd1")), device="cpu")
    star = make_concept("Tom Cruise", "", "celebrity")

    def prompts(c, retain=(), **over) -> int:
        return estimate(be, ErasureSpec((c,), retain, over), closed_form_only=True, repeats=1).text_encodings

    templates = len(concept_prompts(star))
    assert prompts(star, synonyms="none") == prompts(star, protection="none", synonyms="none") + len(
        get_type("celebrity").protect) * templates
    # the search, its nearby words, and the check of the fixed list they join
    assert prompts(star) - prompts(star, synonyms="none") == search_calls() + check_calls() + NEARBY * templates
    assert prompts(star, ("Bill Murray",)) - prompts(star, ("Bill Murray",), synonyms="none") == search_calls()
    toy = make_concept("circle", "", "toy")
    assert prompts(toy) - prompts(toy, synonyms="none") == search_calls()
    # two names: two searches, one check, and the subjectless prompt their nearby words are compared against
    pair = (star, make_concept("Brad Pitt", "", "celebrity"))

    def both(**over) -> int:
        return estimate(be, ErasureSpec(pair, (), over), closed_form_only=True, repeats=1).text_encodings

    assert both() - both(synonyms="none") == 2 * search_calls() + check_calls() + len(TIMESTEPS) + 2 * NEARBY * templates


def test_estimate_of_a_resumed_or_extended_project_counts_only_what_is_left(tmp_path):
    from mace_core.run.estimate import estimate, unet_calls

    ck = load_checkpoint(tiny_file("sd1"))
    be = DiffusersBackend.from_checkpoint(ck, device="cpu")
    over = {"images": 2, "sample_steps": 3, "steps": 4}
    cat, dog = make_concept("cat"), make_concept("dog")
    train = 2 * 3 * 2 + 4  # a concept's drawing (CFG doubles) and training
    # and, before stage 1, the search for its synonyms and the check of the fixed list (a new concept only)
    one = (24 + 2) * 4 + (12 + 1) * 4 + train
    proj = Project(tmp_path / "p")
    assert unet_calls(ErasureSpec((cat,), (), over), project=proj) == one  # nothing there yet
    rep = erase(be, ErasureSpec((cat,), (), over), proj, ck.sha256).report
    # every stage's time and peak memory are reported (CPU: the process's peak RSS, which holds torch)
    assert list(rep["timings"]) == list(rep["peak_memory_gb"]) == ["refine", "train", "fuse"]
    assert all(0.1 < g < 24 for g in rep["peak_memory_gb"].values())
    assert describe_stages(rep).startswith("refine ") and describe_stages(rep).count("GB)") == 3
    assert unet_calls(ErasureSpec((cat,), (), over), project=proj) == 0  # a rerun reuses everything
    assert unet_calls(ErasureSpec((dog,), (), over), project=proj) == one  # add: cat's LoRA is reused
    assert unet_calls(ErasureSpec((dog,), (), {**over, "steps": 5}), project=proj) == one + 1 + train + 1  # both retrain
    est = estimate(be, ErasureSpec((dog,), (), over), project=proj)
    assert est.unet_calls == one and est.seconds > 0 and est.peak_gb is None
    assert estimate(be, ErasureSpec((cat,), (), over), project=proj).unet_calls == 0


def test_estimate_peak_counts_the_abo_backward_pass():
    from mace_core.run.estimate import peak_gb, train_rows

    cat = make_concept("cat")
    mace = ErasureSpec((cat,), (), {"images": 8, "batch_size": 4})
    abo = ErasureSpec((cat,), (), {"images": 8, "batch_size": 4, "objective": "abo"})
    gib = 2 ** 30
    assert train_rows(mace) == 0 and train_rows(abo) == 8 and train_rows(abo, closed_form_only=True) == 0
    # drawing 8 images under CFG holds 16 rows of no-grad activations; abo's backward keeps 8 rows
    assert peak_gb(mace, 2 * gib, gib // 4, gib) == pytest.approx(2 + 16 / 4)
    assert peak_gb(abo, 2 * gib, gib // 4, gib) == pytest.approx(2 + 8)
    assert peak_gb(abo, 2 * gib, gib // 4, gib // 8) == pytest.approx(2 + 4)  # checkpointed: drawing dominates
    assert peak_gb(abo, 2 * gib, gib // 4, gib, closed_form_only=True) == pytest.approx(2)


def test_low_vram_gives_the_same_checkpoint(tmp_path):
    src = tiny_file("sd1")
    plain, low = tmp_path / "plain.safetensors", tmp_path / "low.safetensors"
    with one_thread():  # the same arithmetic both times (see `tiny.one_thread`)
        assert main(["erase", str(src), "--concept", "cat", "--out", str(plain), *FAST]) == 0
        assert main(["erase", str(src), "--concept", "cat", "--low-vram", "--out", str(low), *FAST]) == 0
    assert json.loads(load_checkpoint(low).metadata["mace.settings"])["low_vram"] is True
    a, b = _kv(plain), _kv(low)
    # low-VRAM draws the training images one at a time (a batch of one is other matrix shapes: the
    # latents differ in the last bits, `test_low_vram_draws_one_image_at_a_time_and_the_same_images`)
    for k in a:
        assert (a[k].float() - b[k].float()).norm() <= 1e-5 * a[k].float().norm(), k


def _training_data(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name in ("images", "masks", "latents.safetensors") or p.suffix == ".png"]


def _erased_names(path: Path) -> list[str]:
    return [c["phrase"] for c in json.loads(load_checkpoint(path).metadata["mace.concepts"])]


def test_delete_images_keeps_what_refuse_restore_and_add_need(tmp_path, capsys):
    src, out, work = tiny_file("sd1"), tmp_path / "erased.safetensors", tmp_path / "project"
    assert main(["erase", str(src), "--concept", "cat", "--concept", "dog", "--out", str(out),
                 "--work-dir", str(work), "--delete-images", *FAST]) == 0
    assert "deleted 10 training image files" in capsys.readouterr().out  # 2 concepts x (2 images, 2 masks, latents)
    assert _training_data(work) == []
    proj = Project(work)
    assert all(proj.load_stats(c) is not None and proj.load_lora(c) is not None for c in proj.spec().concepts)
    # restore: everything but cat, from the stored sums and LoRAs alone
    assert main(["fuse", str(work), "--except", "cat", "--model", str(src),
                 "--out", str(tmp_path / "dog.safetensors")]) == 0
    assert _erased_names(tmp_path / "dog.safetensors") == ["dog"]
    # re-fusing all concepts gives back the erased checkpoint
    assert main(["fuse", str(work), "--model", str(src), "--out", str(tmp_path / "all.safetensors")]) == 0
    again, first = _kv(tmp_path / "all.safetensors"), _kv(out)
    assert all(torch.allclose(again[k], first[k], rtol=0, atol=1e-6) for k in first)
    # add: trains only the new concept, reusing the LoRAs whose images are gone
    loras = {p: p.stat().st_mtime_ns for p in work.rglob("lora.safetensors")}
    assert main(["add", str(work), "--concept", "bird", "--model", str(src),
                 "--out", str(tmp_path / "more.safetensors"), "--device", "cpu", "--delete-images"]) == 0
    assert _erased_names(tmp_path / "more.safetensors") == ["cat", "dog", "bird"]
    assert all(p.stat().st_mtime_ns == t for p, t in loras.items()) and len(list(work.rglob("lora.safetensors"))) == 3
    assert _training_data(work) == []


def test_separable_erasure_runs_and_is_recorded(tmp_path):
    out = tmp_path / "sep.safetensors"
    assert main(["erase", str(tiny_file("sd1")), "--concept", "cat", "--concept", "dog", "--separable",
                 "--out", str(out), *FAST]) == 0
    assert json.loads(load_checkpoint(out).metadata["mace.settings"])["separable"] is True


@pytest.fixture
def new_setting(monkeypatch):
    """`concepts.Settings` with one more field, declared as a stage-2 parameter would be (one `_knob`)."""
    import dataclasses

    from mace_core.method import concepts

    extended = dataclasses.make_dataclass(
        "Settings", [("eta_test", "float", concepts._knob(0.5, "a new loss weight", "new weight", min=0, max=2))],
        bases=(concepts.Settings,), frozen=True)
    monkeypatch.setattr(concepts, "Settings", extended)
    concepts._all_infos.cache_clear()
    yield "eta_test"
    monkeypatch.undo()
    concepts._all_infos.cache_clear()


def test_a_setting_declared_in_the_core_reaches_the_cli_and_the_tab(new_setting, capsys):
    """Adding a setting is one field of `concepts.Settings`: `mace erase` gets its flag and the tab its
    field (the nodes their widget: test_comfyui_nodes), each checked against the declared range, and the
    value reaches the resolved settings and the LoRA's identity."""
    from mace_core.cli.main import build_parser, spec_from_args
    from mace_core.method.concepts import settings_hash
    from mace_core.errors import MaceError
    from sd_webui_extension import actions

    argv = ["erase", "m.safetensors", "--out", "o.safetensors", "--concept", "cat"]
    spec = spec_from_args(build_parser().parse_args(argv + ["--eta-test", "1.5"]))
    assert spec.settings_for().eta_test == 1.5 and spec.settings_for(spec.concepts[0]).eta_test == 1.5
    assert spec_from_args(build_parser().parse_args(argv)).settings_for().eta_test == 0.5  # absent: the default
    assert "a new loss weight" in build_parser()._subparsers._group_actions[0].choices["erase"].format_help()
    form = actions.EraseForm(concepts="cat", numbers={"eta_test": "1.5"})
    assert actions.build_spec(form) == spec
    assert new_setting in {i.name for i in actions.advanced_settings()}
    with pytest.raises(MaceError, match="new weight"):
        actions.build_spec(actions.EraseForm(concepts="cat", numbers={"eta_test": "3"}))
    assert main(argv[:1] + [str(tiny_file("sd1"))] + argv[2:] + ["--eta-test", "3", "--device", "cpu"]) == 2
    assert "must be at most 2" in capsys.readouterr().err
    changed = spec_from_args(build_parser().parse_args(argv + ["--eta-test", "1.0"]))
    assert settings_hash(changed, changed.concepts[0]) != settings_hash(spec, spec.concepts[0])  # retrains


def test_the_lora_identity_covers_stage_one_and_adding_concepts_reuses_loras(tmp_path):
    """A LoRA trains on stage 1's refined weights: changing lam (or the priors, or the retain list) on a
    project retrains it; adding a concept reuses it (the documented choice of `settings_hash`)."""
    from mace_core.method.concepts import settings_hash

    over = {"images": 1, "sample_steps": 2, "steps": 3}
    cat, dog = make_concept("cat"), make_concept("dog")
    base = ErasureSpec((cat,), (), over)
    h = settings_hash(base, cat)
    for changed in (ErasureSpec((cat,), (), {**over, "lam": 7.0}), ErasureSpec((cat,), (), {**over, "prior": 1.0}),
                    ErasureSpec((cat,), (), {**over, "domain": 1.0}), ErasureSpec((cat,), ("house",), over)):
        assert settings_hash(changed, cat) != h, changed
    assert settings_hash(ErasureSpec((cat, dog), (), over), cat) == h  # another concept: reused
    assert settings_hash(ErasureSpec((cat,), (), {**over, "low_vram": True, "fuse_prior": 3.0}), cat) == h

    src, work = tiny_file("sd1"), tmp_path / "p"
    flags = ["--images", "1", "--sample-steps", "2", "--steps", "3", "--device", "cpu", "--work-dir", str(work)]
    assert main(["erase", str(src), "--concept", "cat", "--out", str(tmp_path / "a.safetensors"), *flags]) == 0
    lora = work / "concepts" / cat.slug / "lora.safetensors"
    first = lora.stat().st_mtime_ns
    assert main(["add", str(work), "--concept", "dog", "--model", str(src), "--device", "cpu",
                 "--out", str(tmp_path / "b.safetensors")]) == 0
    assert lora.stat().st_mtime_ns == first  # adding dog kept cat's LoRA
    assert main(["erase", str(src), "--concept", "cat", "--lam", "7", "--out", str(tmp_path / "c.safetensors"),
                 *flags]) == 0
    assert lora.stat().st_mtime_ns != first  # another stage 1: cat retrained


def test_concept_files_yaml_csv_and_text_mean_the_same_request(tmp_path):
    """One parser for concept files (`concepts.load_concept_file`), for `--config` and the nodes' Load
    Concepts alike: a CSV (header optional, role 'retain'), a text file and a YAML config of the same
    concepts give the request the flags give."""
    from mace_core.cli.main import build_parser, spec_from_args

    (tmp_path / "c.csv").write_text("phrase,anchor,type,role\ncat,,,\nVan Gogh,art,style,\nTom Hanks,,,retain\n")
    (tmp_path / "c.txt").write_text("# concepts\ncat\nVan Gogh | art | style\n")
    (tmp_path / "c.yaml").write_text("concepts: [cat, {phrase: Van Gogh, anchor: art, type: style}]\n"
                                     "retain: [Tom Hanks]\n")
    argv = ["erase", "m.safetensors", "--out", "o.safetensors"]
    flags = spec_from_args(build_parser().parse_args(argv + ["--concept", "cat", "--concept", "Van Gogh | art | style",
                                                             "--retain", "Tom Hanks"]))
    for name, extra in (("c.csv", []), ("c.txt", ["--retain", "Tom Hanks"]), ("c.yaml", [])):
        spec = spec_from_args(build_parser().parse_args(argv + ["--config", str(tmp_path / name), *extra]))
        assert spec == flags, name
    assert [c.type for c in flags.concepts] == ["object", "style"] and flags.concepts[1].anchor == "art"


def test_a_finished_run_releases_its_project_to_other_processes(tmp_path):
    """A run locks its project against other processes; a host runs in a process that lives on, so the
    lock must go with the run (here: the CLI's run, in this test's process)."""
    work = tmp_path / "work"
    assert main(["erase", str(tiny_file("sd1")), "--concept", "cat", "--closed-form-only", "--work-dir", str(work),
                 "--out", str(tmp_path / "out.safetensors")]) == 0
    probe = ("import fcntl, sys; f = open(sys.argv[1], 'a+')\n"
             "try: fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except BlockingIOError: sys.exit(3)\n")
    assert subprocess.run([sys.executable, "-c", probe, str(work / ".lock")]).returncode == 0


def test_ctrl_c_on_generate_keeps_the_images_drawn_and_says_so(tmp_path):
    """SIGINT (Ctrl-C) in the middle of `mace generate`: exit 130, the generate message (not the
    erase's), and every PNG written so far listed once in index.jsonl, the rest absent."""
    env = {**os.environ, "PYTHONPATH": str(SHARED), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "imgs"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a photo of thing {i}\n" for i in range(400)))
    # a shell starting a job in the background (nohup ... &, as CI runners may) leaves SIGINT ignored,
    # and Python then installs no Ctrl-C handler: give the child a terminal's default
    proc = subprocess.Popen([sys.executable, "-m", "mace_core", "generate", str(tiny_file("sd1")), "--prompts",
                             str(prompts), "--out", str(out), "--steps", "4", "--batch-size", "1", "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and len(list(out.glob("*.png"))) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted: the images drawn so far are written" in err and "Traceback" not in err, err
    rows = [json.loads(l) for l in (out / "index.jsonl").read_text().splitlines()]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert 2 <= len(pngs) < 400 and sorted(r["file"] for r in rows) == pngs
    assert not [p for p in out.iterdir() if p.suffix not in (".png", ".jsonl")]  # no temporary file left


def test_generate_force_interrupted_while_replacing_an_image_lists_only_what_it_wrote(monkeypatch, tmp_path):
    """`mace generate --force` over an earlier run: an interrupt while the second image is being
    written leaves it out of the index when the old file is still there (interrupted before the
    rename), and lists it when the new file landed (interrupted right after)."""
    import mace_core.files as files

    out, real = tmp_path / "imgs", files.write_png
    argv = ["generate", str(tiny_file("sd1")), "--prompt", "a cat", "--num-images", "3", "--out", str(out),
            "--steps", "2", "--device", "cpu"]
    assert main(argv) == 0
    old = {p.name: p.read_bytes() for p in out.glob("*.png")}
    for landed in (False, True):
        calls = []

        def write_png(path, image, **kw):
            calls.append(path)
            if len(calls) == 2 and not landed:
                raise KeyboardInterrupt  # before the new file replaces the old one
            real(path, image, **kw)
            if len(calls) == 2:
                raise KeyboardInterrupt  # the new file is in place, its row not yet written

        monkeypatch.setattr(files, "write_png", write_png)
        assert main(argv + ["--force", "--seed", "1" if landed else "0"]) == 130
        rows = [json.loads(l)["file"] for l in (out / "index.jsonl").read_text().splitlines()]
        assert rows == [p.name for p in calls[:2 if landed else 1]]
        if not landed:
            assert calls[1].read_bytes() == old[calls[1].name]  # the old image, not listed


def test_ctrl_c_names_what_each_command_kept(monkeypatch, capsys, tmp_path):
    """The interrupt message is the command's own: `info` and `fuse` wrote nothing; only `erase` and
    `add` speak of finished concepts."""
    import mace_core.cli.main as cli

    def stop(args):
        raise KeyboardInterrupt

    for cmd, argv, said in (("cmd_info", ["info", "m.safetensors"], "interrupted: nothing was written"),
                            ("cmd_fuse", ["fuse", str(tmp_path), "--out", "x.safetensors"],
                             "interrupted: nothing was written"),
                            ("cmd_erase", ["erase", "m.safetensors", "--concept", "cat", "--out", "o.safetensors"],
                             "finished concepts are saved")):
        monkeypatch.setattr(cli, cmd, stop)
        assert main(argv) == 130
        err = capsys.readouterr().err
        assert said in err, err
