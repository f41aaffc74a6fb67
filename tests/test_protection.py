"""What stage 1 keeps: the per-concept retain weighting, the default protection of each type, and the
mass balance (overlap) that keeps many concepts from outweighing it."""

from __future__ import annotations

import dataclasses
import tempfile

import pytest
import torch

from mace_core.model.checkpoint import load_checkpoint
from mace_core.method.concepts import ErasureSpec, concept_prompts, get_type, make_concept
from mace_core.method.corpus import CORPUS_FILE, subject_captions
from mace_core.model.diffusers_backend import DiffusersBackend
from mace_core.method.erase import _general, _kept, refine_weights
from mace_core.method.prior import mean_grams
from mace_core.method.project import Project
from mace_core.method.refine import ConceptStats, overlap
from tiny import tiny_file


@pytest.fixture(scope="module")
def backend():
    return DiffusersBackend.from_checkpoint(load_checkpoint(tiny_file("sd1")), device="cpu")


def _stats(cross: torch.Tensor, gram: torch.Tensor) -> ConceptStats:
    return ConceptStats(cross, gram, gram.clone(), 1)


def test_overlap_is_one_for_one_or_orthogonal_concepts_and_n_for_n_alike():
    g = torch.Generator().manual_seed(0)
    d = 6
    eye = torch.eye(d, dtype=torch.float64)
    # a pull D = cross - gram on disjoint coordinate blocks: orthogonal in the Frobenius sense
    pulls = []
    for k in range(3):
        p = torch.zeros(d, d, dtype=torch.float64)
        p[2 * k:2 * k + 2, 2 * k:2 * k + 2] = torch.randn(2, 2, generator=g, dtype=torch.float64)
        pulls.append(p)
    assert overlap([_stats(eye + pulls[0], eye)]) == pytest.approx(1.0)
    assert overlap([_stats(eye + p, eye) for p in pulls]) == pytest.approx(1.0)
    assert overlap([_stats(eye + pulls[0], eye)] * 5) == pytest.approx(5.0)
    # two concepts at 60 degrees: ||a + b||^2 / (||a||^2 + ||b||^2) = 1 + cos
    a = torch.zeros(d, d, dtype=torch.float64)
    b = torch.zeros(d, d, dtype=torch.float64)
    a[0, 0], b[0, 0], b[1, 1] = 1.0, 0.5, 3 ** 0.5 / 2
    assert overlap([_stats(eye + a, eye), _stats(eye + b, eye)]) == pytest.approx(1.5)


def test_n_identical_concepts_refine_like_one_with_the_balance_and_not_without():
    """With the overlap balance, n copies of one concept's sums give exactly the one-concept map (the
    protection scales with them); without it, they outweigh the ridge and the prior n-fold."""
    g = torch.Generator().manual_seed(1)
    d = 8
    e = torch.randn(40, d, generator=g, dtype=torch.float64)
    es = e + 0.5 * torch.randn(40, d, generator=g, dtype=torch.float64)
    st = ConceptStats(es.T @ e, e.T @ e, e.T @ e, 40)
    p = torch.randn(200, d, generator=g, dtype=torch.float64)
    priors = {"general": p.T @ p / 200}
    w0 = {"k": torch.randn(5, d, generator=g)}

    class Run:
        lam, prior, domain, balance = 30.0, 70.0, 0.0, "overlap"

    one = refine_weights(w0, [st], Run, priors)["k"]
    many = refine_weights(w0, [st] * 10, Run, priors)["k"]
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)
    Run.balance = "none"
    unbalanced = refine_weights(w0, [st] * 10, Run, priors)["k"]
    assert (unbalanced - one).norm() > 0.05 * one.norm()


def test_retain_prior_weighs_per_kept_concept(backend):
    """The domain prior is the sum over kept phrases of each one's mean Gram (computed here phrase by
    phrase), so adding kept phrases adds protection instead of diluting it."""
    kept = ("a dog", "a red car", "a tall tree")
    spec = ErasureSpec((make_concept("a cat", "", "object"),), kept, {"domain": 1.0})
    with tempfile.TemporaryDirectory() as d:
        pri = _kept(backend, Project(d), spec, *_general(backend, Project(d), spec))
    c = spec.concepts[0]
    want = sum(mean_grams(backend, concept_prompts(c, r))["context"] for r in kept)
    torch.testing.assert_close(pri["domain"], want, rtol=1e-9, atol=1e-12)


