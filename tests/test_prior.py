"""The general prior (`mace_core.method.prior`) and what a run reports while it works.

- computed from `PRIOR_CAPTIONS` captions, batched, equal to the Gram matrix of every token
  embedding computed independently; kept in the folder the caller names (a host's models/mace/prior);
- progress from its first moment (``done = 0``), and an interrupt between batches writes nothing;
- a half-precision backend on the CPU encodes it in fp32 (its ``text_encoders_float32`` hook);
- the estimate counts its first computation, and not once it is kept;
- every phase of a run is announced when it starts, so a progress bar names the running phase
  (the A1111 tab showed the previous one: "loading model 100%" during the prior and stage 1).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from mace_core.method import erase as erase_mod
from mace_core.method import prior
from mace_core.model.checkpoint import load_checkpoint
from mace_core.method.concepts import ErasureSpec, get_type, make_concept
from mace_core.method.corpus import general_captions
from mace_core.model.diffusers_backend import DiffusersBackend
from mace_core.errors import InterruptedRun
from mace_core.run.estimate import estimate
from mace_core.method.project import Project
from tiny import one_thread, tiny_file


@pytest.fixture(scope="module")
def backend():
    # one thread for this module only (it was left set for every later test): the same bits each time
    with one_thread():
        yield DiffusersBackend.from_checkpoint(load_checkpoint(tiny_file("sd1")), device="cpu")


def test_prior_is_the_token_gram_of_its_captions_kept_in_the_given_folder(backend, tmp_path):
    calls: list[tuple[str, int, int]] = []
    g = prior.general_prior(backend, "k", 120, folder=tmp_path, progress=lambda *a: calls.append(a))["context"]
    # independent computation, one caption at a time: the mean Gram over every token position
    rows = torch.cat([backend.encode([c]).context[0].double() for c in general_captions(120)])  # [120 * 77, D]
    want = rows.T @ rows / rows.shape[0]
    # batched and one-by-one fp32 encodings round differently in the last bits
    assert (g - want).abs().max() <= 1e-5 * want.abs().max()
    assert calls[0] == (prior.PRIOR_LABEL, 0, 120) and calls[-1] == (prior.PRIOR_LABEL, 120, 120)
    assert [c[1] for c in calls] == [0, *range(10, 121, 10)]  # batched: PRIOR_BATCH["cpu"] captions at a time
    assert [p.name for p in tmp_path.iterdir()] == [prior.prior_path(tmp_path, "k", 120).name]
    # a second use reads it: no encoding, no progress
    calls.clear()
    again = prior.general_prior(backend, "k", 120, folder=tmp_path, progress=lambda *a: calls.append(a))["context"]
    assert torch.equal(again, g) and calls == []


def test_interrupt_stops_between_batches_and_writes_nothing(backend, tmp_path):
    seen: list[int] = []
    with pytest.raises(InterruptedRun):
        prior.general_prior(backend, "k", 500, folder=tmp_path, progress=lambda _l, d, _n: seen.append(d),
                            should_stop=lambda: len(seen) >= 3)
    assert seen == [0, 10, 20]
    assert not list(tmp_path.iterdir())


def test_half_precision_backend_on_the_cpu_encodes_the_prior_in_fp32(backend, tmp_path):
    """A backend whose text encoder is fp16 on the CPU (as ComfyUI keeps CLIP) encodes every caption of
    the prior inside its ``text_encoders_float32`` block (its text encoders in fp32 there)."""
    inside: list[bool] = []
    state = {"fp32": False}

    class Half:
        device = torch.device("cpu")

        def tokenize(self, prompt):
            return backend.tokenize(prompt)

        def encode(self, prompts):
            inside.append(state["fp32"])
            return backend.encode(prompts)

        @contextlib.contextmanager
        def text_encoders_float32(self):
            state["fp32"] = True
            try:
                yield
            finally:
                state["fp32"] = False

    prior.general_prior(Half(), "h", 60, folder=tmp_path)
    assert len(inside) == 6 and all(inside)
    assert not state["fp32"]  # left again


def test_estimate_counts_the_first_prior_and_not_once_it_is_kept(backend, tmp_path):
    spec = ErasureSpec((make_concept("cat"),), (), {"prior": 1.0})
    first = estimate(backend, spec, closed_form_only=True, prior_dir=tmp_path)
    assert first.prior_captions == prior.PRIOR_CAPTIONS and first.prior_seconds > 0
    assert first.seconds >= first.prior_seconds and "general prior" in first.describe()
    prior.general_prior(backend, backend.text_encoder_key(), folder=tmp_path)
    kept = estimate(backend, spec, closed_form_only=True, prior_dir=tmp_path)
    assert kept.prior_captions == 0 and "general prior" not in kept.describe()
    off = estimate(backend, ErasureSpec((make_concept("cat"),), (), {"prior": 0.0, "fuse_prior": 0.0}),
                   closed_form_only=True, prior_dir=tmp_path / "empty")
    assert off.prior_captions == 0


def test_each_phase_is_announced_when_it_starts(backend, tmp_path, monkeypatch):
    """When the prior, stage 1, drawing, training and fusion begin, the last progress label already
    names them."""
    labels: list[str] = []
    at_start: dict[str, str] = {}

    def spy(name, fn, key):
        def wrapped(*a, **kw):
            at_start.setdefault(key, labels[-1] if labels else "")
            return fn(*a, **kw)
        monkeypatch.setattr(erase_mod, name, wrapped)

    spy("general_prior", erase_mod.general_prior, "prior")
    spy("mean_grams", erase_mod.mean_grams, "kept")  # the type's default protection: 79 objects, the nearby words
    spy("concept_stats", erase_mod.concept_stats, "stats")
    spy("refine_weights", erase_mod.refine_weights, "refine")
    spy("draw_concept", erase_mod.draw_concept, "draw")
    spy("train_lora", erase_mod.train_lora, "train")
    spy("_fuse", erase_mod._fuse, "fuse")
    spec = ErasureSpec((make_concept("cat"),), (), {"steps": 2, "images": 1, "sample_steps": 2, "prior": 1.0})
    erase_mod.erase(backend, spec, Project(tmp_path / "p"), "0" * 64, progress=lambda l, d, n: labels.append(l),
                    prior_dir=tmp_path / "prior")
    # the priors come first: a first use names the general prior from its start, not after every concept
    assert at_start["prior"] == ""
    assert labels[0] == prior.PRIOR_LABEL
    assert at_start["kept"] == erase_mod.KEPT_LABEL
    assert at_start["stats"] == "encoding the concepts (stage 1)"
    nearby = Project(tmp_path / "p").spec().concepts[0].found_neighbours  # kept too, found by the search
    assert 0 < len(nearby) and "cat" not in nearby
    # one per phrase, "cat" not kept
    assert labels.count(erase_mod.KEPT_LABEL) == len(get_type("object").protect) - 1 + len(nearby)
    assert at_start["refine"] == "refining (stage 1)"
    assert at_start["draw"] == "drawing cat"
    assert at_start["train"] == "training cat"
    assert at_start["fuse"] == "fusing"


def test_estimate_counts_the_prompts_stage_1_encodes(backend, tmp_path, monkeypatch):
    """Three celebrities share one set of ordinary-name anchors, encoded once (the estimate counted it once
    per name); the retain list's prompts too. Counted against the encodings a closed-form erase makes."""
    prior.general_prior(backend, backend.text_encoder_key(), folder=tmp_path)  # kept: no prior encoding
    names = ("Tom Cruise", "Bill Murray", "Keanu Reeves")
    spec = ErasureSpec(tuple(make_concept(n, ctype="celebrity") for n in names), ("Emma Stone",), {})
    assert len({get_type("celebrity").stage1_anchors(c) for c in spec.concepts}) == 1  # what the case is about
    est = estimate(backend, spec, closed_form_only=True, prior_dir=tmp_path)
    encoded: list[int] = []
    real = backend.encode
    monkeypatch.setattr(backend, "encode", lambda prompts, *a, **kw: encoded.append(len(prompts)) or
                        real(prompts, *a, **kw))
    erase_mod.erase(backend, spec, Project(tmp_path / "p"), "0" * 64, closed_form_only=True, prior_dir=tmp_path)
    assert est.text_encodings == sum(encoded) > 0