def _names(name: str) -> list[str]:
    from mace_core.method.concepts import DATA

    return [x.strip() for x in (DATA / "protect" / f"{name}.txt").read_text().splitlines()
            if x.strip() and not x.startswith("#")]


def test_default_protection_of_each_type_named_and_without_the_erased():
    """Each type's fixed list and each concept's nearby words (found by the search), less every phrase and
    synonym being erased, each phrase once; a retain list replaces it, protection "none" drops it."""
    for t in ("object", "celebrity", "style", "explicit"):
        assert len(get_type(t).protect) >= 10, t
    preset = list(get_type("celebrity").protect)
    keep = preset[0]
    spec = ErasureSpec((make_concept(keep, "", "celebrity", found_neighbours=["holt", "Someone Else", "ace"]),
                        make_concept("Someone Else", "", "celebrity", found_synonyms=["ace"],
                                     found_neighbours=["holt", "dizzy"])))
    kept, source = spec.protected()
    assert kept == tuple(p for p in preset if p != keep) + ("holt", "dizzy")
    assert source == f"default protection of celebrity ({len(preset) + 1} phrases, 2 of them the model's nearby words)"
    # the user's retain list replaces it; protection 'none' turns it off
    assert ErasureSpec(spec.concepts, ("Bill Murray",)).protected() == (("Bill Murray",), "retain list")
    assert ErasureSpec(spec.concepts, (), {"protection": "none"}).protected() == ((), "")
    # two types: both defaults, each phrase once
    mixed = ErasureSpec((make_concept("x", "", "object"), make_concept("y", "", "explicit")))
    kept, source = mixed.protected()
    assert len(kept) == len(set(kept)) == len(get_type("object").protect) + len(get_type("explicit").protect)
    assert "object, explicit" in source


def test_nearby_words_are_kept_like_retain_entries(backend, tmp_path):
    """Stage 1 on the tiny model, erasing "Bill Clinton" with "Bill Lee" among its nearby words gives the
    weights of a retain list made of the type's fixed list and "Bill Lee"; the keys of "a photo of Bill
    Lee" then move less than with the fixed list alone, and those far less than with no protection."""
    from mace_core.method.refine import concept_stats

    c = make_concept("Bill Clinton", "", "celebrity")
    st = concept_stats(backend, concept_prompts(c), concept_prompts(c, c.anchor))
    original = backend.original_weights()
    e = backend.encode(["a photo of Bill Lee"]).context[0].double()

    def refined(name: str, spec: ErasureSpec) -> dict[str, torch.Tensor]:
        project = Project(tmp_path / name)
        priors = _kept(backend, project, spec, *_general(backend, project, spec, tmp_path / "prior"))
        return refine_weights(original, [st], spec.settings_for(), priors)

    def moved(new: dict[str, torch.Tensor]) -> float:
        return sum(float(((new[k].double() - original[k].double()) @ e.T).norm()) for k in new)

    nearby = refined("nearby", ErasureSpec((dataclasses.replace(c, found_neighbours=("Bill Lee",)),)))
    listed = refined("listed", ErasureSpec((c,), (*get_type("celebrity").protect, "Bill Lee")))
    for k in nearby:
        torch.testing.assert_close(nearby[k], listed[k])
    kept, fixed, without = moved(nearby), moved(refined("fixed", ErasureSpec((c,)))), moved(
        refined("none", ErasureSpec((c,), (), {"protection": "none"})))
    print(f"'Bill Lee' keys moved {kept:.4g} kept as a nearby word, {fixed:.4g} with the fixed list, {without:.4g} "
          "without")
    assert kept < fixed < 0.1 * without  # measured: 14.6, 15.2, 176


def test_celebrity_templates_put_the_name_in_everyday_scenes():
    """types.yaml `scenes`: the celebrity type's templates end with 30 corpus captions around a person
    slot, each naming the subject once, the same on every run; the erased name and every protected
    name get the same scenes (stage 1 pairs them with the anchor's and keeps them for the others)."""
    import re

    scenes = subject_captions("person", 30)
    assert len(set(scenes)) == 30 and all(s.count("{}") == 1 for s in scenes)
    assert scenes == subject_captions("person", 30, seed=0) != subject_captions("person", 30, seed=1)
    vocabulary = set(re.findall(r"[a-z]+", CORPUS_FILE.read_text().lower()))
    assert all(set(re.findall(r"[a-z]+", s.lower())) <= vocabulary for s in scenes)  # corpus words only
    t = get_type("celebrity")
    assert t.templates[-30:] == tuple(scenes)
    c = make_concept("Bill Marlow", "", "celebrity")
    assert [p.replace("Bill Marlow", "{}") for p in concept_prompts(c)[-30:]] == scenes
    assert concept_prompts(c, "Bill Holt")[-30:] == [s.replace("{}", "Bill Holt") for s in scenes]
    assert get_type("object").templates_key != t.templates_key
    with pytest.raises(ValueError, match="no slot"):
        subject_captions("celebrity", 3)


def test_stage_one_sums_made_with_other_templates_are_recomputed(tmp_path, monkeypatch):
    """A project's stats from an older mace (other templates) count as absent: the run recomputes them
    instead of erasing with sums of prompts it no longer uses."""
    from mace_core.method.concepts import ConceptType

    c = make_concept("Bill Marlow", "", "celebrity")
    st = _stats(torch.eye(4, dtype=torch.float64), 2 * torch.eye(4, dtype=torch.float64))
    project = Project(tmp_path)
    project.save_stats(c, st)
    assert torch.equal(project.load_stats(c).gram, st.gram)
    monkeypatch.setattr(ConceptType, "templates_key", property(lambda self: "other"))
    assert project.load_stats(c) is None


def test_a_celebrity_maps_onto_the_mean_of_ordinary_names():
    """types.yaml `anchor_names`: with its default anchor a celebrity's stage 1 targets 8 ordinary names
    (common first names and surnames paired), none sharing a word with it; an anchor the user gives, and
    the other types, keep their one anchor."""
    t = get_type("celebrity")
    got = t.stage1_anchors(make_concept("James Marlow", "", "celebrity"))
    firsts, lasts = _names("first-names"), _names("last-names")
    assert len(got) == 8 == len(set(got))
    assert got == tuple(f"{f} {s}" for f, s in zip(firsts, lasts) if "James" != f)[:8]
    assert all(f in firsts and s in lasts for f, s in (n.split() for n in got))
    assert t.stage1_anchors(make_concept("James Marlow", "a man", "celebrity")) == ("a man",)
    assert get_type("object").stage1_anchors(make_concept("cat")) == ("a scene",)


def test_stage_one_onto_several_anchors_fits_their_mean(backend):
    """The mean of the pairings' sums (`ConceptStats.mean`) refines W0 to the least-squares fit of the
    concept's embeddings onto the MEAN of the anchors' embeddings, checked against a direct solve of
    sum_k ||W e_i - W0 e*_ki||^2 / K + lam ||W - W0||^2 (stacked lstsq, no normal equations)."""
    from mace_core.method.refine import concept_stats, refinement_map

    prompts = ["a photo of Bill Marlow", "Bill Marlow smiling"]
    anchors = ["Mary Johnson", "John Williams", "a person"]
    parts = [concept_stats(backend, prompts, [p.replace("Bill Marlow", a) for p in prompts]) for a in anchors]
    st = ConceptStats.mean(parts)
    lam = 0.5
    m = refinement_map([st.cross], [st.gram], lam)
    w0 = torch.randn(6, m.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # the direct problem: rows e_i (each pairing's aligned positions) with targets W0 e*_i, weight 1/K
    from mace_core.method.refine import align

    rows, targets = [], []
    ct = backend.encode(prompts).context.double()
    for a in anchors:
        ap = [p.replace("Bill Marlow", a) for p in prompts]
        at = backend.encode(ap).context.double()
        for k, (p, q) in enumerate(zip(prompts, ap)):
            for i, j in align(backend.tokenize(p), backend.tokenize(q), ct.shape[1]):
                rows.append(ct[k, i] / len(anchors) ** 0.5)
                targets.append(w0 @ at[k, j] / len(anchors) ** 0.5)
    d = m.shape[0]
    lhs = torch.cat([torch.stack(rows), lam ** 0.5 * torch.eye(d, dtype=torch.float64)])
    rhs = torch.cat([torch.stack(targets), lam ** 0.5 * w0.T])
    direct = torch.linalg.lstsq(lhs, rhs).solution.T
    torch.testing.assert_close(w0 @ m, direct, rtol=1e-6, atol=1e-8)