def test_prior_from_a_caption_file_is_the_gram_of_its_captions_keyed_by_their_content(backend, tmp_path):
    """`Settings.prior_captions`: the prior is the mean token Gram of the file's captions (blank lines and
    repeats dropped; a file longer than the prior's count is sampled evenly, not cut), cached apart from
    the corpus's prior and from any other file's."""
    lines = [f"a drawing number {i} of a small house" for i in range(120)]
    f = tmp_path / "captions.txt"
    f.write_text("\n".join(lines[:60] + ["", "   ", lines[3]] + lines[60:]) + "\n", encoding="utf-8")
    folder = tmp_path / "cache"
    g = prior.general_prior(backend, "k", 60, folder=folder, captions_file=str(f))["context"]
    rows = torch.cat([backend.encode([c]).context[0].double() for c in lines[::2]])  # 60 of 120, evenly spread
    want = rows.T @ rows / rows.shape[0]
    assert (g - want).abs().max() <= 1e-5 * want.abs().max()
    corpus = prior.general_prior(backend, "k", 60, folder=folder)["context"]
    assert not torch.allclose(corpus, g)
    assert len(list(folder.iterdir())) == 2  # the corpus's and the file's
    f.write_text("\n".join(lines[::-1]) + "\n", encoding="utf-8")  # other content, same name
    assert prior.prior_missing(backend, 1.0, 0.0, folder, 60, captions_file=str(f)) == 60
    prior.general_prior(backend, "k", 60, folder=folder, captions_file=str(f))
    assert len(list(folder.iterdir())) == 3


def test_a_project_recomputes_its_prior_and_retrains_when_the_caption_file_changes(backend, tmp_path, monkeypatch):
    """The project keeps the prior it was refined with; a run with another caption file (or none) must not
    reuse it, nor LoRAs trained on weights refined with it."""
    from mace_core.method.concepts import settings_hash

    f = tmp_path / "captions.txt"
    f.write_text("\n".join(f"a photo of a red car number {i}" for i in range(60)), encoding="utf-8")
    computed: list[str | None] = []
    real = erase_mod.general_prior
    monkeypatch.setattr(erase_mod, "general_prior",
                        lambda *a, **kw: computed.append(kw.get("captions_file")) or real(*a, **kw))
    project = Project(tmp_path / "p")

    def run(captions):
        spec = ErasureSpec((make_concept("cat"),), (), {"prior": 1.0, "prior_captions": captions})
        erase_mod.erase(backend, spec, project, "0" * 64, closed_form_only=True, prior_dir=tmp_path / "prior")
        return settings_hash(project.spec(), project.spec().concepts[0])

    first = run(str(f))
    assert computed == [str(f)]
    assert run(str(f)) == first and computed == [str(f)]  # kept in the project
    f.write_text("\n".join(f"a photo of a blue boat number {i}" for i in range(60)), encoding="utf-8")
    changed = run(str(f))
    assert computed == [str(f), str(f)] and changed != first
    run("")  # back to the built-in corpus
    assert computed == [str(f), str(f), ""]
